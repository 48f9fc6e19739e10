"""GPU training throughput and model-FLOPs utilisation: fp32 vs bf16 autocast + channels_last (+ compile).

  python benchmarks/bench_gpu.py                          # needs CUDA; without it prints why and exits 0
  python benchmarks/bench_gpu.py --device cpu --quick     # the same code on the CPU, tiny models (smoke run)

Models (the paper's backbones, spinal heads with its presets), batch 64, 224 px, SGD momentum 0.9:
  torchvision/wide_resnet101_2 + spinal w196 (resnet preset), 196 classes (Stanford Cars)
  timm/vit_base_patch16_224    + spinal w196 (resnet preset), 196 classes
Inputs are random tensors already on the device: this measures the training step (forward, backward,
optimizer), not decoding, which bench_train and bench_data cover. Each epoch is `train_one_epoch`, the
function `spinal_transfer.training.train.run` calls, over `--steps` batches; its only host-device syncs are
the logging interval (set past the epoch) and the epoch's mean loss.
Settings:
  fp32               amp none, NCHW; PyTorch's default math (cuDNN convolutions may use TF32, matmuls
                     do not: the flags are printed)
  bf16_cl            bf16 autocast + channels_last: the library's CUDA defaults
  bf16_cl_compile    the same under torch.compile (opt-in `--compile true`)
Rounds alternate the settings (one epoch each); throughput is the median over rounds, ratios are
per-round against fp32. Model FLOPs per image are counted by torch.utils.flop_counter on one forward +
backward (convolutions and matmuls; FLOP = 2 MAC); MFU = achieved model FLOP/s over the device's
dense bf16 tensor-core peak (from the table below, or --peak-tflops).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import header, print_table  # noqa: E402
from torch import nn  # noqa: E402

from spinal_transfer.config import TrainConfig  # noqa: E402
from spinal_transfer.models.heads import head_options  # noqa: E402
from spinal_transfer.models.surgery import build_model  # noqa: E402
from spinal_transfer.training.step import StepSettings  # noqa: E402
from spinal_transfer.training.train import stage_optimizer, train_one_epoch  # noqa: E402
from spinal_transfer.utils.runtime import amp_dtype  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' datasheets; matched on the
# device name, first match wins.
BF16_PEAK_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1),
                    ("L4", 121.0), ("A10", 125.0)]
SETTINGS = {"fp32": dict(amp="none", channels_last=False, compile=False),
            "bf16_cl": dict(amp="bf16", channels_last=True, compile=False),
            "bf16_cl_compile": dict(amp="bf16", channels_last=True, compile=True)}


def model_flops_per_image(model: nn.Module, size: int, device: torch.device) -> float:
    """FLOPs of one training forward + backward per image (convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, size, size, device=device)            # 2: BatchNorm needs more than one
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def bf16_peak(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in BF16_PEAK_TFLOPS if key in name), None)


def new_model(cfg: TrainConfig, classes: int) -> nn.Module:
    return build_model(cfg.backbone, classes, head=cfg.head, weights=cfg.weights, **head_options(cfg))


def make_epoch(cfg: TrainConfig, steps: int, classes: int, device: torch.device, state: dict):
    """A function running one epoch of `steps` training steps with `cfg`; returns its seconds."""
    batch, size = cfg.batch_size, cfg.img_size
    model = new_model(cfg, classes)
    model.load_state_dict(state)
    model.to(device).train()
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    fwd = torch.compile(model) if cfg.compile else model
    opt = stage_optimizer(cfg, model, cfg.lr)
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    settings = StepSettings(device, dtype, bool(cfg.channels_last), log_interval=cfg.log_interval)
    g = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.randn(batch, 3, size, size, device=device, generator=g),
                torch.randint(0, classes, (batch,), device=device, generator=g), None)] * steps

    def epoch() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        train_one_epoch(fwd, model, batches, opt, scaler, settings, total=steps, desc=cfg.backbone)  # ends on a sync
        return time.perf_counter() - t
    return epoch


def bench_model(backbone: str, args, device: torch.device, peak: float | None) -> list[tuple]:
    torch.manual_seed(0)
    base = TrainConfig(backbone=backbone, weights="none", head="spinal", head_preset="resnet", layer_width=196,
                       batch_size=args.batch_size, img_size=args.img_size, lr=1e-3, momentum=0.9,
                       device=str(device), log_interval=10 ** 9)
    init = new_model(base, args.classes)
    state = {k: v.clone() for k, v in init.state_dict().items()}
    flops = model_flops_per_image(init.to(device).train(), args.img_size, device)
    del init
    print(f"\n{backbone} + spinal w196, {args.classes} classes, batch {args.batch_size}, {args.img_size} px: "
          f"{flops / 1e9:.3g} GFLOP per image per training step (forward + backward)", flush=True)
    epochs, times, mem = {}, {name: [] for name in args.settings}, {}
    cuda = device.type == "cuda"
    for name in args.settings:
        if cuda:                                                # the earlier settings' models stay allocated
            held = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        epochs[name] = make_epoch(dataclasses.replace(base, **SETTINGS[name]), args.steps, args.classes, device,
                                  state)
        t = time.perf_counter()
        epochs[name]()                                          # warm-up (cuDNN autotune, compilation)
        mem[name] = f", peak {(torch.cuda.max_memory_allocated(device) - held) / 2 ** 30:.1f} GiB" if cuda else ""
        print(f"  {name}: warm-up {time.perf_counter() - t:.1f} s{mem[name]}", flush=True)
    for r in range(args.rounds):
        order = args.settings[r % len(args.settings):] + args.settings[:r % len(args.settings)]
        for name in order:
            times[name].append(epochs[name]())
        print(f"  round {r + 1}: " + ", ".join(f"{n} {args.batch_size * args.steps / times[n][-1]:.1f} img/s"
                                                for n in args.settings), flush=True)
    rows = []
    ref = times[args.settings[0]]
    for name in args.settings:
        rate = args.batch_size * args.steps / statistics.median(times[name])
        ratios = [a / b for a, b in zip(ref, times[name])]
        mfu = f"MFU {rate * flops / peak:.1%}" if peak else "MFU n/a (unknown peak; --peak-tflops)"
        rows.append((f"{backbone.split('/')[-1]} {name}", f"{rate:.1f} img/s, {rate * flops / 1e12:.3g} TFLOP/s, {mfu}{mem[name]}",
                     f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})", "(reported)"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run of the same code)")
    ap.add_argument("--quick", action="store_true", help="timm's tiny test_resnet/test_vit, 64 px, batch 8, 2 rounds")
    ap.add_argument("--models", nargs="+", default=None,
                    help="default torchvision/wide_resnet101_2 timm/vit_base_patch16_224 (quick: timm/test_resnet "
                         "timm/test_vit)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 64; quick 8")
    ap.add_argument("--img-size", type=int, default=None, help="default 224; quick 64")
    ap.add_argument("--steps", type=int, default=None, help="training steps per epoch (default 20; quick 2)")
    ap.add_argument("--rounds", type=int, default=None, help="default 5; quick 2")
    ap.add_argument("--classes", type=int, default=196)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                    help="the first is the reference of the ratios")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device, TFLOP/s")
    args = ap.parse_args()
    q = args.quick
    args.models = args.models or (["timm/test_resnet", "timm/test_vit"] if q else
                                  ["torchvision/wide_resnet101_2", "timm/vit_base_patch16_224"])
    args.batch_size = args.batch_size or (8 if q else 64)
    args.img_size = args.img_size or (64 if q else 224)
    args.steps = args.steps or (2 if q else 20)
    args.rounds = args.rounds or (2 if q else 5)
    header("bench_gpu: training throughput and MFU, fp32 vs bf16 + channels_last (+ compile)", args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU on this machine: nothing measured (run it where one is; `--device cpu --quick` "
              "smoke-tests the code)")
        return
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"gpu: {props.name}, {props.total_memory / 2 ** 30:.0f} GiB, CUDA {torch.version.cuda}, "
              f"cuDNN {torch.backends.cudnn.version()}; TF32: cuDNN convolutions "
              f"{torch.backends.cudnn.allow_tf32}, matmuls {torch.backends.cuda.matmul.allow_tf32}")
    peak = bf16_peak(device, args.peak_tflops)
    print(f"bf16 dense peak for MFU: {peak / 1e12:.1f} TFLOP/s" if peak else "bf16 dense peak: unknown (MFU not shown)")
    rows = []
    for backbone in args.models:
        rows += bench_model(backbone, args, device, peak)
    print(f"\nresults (median over {args.rounds} rounds of {args.steps} steps; ratio = {args.settings[0]} epoch "
          f"time / this setting's, per round):")
    print_table(rows)


if __name__ == "__main__":
    main()
