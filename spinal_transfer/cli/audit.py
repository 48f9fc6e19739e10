"""`spinal-transfer audit`."""
from __future__ import annotations

import argparse
from typing import Any

from ..config import add_config_args, given_flags, resolve_config
from . import positive_int

# the train options that decide which files are read and how their features are computed
AUDIT_FIELDS = ("data", "protocol", "paper_select_on", "paper_val_index_mod", "val_fraction", "test_fraction",
                "split_seed", "backbone", "weights", "replace", "img_size", "resize_size", "eval_resize", "mean",
                "std", "interpolation", "batch_size", "workers", "device", "amp", "channels_last", "cache_dir", "seed")

EXAMPLES = """\
  spinal-transfer audit --data ~/pets --out runs/pets_audit
  spinal-transfer audit --data ~/pets --backbone timm/resnet50 --weights default --threshold 0.97 --out runs/audit
  spinal-transfer audit --run runs/pets --out runs/pets_audit     # the run's own files, backbone and weights
Reads the folder as `train` does (the same splits, carved with --split-seed when it has no val/ or test/),
computes every image's pooled backbone features once into the shared feature cache (--cache-dir, default
feature-cache/ beside OUT, or beside RUN with --run, where `train --cache-features` keeps them), and
reports exact duplicates (file bytes or decoded pixels), near duplicates (cosine similarity of the centred
features >= --threshold, or perceptual hashes <= --hash-bits apart), pairs across train/val/test as leakage,
likely label errors (out-of-fold logistic regression ranked by cleanlab), outliers (cleanlab's OOD score),
class counts, image sizes, undecodable files, and the class folders train refuses (empty, or in one split
and not another) as findings rather than a stop. Writes OUT/audit.csv (one row per finding), OUT/audit.html
and OUT/audit.json; prints a summary."""


def add_args(parser: argparse.ArgumentParser) -> None:
    from ..experiments.audit import DEFAULT_FOLDS, DEFAULT_HASH_BITS, DEFAULT_THRESHOLD  # lazy: torch

    parser.add_argument("--out", default="audit", metavar="DIR",
                        help="where audit.csv, audit.html and audit.json go (default: audit)")
    parser.add_argument("--run", metavar="RUN", help="audit a run's recorded files (splits.json) with its backbone, "
                                                     "weights and preprocessing")
    parser.add_argument("--recipe", help="YAML file of train options (see recipes/); flags win over it")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"near duplicates: cosine similarity of the centred features at least this "
                             f"(default: {DEFAULT_THRESHOLD}, measured: see README)")
    parser.add_argument("--hash-bits", type=int, default=DEFAULT_HASH_BITS,
                        help=f"near duplicates also: perceptual hashes (pHash, 64 bits) at most this many bits apart "
                             f"(default: {DEFAULT_HASH_BITS})")
    parser.add_argument("--folds", type=positive_int, default=DEFAULT_FOLDS,
                        help=f"folds of the out-of-fold logistic regression (default: {DEFAULT_FOLDS})")
    parser.add_argument("--outliers", type=positive_int, metavar="N",
                        help="how many of the least typical images to list (default: 1%% of the images, at least 10)")
    group = parser.add_argument_group("train options (which files, which backbone)")
    add_config_args(group, only=AUDIT_FIELDS)


# what a run's config resolved from its backbone and input size: derived anew when --run is given another
RESOLVED_FROM = {"backbone": ("resize_size", "mean", "std", "interpolation"), "img_size": ("resize_size",)}


def run_flags(run_cfg: Any, flags: dict) -> dict:
    """`flags` for auditing a run's files: a flag that changes the features (another backbone, weights, input
    size) is said once, since audit --run otherwise means the run's own model; and the preprocessing the run
    resolved from its backbone and size (its resize, mean, std, interpolation) is resolved anew for the given
    ones, unless given too, so `--img-size 48` does not crop 48 px out of the run's 73-px resize."""
    import logging

    changed = {k: v for k, v in flags.items() if k in ("backbone", "weights", "replace", "img_size")
               and v != getattr(run_cfg, k)}
    if changed:
        logging.getLogger("spinal_transfer").warning(
            "audit --run: " + ", ".join(f"--{k.replace('_', '-')} {v} (the run has {getattr(run_cfg, k)})"
                                        for k, v in changed.items())
            + ": near duplicates, label issues and outliers are found on these features, not the run's model's")
    derived = {d for k in changed for d in RESOLVED_FROM.get(k, ())}
    return {**{d: None for d in derived if d not in flags}, **flags}


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..experiments.audit import audit, summary_text  # lazy: torch
    from ..runs.rundir import RunDir  # lazy: torch
    from ..utils.runtime import setup_logging  # lazy: torch

    setup_logging()
    flags = given_flags(args)
    if args.run:
        ran = RunDir(args.run).read_config()
        cfg = resolve_config(ran, run_flags(ran, flags), used=("cache_dir",))
    else:
        cfg = resolve_config(args.recipe, flags, used=("cache_dir",))
    result = audit(cfg, args.out, run=args.run, threshold=args.threshold, hash_bits=args.hash_bits, folds=args.folds,
                   num_outliers=args.outliers)
    print(summary_text(result, Path(args.out)))
    return 0
