"""Frozen-mode `compare` of 4 heads x 3 seeds with its one shared feature cache, vs the same 12 runs without
it (each run computing its own features, in a cache folder of its own): whole wall time, as a ratio.

  python benchmarks/bench_compare.py [--quick]

Backbone: timm/resnet18 at 224 px with a fixed random initialisation saved as its --weights file (nothing
can be downloaded here; the cost of a forward pass does not depend on the values), on 1600 JPEGs: what a
run saves with the shared cache is the extraction, so the folder must be large enough for it to matter
next to what every run pays anyway (set-up, checkpoints, test, plots and report page: about 3 s a run on
an idle 2-core machine). Shared:
`spinal_transfer.experiments.compare.compare(...)`, the command's own code path (heads linear, spinal,
spinal:vgg, mlp:hidden=256; seeds 0-2; frozen mode). Separate: the same 12 configs (`compare.plan`), each
with cache_dir set to a folder of its own, trained one after the other with `train.run`. Both sides run in
this process after an untimed warm-up run (imports, allocator), on the same folder of real JPEGs.

Also printed, to show where the time goes: the backbone's feature extraction (timed inside
`features.compute_features`: once on the shared side, once per run on the other), the rest of each run
(set-up, head epochs, test evaluation, plots and report page), and whether every run's test metrics are
the same on both sides (same features, same seeds: they must be).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import header, make_jpeg_folder, print_table, verdict  # noqa: E402

import spinal_transfer.training.features as F  # noqa: E402
import spinal_transfer.training.train as T  # noqa: E402
from spinal_transfer.config import TrainConfig  # noqa: E402
from spinal_transfer.experiments.compare import compare, plan  # noqa: E402
from spinal_transfer.models.heads_spec import parse_head_specs  # noqa: E402

TARGET = 5.0
HEADS = ("linear", "spinal", "spinal:vgg", "mlp:hidden=256")

_extraction: list[float] = []
_compute_features = F.compute_features


def _timed_compute_features(*a, **kw):
    t0 = time.perf_counter()
    out = _compute_features(*a, **kw)
    _extraction.append(time.perf_counter() - t0)
    return out


F.compute_features = _timed_compute_features       # cached_split calls it once per split it has to compute


def _quiet(msg: str) -> None:
    pass


def shared_side(base: TrainConfig, heads, seeds: int, out: Path) -> tuple[float, float]:
    """(wall seconds, extraction seconds) of the compare command's code path."""
    _extraction.clear()
    t0 = time.perf_counter()
    compare(base, heads, seeds, mode="frozen", out=out, log=_quiet)
    return time.perf_counter() - t0, sum(_extraction)


def separate_side(base: TrainConfig, heads, seeds: int, out: Path) -> tuple[float, float, list[float]]:
    """(wall seconds, extraction seconds, per-run seconds) of the same runs, each with a cache of its own."""
    _extraction.clear()
    per_run = []
    t0 = time.perf_counter()
    for i, p in enumerate(plan(base, heads, seeds, mode="frozen", out=out)):
        t = time.perf_counter()
        T.run(dataclasses.replace(p.cfg, cache_dir=str(out / f"cache-{i:02d}")))
        per_run.append(time.perf_counter() - t)
    return time.perf_counter() - t0, sum(_extraction), per_run


def fixed_random_weights(backbone: str, path: Path) -> Path:
    """A randomly initialised backbone saved once, used as --weights by every run: the same backbone for all
    seeds (a fresh random init per seed would give each seed other features), and no download."""
    import timm
    import torch

    torch.manual_seed(0)
    torch.save(timm.create_model(backbone.split("/", 1)[1], pretrained=False).state_dict(), path)
    return path


def test_metrics(out: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(out)): json.loads(p.read_text())["test"]
            for p in sorted((out / "runs").glob("*/seed*/report.json"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 heads x 2 seeds, 64 px, 400 images (a smoke run)")
    ap.add_argument("--backbone", default="timm/resnet18", help="a timm model")
    ap.add_argument("--img-size", type=int, default=None, help="default 224; quick 64")
    ap.add_argument("--images", type=int, default=None, help="JPEGs in the folder (default 1600; quick 400)")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    header("bench_compare: frozen compare with one shared feature cache vs the same runs without it", args)
    size = args.img_size or (64 if args.quick else 224)
    n = args.images or (400 if args.quick else 1600)
    heads = parse_head_specs(HEADS[:2] if args.quick else HEADS)
    seeds = 2 if args.quick else 3

    tmp = tempfile.TemporaryDirectory(prefix="bench_compare_")
    root = make_jpeg_folder(Path(tmp.name) / "jpegs", n_photo=n * 3 // 4, n_digits=n // 4)
    weights = fixed_random_weights(args.backbone, Path(tmp.name) / "backbone.pth")
    base = TrainConfig(data=str(root), backbone=args.backbone, weights=str(weights), layer_width=128, img_size=size,
                       batch_size=32, augment="none", epochs=args.epochs, lr=0.01, scheduler="none", device="cpu",
                       amp="none", log_interval=1000)
    runs = len(heads) * seeds
    print(f"config: {args.backbone} (a fixed random init as --weights, frozen), {size} px, batch 32, "
          f"{args.epochs} epochs, workers default; heads {', '.join(h.text for h in heads)}; seeds 0-{seeds - 1} "
          f"({runs} runs); val/test 10% each of {len(list(root.rglob('*.jpg')))} JPEGs", flush=True)

    warm = dataclasses.replace(base, freeze_backbone=True, cache_features=True, epochs=1, head="linear",
                               out=str(Path(tmp.name) / "warmup"), cache_dir=str(Path(tmp.name) / "warmup-cache"))
    t = time.perf_counter()
    T.run(warm)
    print(f"  warm-up run (untimed): {time.perf_counter() - t:.1f} s", flush=True)

    shared_out, separate_out = Path(tmp.name) / "shared", Path(tmp.name) / "separate"
    shared_s, shared_x = shared_side(base, heads, seeds, shared_out)
    print(f"  shared cache: {shared_s:.1f} s ({shared_x:.1f} s extracting features)", flush=True)
    sep_s, sep_x, per_run = separate_side(base, heads, seeds, separate_out)
    print(f"  a cache per run: {sep_s:.1f} s ({sep_x:.1f} s extracting features); runs "
          + ", ".join(f"{s:.1f}" for s in per_run) + " s", flush=True)

    fixed_shared = (shared_s - shared_x) / runs
    fixed_sep = (sep_s - sep_x) / runs
    ratio = sep_s / shared_s
    print(f"\nresults ({runs} runs per side, one measurement each):")
    print_table([
        (f"compare, {len(heads)} heads x {seeds} seeds (frozen)", f"{sep_s:.1f} s vs {shared_s:.1f} s",
         f"{ratio:.2f}x (a cache per run / one shared cache)", verdict(ratio, TARGET)),
        ("backbone feature extraction", f"{sep_x:.1f} s ({runs} x {sep_x / runs:.1f}) vs {shared_x:.1f} s (once)",
         f"{sep_x / max(shared_x, 1e-9):.1f}x", "(diagnostic)"),
        ("rest of a run: set-up, head epochs, test, plots, report page", f"{fixed_sep:.2f} s vs {fixed_shared:.2f} s "
         "per run", "", "(diagnostic: paid by every run on both sides)"),
    ])
    a, b = test_metrics(shared_out), test_metrics(separate_out)
    same = len(a) == runs and a.keys() == b.keys() and all(
        a[k]["top1"] == b[k]["top1"] and abs(a[k]["loss"] - b[k]["loss"]) <= 1e-5 * max(1.0, abs(a[k]["loss"]))
        for k in a)
    print(f"test metrics of every run, shared vs own cache: {'PASS' if same else 'MISS'} (top-1 equal, loss to 1e-5)"
          + (f"; mean test top-1 {100 * statistics.mean(m['top1'] for m in a.values()):.1f}%" if a else ""))
    tmp.cleanup()


if __name__ == "__main__":
    main()
