"""Training throughput: our loop vs a plain loop in the style of the paper's scripts.

  python benchmarks/bench_train.py [--quick]

Reference (the paper's scripts): torchvision transforms on PIL images through
`torchvision.datasets.ImageFolder`, DataLoader(shuffle=True, num_workers=0), fp32, contiguous
(NCHW) tensors, SGD momentum 0.9, `loss.item()` every step. It runs in a spawned process of its
own, so it keeps glibc's default allocator settings while this process gets ours.

Ours: what `spinal_transfer.training.train.run` builds before its first epoch (`train.setup`: the data scan, model,
input pipeline, loaders, loss) and, per epoch, `train.train_epoch`: the very calls `run()` makes. `run()`
itself is not timed because its epoch also evaluates and writes checkpoints.
Settings:
  ours_fp32       the library's CPU defaults: fp32, channels_last, workers = min(8, cores) = 2
                  overlapping decode with compute
  ours_fp32_nchw  the same with `channels_last: false` (what channels_last brings)
  ours_bf16       the defaults plus bf16 autocast (`amp: bf16`)
All use the same backbone, head, batch, input size, recipe ("paper": resize, rotate 15, crop, flip)
and the same subset of a folder of real JPEGs of mixed sizes.

Throughput = images/s over the steady-state optimizer steps of an epoch (data fetch + forward +
backward + step): from the end of its first step to the end of its last, so iterator start-up,
waiting for the first batch and warm-up are not counted. A round runs one epoch of every setting
(rotating order), so slow drifts in machine load hit all settings alike. Ratios are per-round
ours/reference, median over rounds. Persistent DataLoader workers sit idle between epochs, so one
setting's decoding never runs during another's epoch.
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
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import Rounds, folder_samples, header, make_jpeg_folder, print_table, size_summary, verdict  # noqa: E402
from torch import nn  # noqa: E402

from spinal_transfer.config import TrainConfig  # noqa: E402
from spinal_transfer.models.heads import head_options  # noqa: E402
from spinal_transfer.models.preprocess import resolve_data_config  # noqa: E402
from spinal_transfer.models.surgery import build_model  # noqa: E402
from spinal_transfer.runs.rundir import RunDir  # noqa: E402
from spinal_transfer.training.train import setup, stage_optimizer, train_epoch  # noqa: E402
from spinal_transfer.utils.runtime import configure_process, use_channels_last  # noqa: E402

TARGETS = {"ours_fp32": 1.3, "ours_fp32_nchw": None, "ours_bf16": 2.0}


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


class EpochTimer:
    """Runs one epoch per call and returns (images, seconds) of its steady-state steps: from the end
    of the first step to the end of the last (`run_epoch(on_step)` calls `on_step()` after every batch,
    here every optimizer step). The first step (iterator start, waiting for the first batch, and at
    the very start oneDNN warm-up) runs but is not timed.

    Also keeps CPU time, which load from other processes does not inflate: this process's CPU seconds
    per image over the same steps, plus (with DataLoader workers) the workers' CPU seconds per decoded
    image over whole epochs."""

    def __init__(self, run_epoch: Callable, batch_size: int, epoch_images: int, loader=None):
        self.run_epoch, self.batch_size, self.epoch_images, self.loader = run_epoch, batch_size, epoch_images, loader
        self.main_cpu, self.worker_cpu, self.worker_images = [], 0.0, 0

    def __call__(self) -> tuple[int, float]:
        marks: list[tuple[float, float]] = []
        w0 = _worker_cpu(self.loader)
        self.run_epoch(lambda: marks.append((time.perf_counter(), time.process_time())))
        if self.loader is not None and self.loader.num_workers > 0:
            self.worker_cpu += _worker_cpu(self.loader) - w0
            self.worker_images += self.epoch_images
        (t1, c1), (tn, cn) = marks[0], marks[-1]
        images = (len(marks) - 1) * self.batch_size
        self.main_cpu.append((cn - c1) / images)
        return images, tn - t1

    def cpu_per_image(self) -> float:
        return statistics.median(self.main_cpu) + (self.worker_cpu / self.worker_images if self.worker_images else 0.0)


def reference_setup(root: Path, subset: list, classes: list, backbone: str, size: int, resize: int,
                    batch: int, mean, std, state_dict: dict, head_kw: dict) -> Callable:
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

    def run_epoch(on_step: Callable) -> None:
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
            on_step()
    return run_epoch


def _reference_server(conn, setup_args: tuple, batch: int, epoch_images: int) -> None:
    """The reference loop in a process of its own (spawned: glibc's default allocator, untouched by
    our tuning), timing one epoch per request."""
    timer = EpochTimer(reference_setup(*setup_args), batch, epoch_images)
    while (msg := conn.recv()) != "stop":
        conn.send(timer() if msg == "epoch" else timer.cpu_per_image())


class RemoteReference:
    """Calls like an EpochTimer; the epoch runs in the reference process while this one waits."""

    def __init__(self, setup_args: tuple, batch: int, epoch_images: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_reference_server, args=(child, setup_args, batch, epoch_images), daemon=True)
        self.proc.start()

    def __call__(self) -> tuple[int, float]:
        self.conn.send("epoch")
        return self.conn.recv()

    def cpu_per_image(self) -> float:
        self.conn.send("cpu")
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send("stop")
        self.proc.join()


def ours_setup(cfg: TrainConfig, run_dir: Path, state_dict: dict):
    """What `run()` builds before its first epoch (`train.setup`, the very function) and a function running one
    epoch of its loop (`train.train_epoch`, the same call `run()` makes; no evaluation, no checkpoints)."""
    device = torch.device("cpu")
    configure_process(device)
    s = setup(cfg, RunDir(run_dir), device)
    s.model.load_state_dict(state_dict)
    opt = stage_optimizer(s.cfg, s.model, s.cfg.lr)
    epoch_no = [0]

    def run_epoch(on_step: Callable) -> None:
        epoch_no[0] += 1
        train_epoch(s, opt, epoch_no[0], frozen=False, desc=f"{cfg.amp} epoch {epoch_no[0]}", on_step=on_step)
    return run_epoch, s.cfg, s.loaders["train"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 px, batch 16, under a minute")
    ap.add_argument("--backbone", default="torchvision/resnet18")
    ap.add_argument("--img-size", type=int, default=None, help="crop size (default 128; quick 64)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 32; quick 16")
    ap.add_argument("--batches", type=int, default=None,
                    help="batches per epoch (the first of each epoch is not timed); default 8, quick 4")
    ap.add_argument("--rounds", type=int, default=None, help="at most this many rounds (default 25; quick 8)")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting rounds after this (default 540; quick 100)")
    ap.add_argument("--skip-bf16", action="store_true")
    args = ap.parse_args()
    size = args.img_size or (64 if args.quick else 128)
    batch = args.batch_size or (16 if args.quick else 32)
    args.batches = args.batches or (4 if args.quick else 8)
    args.rounds = args.rounds or (8 if args.quick else 25)
    budget = args.budget_s or (100 if args.quick else 540)
    resize = round(size * 136 / 128)                       # the paper's R136 -> RC128 ratio
    header("bench_train: training images/s, our loop vs the paper-style loop", args)

    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory(prefix="bench_train_")
    root = make_jpeg_folder(Path(tmp.name) / "jpegs", 150 if args.quick else 300, 50 if args.quick else 100)
    samples, classes = folder_samples(root)
    order = np.random.default_rng(0).permutation(len(samples))
    subset = [samples[i] for i in order[: args.batches * batch]]
    print("data:", size_summary(samples), f"; each epoch uses {len(subset)} of them (ours: its shuffled training "
                                          f"split's first {args.batches} batches)")

    base = TrainConfig(data=str(root), backbone=args.backbone, weights="none", head="spinal", head_preset="resnet",
                       augment="paper", img_size=size, resize_size=resize, batch_size=batch, lr=1e-3, momentum=0.9,
                       seed=0, device="cpu", amp="none", channels_last=None, workers=None,
                       limit_train_batches=args.batches, log_interval=10 ** 9)
    init = build_model(base.backbone, len(classes), head="spinal", weights="none", **head_options(base))
    state = {k: v.clone() for k, v in init.state_dict().items()}
    dc = resolve_data_config(base.backbone, base.weights, init, img_size=size, resize_size=resize)
    print(f"model: {args.backbone} + spinal head (resnet preset, width {base.layer_width}), {size} px "
          f"(paper recipe: resize {resize}, rotate 15, crop {size}, flip), batch {batch}, SGD momentum 0.9, weights none")

    settings = {"ours_fp32": dict(), "ours_fp32_nchw": dict(channels_last=False), "ours_bf16": dict(amp="bf16")}
    if args.skip_bf16:
        settings.pop("ours_bf16")
    ref = RemoteReference((root, subset, classes, base.backbone, size, resize, batch, dc.mean, dc.std, state,
                           head_options(base)), batch, len(subset))
    fns = {"ref": ref}
    for name, kw in settings.items():
        run_epoch, cfg, loader = ours_setup(dataclasses.replace(base, **kw), Path(tmp.name) / name, state)
        print(f"  {name}: amp {cfg.amp}, channels_last {use_channels_last(cfg.channels_last, torch.device('cpu'))}, "
              f"workers {cfg.workers}")
        fns[name] = EpochTimer(run_epoch, batch, len(subset), loader)
    print(f"rounds (one epoch of {args.batches} steps per setting per round; images/s of its last "
          f"{args.batches - 1} steps):", flush=True)
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
    print("\nCPU time per image (robust to load; median over epochs of main-process CPU per image in the timed steps"
          " + workers' CPU per decoded image; ratio = reference CPU/img over this CPU/img):")
    print_table(cpu_rows)
    tmp.cleanup()


if __name__ == "__main__":
    main()
