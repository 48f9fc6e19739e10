"""Cached-feature head training (`--freeze-backbone --cache-features`) vs the same frozen run
without the cache: per-epoch time and metric equality.

  python benchmarks/bench_cache.py [--quick]

Both runs are `spinal_transfer.training.train.run` with the same config (frozen backbone, augment none, same
seed, same generated val/test split of a folder of real JPEGs); only `cache_features` differs. Runs
alternate (plain, cached, plain, cached, ...); each cached run starts from an empty run directory, so
it pays for its feature extraction.

Per-epoch time, steady state (epochs 2..E):
  train phase  images / train_images_per_s from metrics.jsonl (the loop's own timer)   target >= 50x
  whole epoch  time between successive checkpoints/last.pt writes: train + val + checkpoints
Plus the whole run's wall time (cached: extraction included). Ratios are plain / cached, median over
pairs. Equality: val/test top1 and loss of the final report and per-epoch train/val losses.
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

import spinal_transfer.training.selection as S  # noqa: E402
import spinal_transfer.training.train as T  # noqa: E402
from spinal_transfer.config import TrainConfig  # noqa: E402

TARGET = 50.0

_saves: list[tuple[str, float]] = []
_atomic_save = S.atomic_save


def _recording_save(obj, path, *a, **kw):
    out = _atomic_save(obj, path, *a, **kw)
    _saves.append((Path(path).name, time.perf_counter()))
    return out


S.atomic_save = _recording_save        # CheckpointSaver's own writes (last.pt each epoch) mark the epochs' ends


def one_run(cfg: TrainConfig) -> dict:
    _saves.clear()
    t0 = time.perf_counter()
    report = T.run(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(r) for r in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines() if r]
    ends = [t for name, t in _saves if name == "last.pt"]
    n_train = len(json.loads((Path(cfg.out) / "splits.json").read_text())["splits"]["train"])
    return {"report": report, "wall": wall, "rows": rows,
            "train_s": [n_train / r["train_images_per_s"] for r in rows[1:]],
            "epoch_s": [b - a for a, b in zip(ends, ends[1:])]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 px, 160 images, 2 epochs, 1 pair (< 2 min)")
    ap.add_argument("--backbone", default="timm/resnet18")
    ap.add_argument("--img-size", type=int, default=None, help="default 224, the backbone's pretrained input size; quick 64")
    ap.add_argument("--epochs", type=int, default=None, help="default 3; quick 2")
    ap.add_argument("--pairs", type=int, default=None, help="plain/cached pairs; default 2; quick 1")
    args = ap.parse_args()
    header("bench_cache: cached-feature head training vs the same frozen run without the cache", args)
    size = args.img_size or (64 if args.quick else 224)
    epochs = args.epochs or (2 if args.quick else 3)
    pairs = args.pairs or (1 if args.quick else 2)

    tmp = tempfile.TemporaryDirectory(prefix="bench_cache_")
    root = make_jpeg_folder(Path(tmp.name) / "jpegs", *((120, 40) if args.quick else (300, 100)))
    base = TrainConfig(data=str(root), backbone=args.backbone, weights="none", head="spinal", head_preset="resnet",
                       layer_width=128, img_size=size, batch_size=32, augment="none", epochs=epochs, lr=0.01,
                       scheduler="none", freeze_backbone=True, seed=0, device="cpu", amp="none", log_interval=1000)
    print(f"config: {args.backbone} (weights none, frozen) + spinal head w128, {size} px, batch 32, augment none, "
          f"{epochs} epochs, workers default, val/test 10% each of {len(list(root.rglob('*.jpg')))} JPEGs", flush=True)

    runs: dict[str, list] = {"plain": [], "cached": []}
    for p in range(pairs):
        for kind in (("plain", "cached") if p % 2 == 0 else ("cached", "plain")):
            cfg = dataclasses.replace(base, cache_features=kind == "cached", out=str(Path(tmp.name) / f"{kind}{p}"),
                                      cache_dir=str(Path(tmp.name) / f"cache{p}"))     # each computes its own
            r = one_run(cfg)
            runs[kind].append(r)
            print(f"  pair {p + 1} {kind}: run {r['wall']:.1f} s; steady epochs: train "
                  + ", ".join(f"{x:.3f}" for x in r["train_s"]) + " s; whole epoch "
                  + ", ".join(f"{x:.3f}" for x in r["epoch_s"]) + " s", flush=True)

    def ratio(key):
        rs = [statistics.median(a[key]) / statistics.median(b[key]) for a, b in zip(runs["plain"], runs["cached"])]
        return statistics.median(rs), min(rs), max(rs)

    rows = []
    for key, label, target in (("train_s", "per-epoch train phase", TARGET), ("epoch_s", "per-epoch wall (train+val+ckpt)", None)):
        m, lo, hi = ratio(key)
        pm = statistics.median(statistics.median(r[key]) for r in runs["plain"])
        cm = statistics.median(statistics.median(r[key]) for r in runs["cached"])
        rows.append((label, f"{pm:.3f} s vs {cm:.4f} s", f"{m:.0f}x (min {lo:.0f}, max {hi:.0f})",
                     verdict(m, target) if target else "(reported)"))
    rs = [a["wall"] / b["wall"] for a, b in zip(runs["plain"], runs["cached"])]
    rows.append((f"whole run ({epochs} epochs, cached incl. extraction)",
                 f"{statistics.median(r['wall'] for r in runs['plain']):.1f} s vs "
                 f"{statistics.median(r['wall'] for r in runs['cached']):.1f} s", f"{statistics.median(rs):.2f}x",
                 "(reported)"))

    # ---- metric equality ----
    a, b = runs["plain"][0], runs["cached"][0]
    eq = []
    ok = True
    for split in ("val", "test"):
        for k, tol in (("top1", 1e-6), ("loss", 1e-4)):
            x, y = a["report"][split][k], b["report"][split][k]
            same = abs(x - y) <= tol * max(1.0, abs(x))
            ok &= same
            eq.append(f"{split} {k}: {x:.6f} vs {y:.6f} ({'equal' if same else 'DIFFERENT'})")
    dl = max(abs(r1["train_loss"] - r2["train_loss"]) / max(1e-12, abs(r1["train_loss"]))
             for r1, r2 in zip(a["rows"], b["rows"]))
    dv = max(abs(r1["val"]["loss"] - r2["val"]["loss"]) / max(1e-12, abs(r1["val"]["loss"]))
             for r1, r2 in zip(a["rows"], b["rows"]))
    ok &= dl <= 1e-4 and dv <= 1e-4
    eq.append(f"per-epoch train loss max rel diff {dl:.1e}, val loss max rel diff {dv:.1e}")
    print(f"\nresults (plain / cached, median over {pairs} pair(s); steady-state epochs 2..{epochs}):")
    print_table(rows)
    print("metric equality (plain vs cached, first pair): " + "; ".join(eq))
    print(f"metric equality: {'PASS' if ok else 'MISS'} (top1 exact to 1e-6, losses to 1e-4 relative)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
