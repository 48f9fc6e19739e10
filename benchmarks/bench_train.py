"""Training throughput: our loop vs a plain loop in the style of the paper's scripts.

  python benchmarks/bench_train.py [--quick]

Reference (the paper's scripts): torchvision transforms on PIL images through
`torchvision.datasets.ImageFolder`, DataLoader(shuffle=True, num_workers=0), fp32, contiguous
(NCHW) tensors, SGD momentum 0.9, `loss.item()` every step. It runs in a spawned process of its
own, so it keeps glibc's default allocator settings while this process gets ours.

Ours: the building blocks `spinal_transfer.train.run` uses, with the inner loop copied from it
(tune_cpu_allocator, build_model, resolve_data_config, build_transforms, make_loader with
EpochShuffle, make_optimizer, set_trainable, _autocast, compute_loss, the isfinite/loss-sum
bookkeeping); `run()` itself is not timed because its epoch also evaluates and writes checkpoints.
Settings:
  ours_default  fp32, library CPU defaults (workers = min(8, cores) = 2, channels_last off on CPU)
  ours_fp32_cl  fp32 + channels_last + 2 workers overlapping decode
  ours_bf16_cl  bf16 autocast (`amp: bf16`) + channels_last + 2 workers
All use the same backbone, head, batch, input size, recipe ("paper": resize, rotate 15, crop, flip)
and the same subset of a folder of real JPEGs of mixed sizes.

Throughput = images/s of single steady-state optimizer steps (data fetch + forward + backward +
step). Each setting keeps its own epoch running over the subset; a round times ONE step of every
setting (rotating order), so slow drifts in machine load hit all settings alike; the first step of
every epoch (iterator start, first decode, warm-up) is not timed. Ratios are per-round
ours/reference, median over rounds. Caveat: ours' DataLoader workers may decode in the background
while another setting's step runs, as they do during ours' own compute in a real epoch; on this
input that decode is ~1-2% of a step, so the bias is of that size.
Targets: fp32 >= 1.3x, bf16 >= 2x.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from _common import Rounds, folder_samples, header, make_jpeg_folder, print_table, size_summary, verdict  # noqa: E402

from spinal_transfer.config import TrainConfig  # noqa: E402
from spinal_transfer.heads import head_options  # noqa: E402
from spinal_transfer.surgery import build_model  # noqa: E402
from spinal_transfer.train import (EpochShuffle, _autocast, compute_loss, default_workers, make_loader,  # noqa: E402
                                   make_optimizer, set_trainable)
from spinal_transfer.transforms import build_transforms, resolve_data_config  # noqa: E402
from spinal_transfer.utils import amp_dtype, tune_cpu_allocator  # noqa: E402

TARGETS = {"ours_default": None, "ours_fp32_cl": 1.3, "ours_bf16_cl": 2.0}


def _worker_cpu(loader) -> float:
    """CPU seconds (user + system) used so far by a DataLoader's persistent worker processes."""
    it = getattr(loader, "_iterator", None) if loader is not None else None
    total = 0.0
    for w in getattr(it, "_workers", []) or []:
        try:
            fields = Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


class StepTimer:
    """Times one optimizer step per call, continuing the current epoch (a generator that yields after
    each step) and starting the next epoch when it ends. The first step of every epoch (iterator
    start, first decode or worker latency, and at the very start oneDNN warm-up) is run but not timed.

    Also keeps CPU time, which load from other processes does not inflate: this process's CPU
    seconds per timed step, plus (with DataLoader workers) the workers' CPU seconds per decoded image,
    measured over whole epochs."""

    def __init__(self, steps, batch_size: int, epoch_images: int, loader=None):
        self.steps, self.batch_size, self.epoch_images, self.loader = steps, batch_size, epoch_images, loader
        self.gen, self.main_cpu, self.worker_cpu, self.worker_images, self._w0 = None, [], 0.0, 0, 0.0

    def __call__(self) -> tuple[int, float]:
        while True:
            if self.gen is None:
                self._w0 = _worker_cpu(self.loader)
                self.gen = self.steps()
                next(self.gen)                   # first step of the epoch: not timed
            t, c = time.perf_counter(), time.process_time()
            try:
                next(self.gen)
            except StopIteration:
                self.gen = None
                if self.loader is not None and self.loader.num_workers > 0:
                    self.worker_cpu += _worker_cpu(self.loader) - self._w0
                    self.worker_images += self.epoch_images
                continue
            self.main_cpu.append(time.process_time() - c)
            return self.batch_size, time.perf_counter() - t

    def cpu_per_image(self) -> float:
        main = statistics.median(self.main_cpu) / self.batch_size
        return main + (self.worker_cpu / self.worker_images if self.worker_images else 0.0)


def reference_setup(root: Path, subset: list, classes: list, backbone: str, size: int, resize: int,
                    batch: int, mean, std, state_dict: dict, head_kw: dict):
    import torchvision.transforms as T
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    tf = T.Compose([T.Resize((resize, resize)), T.RandomRotation(15), T.RandomCrop(size), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize(mean, std)])
    ds = ImageFolder(str(root), transform=tf)
    ds.samples = ds.imgs = list(subset)
    ds.targets = [y for _, y in subset]
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0)
    model = build_model(backbone, len(classes), head="spinal", weights="none", **head_kw)
    model.load_state_dict(state_dict)
    model.train()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def steps():
        running_loss, running_corrects = 0.0, 0
        for inputs, labels in loader:
            optimizer.zero_grad()
            outputs = model(inputs)
            _, preds = torch.max(outputs, 1)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item() * inputs.size(0)
            running_corrects += torch.sum(preds == labels.data)
            yield
    return steps


def _reference_server(conn, setup_args: tuple, batch: int, epoch_images: int) -> None:
    """The reference loop in a process of its own (spawned: glibc's default allocator, untouched by
    our tuning), timing one step per request."""
    timer = StepTimer(reference_setup(*setup_args), batch, epoch_images)
    while (msg := conn.recv()) != "stop":
        conn.send(timer() if msg == "step" else timer.cpu_per_image())


class RemoteReference:
    """Calls like a StepTimer; the steps run in the reference process while this one waits."""

    def __init__(self, setup_args: tuple, batch: int, epoch_images: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_reference_server, args=(child, setup_args, batch, epoch_images), daemon=True)
        self.proc.start()

    def __call__(self) -> tuple[int, float]:
        self.conn.send("step")
        return self.conn.recv()

    def cpu_per_image(self) -> float:
        self.conn.send("cpu")
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send("stop")
        self.proc.join()


def ours_setup(cfg: TrainConfig, subset: list, num_classes: int, state_dict: dict):
    """The objects `run()` builds, and its inner training loop (no eval, no checkpoints)."""
    device = torch.device("cpu")
    tune_cpu_allocator(device)
    model = build_model(cfg.backbone, num_classes, head=cfg.head, weights=cfg.weights, replace=cfg.replace,
                        **head_options(cfg))
    model.load_state_dict(state_dict)
    dc = resolve_data_config(cfg, model, cfg.backbone, cfg.weights)
    cfg = dataclasses.replace(cfg, img_size=dc.img_size, resize_size=dc.resize_size, mean=list(dc.mean),
                              std=list(dc.std), interpolation=dc.interpolation, workers=default_workers(cfg))
    dtype = amp_dtype(cfg.amp, device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    train_tf = build_transforms(cfg, dc, train=True)
    sampler = EpochShuffle(len(subset), cfg.seed)
    loader = make_loader(subset, train_tf, cfg, True, device, sampler)
    criterion = nn.CrossEntropyLoss()
    opt = make_optimizer(model, cfg, cfg.lr)
    set_trainable(model, False)
    epoch_no = [0]

    def steps():
        epoch = epoch_no[0]
        epoch_no[0] += 1
        sampler.set_epoch(epoch)
        train_tf.set_random_seed(cfg.seed * 1_000_003 + epoch)
        loader.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        loss_sum, n_loss = torch.zeros((), device=device), 0
        bad_loss = torch.zeros((), dtype=torch.bool, device=device)
        opt.zero_grad(set_to_none=True)
        for i, (x, y, bad) in enumerate(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, dtype):
                loss = compute_loss(model(x), y, criterion)
            bad_loss |= ~torch.isfinite(loss.detach())
            loss.backward()                       # GradScaler is disabled for fp32/bf16: scale() is identity
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach().float() * len(x)
            n_loss += len(x)
            if i % cfg.log_interval == 0 and bad_loss.item():
                break
            yield
        assert not bad_loss.item()
    return steps, cfg, loader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 px, batch 16, ~1.5 min")
    ap.add_argument("--backbone", default="torchvision/resnet18")
    ap.add_argument("--img-size", type=int, default=None, help="crop size (default 128; quick 64)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 32; quick 16")
    ap.add_argument("--batches", type=int, default=None,
                    help="batches per epoch (the first of each epoch is not timed); default 6, quick 3")
    ap.add_argument("--rounds", type=int, default=None, help="at most this many rounds (default 30; quick 12)")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting rounds after this (default 540; quick 100)")
    ap.add_argument("--skip-bf16", action="store_true")
    args = ap.parse_args()
    size = args.img_size or (64 if args.quick else 128)
    batch = args.batch_size or (16 if args.quick else 32)
    args.batches = args.batches or (3 if args.quick else 6)
    args.rounds = args.rounds or (12 if args.quick else 30)
    budget = args.budget_s or (100 if args.quick else 540)
    resize = round(size * 136 / 128)                       # the paper's R136 -> RC128 ratio
    header("bench_train: training images/s, our loop vs the paper-style loop", args)

    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory(prefix="bench_train_")
    root = make_jpeg_folder(Path(tmp.name) / "jpegs", 150 if args.quick else 300, 50 if args.quick else 100)
    samples, classes = folder_samples(root)
    order = np.random.default_rng(0).permutation(len(samples))
    subset = [samples[i] for i in order[: args.batches * batch]]
    print("data:", size_summary(samples), f"; each epoch uses the same {len(subset)} of them")

    base = TrainConfig(backbone=args.backbone, weights="none", head="spinal", head_preset="resnet", augment="paper",
                       img_size=size, resize_size=resize, batch_size=batch, lr=1e-3, momentum=0.9, seed=0,
                       device="cpu", amp="none", channels_last=None, workers=None)
    init = build_model(base.backbone, len(classes), head="spinal", weights="none", **head_options(base))
    state = {k: v.clone() for k, v in init.state_dict().items()}
    dc = resolve_data_config(base, init, base.backbone, base.weights)
    print(f"model: {args.backbone} + spinal head (resnet preset, width {base.layer_width}), {size} px "
          f"(paper recipe: resize {resize}, rotate 15, crop {size}, flip), batch {batch}, SGD momentum 0.9, weights none")

    settings = {"ours_default": dict(), "ours_fp32_cl": dict(channels_last=True, workers=2),
                "ours_bf16_cl": dict(channels_last=True, workers=2, amp="bf16")}
    if args.skip_bf16:
        settings.pop("ours_bf16_cl")
    ref = RemoteReference((root, subset, classes, base.backbone, size, resize, batch, dc.mean, dc.std, state,
                           head_options(base)), batch, len(subset))
    fns = {"ref": ref}
    for name, kw in settings.items():
        steps, cfg, loader = ours_setup(dataclasses.replace(base, **kw), subset, len(classes), state)
        print(f"  {name}: amp {cfg.amp}, channels_last {cfg.channels_last}, workers {cfg.workers}")
        fns[name] = StepTimer(steps, batch, len(subset), loader)
    print("rounds (one timed step per setting per round; images/s of that step):", flush=True)
    R = Rounds(fns, reference="ref").run(args.rounds, budget_s=budget, min_rounds=3, warmup=True)

    rows = [("ref (paper-style loop)", f"{R.median_rate('ref'):.2f} img/s", "1.00x", "")]
    for name in settings:
        m, lo, hi = R.ratio(name)
        rows.append((name, f"{R.median_rate(name):.2f} img/s",
                     f"{m:.2f}x (min {lo:.2f}, max {hi:.2f})",
                     verdict(m, TARGETS[name]) or "(reported)"))
    ref_cpu = ref.cpu_per_image()
    ref.close()
    cpu_rows = [("ref", f"{ref_cpu * 1e3:.0f} ms CPU/img", "1.00x", "(diagnostic)")]
    for name in settings:
        t = fns[name]
        w = f", of which workers' decode {t.worker_cpu / t.worker_images * 1e3:.0f} ms" if t.worker_images else ""
        cpu_rows.append((name, f"{t.cpu_per_image() * 1e3:.0f} ms CPU/img{w}", f"{ref_cpu / t.cpu_per_image():.2f}x",
                         "(diagnostic)"))
    print(f"\nresults (median over {len(R.rates['ref'])} rounds of the per-round ratio; steady-state steps):")
    print_table(rows)
    print("\nCPU time per image (robust to load; median main-process CPU per step + workers' CPU per decoded "
          "image; ratio = reference CPU/img over this CPU/img):")
    print_table(cpu_rows)
    tmp.cleanup()


if __name__ == "__main__":
    main()
