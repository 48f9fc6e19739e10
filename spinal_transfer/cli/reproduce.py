"""`spinal-transfer reproduce`."""
from __future__ import annotations

import argparse
import sys

from ..config import CONFIG_FIELDS, add_config_args, check_flags
from ..experiments.reproduce import (
    DEFAULT_DATA_ROOT,
    DEFAULT_OUT,
    DEFAULT_RECIPES,
    DEFAULT_SEEDS,
    OVERRIDES,
    PAPER_RESULTS,
    collect,
    find_recipes,
    reproduce,
    seeds_asked,
    shard_from_env,
)
from . import positive_int

# the flags reproduce shares with train, generated from the same TrainConfig fields
SHARED = ("batch_size", "device", "amp", "workers")

EXAMPLES = f"""\
  spinal-transfer prepare stl10 --root data --download
  spinal-transfer reproduce --recipes 'recipes/stl10_*.yaml' --data-root data --seeds 3 --out runs/reproduce

  # the authors' experiment: their training set (no val carved out) and their selection split
  spinal-transfer reproduce --recipes 'recipes/stl10_*.yaml' --protocol paper --out runs/reproduce_paper

  # smoke test on a laptop: the tiny recipe pair on the digits (about a minute on 2 CPU cores)
  spinal-transfer prepare digits --root data
  spinal-transfer reproduce --recipes 'recipes/smoke/*.yaml' --data-root data --seeds 2 --out runs/smoke

  # a SLURM job array of 8 (examples/slurm/): each task runs its share, then anyone collects the tables
  spinal-transfer reproduce --recipes 'recipes/*.yaml' --shard auto --out runs/reproduce
  spinal-transfer reproduce --recipes 'recipes/*.yaml' --collect --out runs/reproduce

Each (recipe, seed) runs in OUT/runs/<recipe>/seed<k>/ with seeds 0..N-1; a spinal recipe brings its
<dataset>_<backbone>_default partner along for the paired test. Rerun the same command after an
interruption: finished runs are skipped, interrupted ones resume; a run folder another process is
training is locked and left to it. --shard K/N runs a share of the runs balanced by estimated cost
(--shard auto reads SLURM_ARRAY_TASK_ID/_COUNT or JOB_COMPLETION_INDEX with auto/N). Overrides
(--protocol, --epochs, --limit-train-batches, --select-on, --device, --batch-size, --img-size, --amp) are
recorded per row; a run folder made with other ones is refused: use another --out. Writes
OUT/results.csv, results.md and results.html; paper numbers come from {PAPER_RESULTS} next to the recipes."""


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `spinal-transfer reproduce`."""
    choices = CONFIG_FIELDS["select_on"].metadata["choices"]
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, metavar="GLOB",
                        help=f"recipe files, quoted glob (default: {DEFAULT_RECIPES})")
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT, metavar="DIR",
                        help=f"folder holding the prepared datasets; a recipe's relative data: is resolved "
                             f"against it (default: {DEFAULT_DATA_ROOT})")
    parser.add_argument("--seeds", type=positive_int, default=None, metavar="N",
                        help=f"run seeds 0..N-1 of every recipe (default: {DEFAULT_SEEDS}; with --collect, as many as "
                             f"the reproduce that wrote --out asked for)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--shard", metavar="K/N", help="run shard K of N (0 <= K < N), or auto / auto/N inside a "
                                                       "SLURM job array or a Kubernetes Indexed Job")
    parser.add_argument("--collect", action="store_true", help="train nothing: write the tables from the finished "
                                                               "runs and say which are missing")
    over = parser.add_argument_group("overrides (recorded per row)")
    over.add_argument("--protocol", choices=CONFIG_FIELDS["protocol"].metadata["choices"], default=None,
                      help="honest (default): best epoch on a val split held out of train; paper: the authors' "
                           "training set and selection split, as each recipe's paper_select_on says")
    over.add_argument("--select-on", choices=choices, default=None,
                      help="split that picks the best epoch under the honest protocol (the training set stays "
                           "the same: this is not the authors' protocol; see --protocol paper)")
    over.add_argument("--epochs", type=positive_int, default=None, metavar="N",
                      help="replace every stage's epochs by N, keeping its lr (smoke tests)")
    over.add_argument("--limit-train-batches", type=positive_int, default=None, metavar="N",
                      help="stop each training epoch after N batches (smoke tests)")
    over.add_argument("--img-size", type=positive_int, metavar="PX", help="crop size for every run")
    recipes_own = dict.fromkeys(SHARED, "each recipe's")
    add_config_args(over, only=("batch_size", "device", "amp"), defaults=recipes_own)
    add_config_args(parser.add_argument_group("speed only (not recorded)"), only=("workers",), defaults=recipes_own)
    track = parser.add_argument_group("experiment tracking, every run (not recorded in the tables)")
    for name in ("log_to", "tracking_uri", "experiment"):
        f = CONFIG_FIELDS[name]
        track.add_argument("--" + name.replace("_", "-"), default=None, help=f.metadata["help"])


def main(args: argparse.Namespace) -> int:
    """0 when every row has all its seeds (a shard: when its own runs finished), 3 when rows are incomplete
    (a run diverged, or, for --collect, runs are not finished yet)."""
    overrides = {k: getattr(args, k) for k in OVERRIDES}
    check_flags({k: v for k, v in overrides.items() if v is not None})        # the ranges train checks
    recipes = find_recipes(args.recipes)
    if args.collect:     # without --seeds, the table keeps the seed count OUT was made with
        seeds = args.seeds or seeds_asked(args.out) or DEFAULT_SEEDS
        rows = collect(recipes, args.data_root, args.out, seeds, overrides)
        return 3 if any(len(r.top1) < r.seeds for r in rows) else 0
    shard = shard_from_env(args.shard) if args.shard else None
    rows = reproduce(recipes, args.data_root, args.out, args.seeds or DEFAULT_SEEDS, overrides, shard)
    incomplete = [r.recipe for r in rows if len(r.top1) < r.seeds]
    if incomplete and shard is None:
        print(f"incomplete rows (see the logs above): {', '.join(incomplete)}", file=sys.stderr)
        return 3
    return 0
