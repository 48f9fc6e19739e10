"""`spinal-transfer reproduce`."""
from __future__ import annotations

import argparse
import sys

from ..config import CONFIG_FIELDS
from ..reproduce import (DEFAULT_DATA_ROOT, DEFAULT_OUT, DEFAULT_RECIPES, DEFAULT_SEEDS, PAPER_RESULTS, find_recipes,
                         reproduce)

EXAMPLES = f"""\
  spinal-transfer prepare stl10 --root data --download
  spinal-transfer reproduce --recipes 'recipes/stl10_*.yaml' --data-root data --seeds 3 --out runs/reproduce

  # the published protocol: best epoch chosen on the test split
  spinal-transfer reproduce --recipes 'recipes/stl10_*.yaml' --select-on test --out runs/reproduce_test

  # smoke test: 1 epoch per stage (lrs kept), 5 training batches per epoch; val/test still run in full
  spinal-transfer reproduce --recipes 'recipes/stl10_*.yaml' --seeds 2 --epochs 1 --limit-train-batches 5 \\
      --out runs/smoke

Each (recipe, seed) runs in OUT/runs/<recipe>/seed<k>/ with seeds 0..N-1; a spinal recipe brings its
<dataset>_<backbone>_default partner along for the paired test. Rerun the same command after an
interruption: finished runs are skipped, interrupted ones resume. A run directory made with other
settings (--select-on, --epochs, --limit-train-batches) is refused: use another --out. Writes
OUT/results.csv, results.md and results.html; paper numbers come from {PAPER_RESULTS} next to the recipes."""


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s}")
    return v


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `spinal-transfer reproduce`."""
    choices = CONFIG_FIELDS["select_on"].metadata["choices"]
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, metavar="GLOB",
                        help=f"recipe files, quoted glob (default: {DEFAULT_RECIPES})")
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT, metavar="DIR",
                        help=f"folder holding the prepared datasets; a recipe's relative data: is resolved "
                             f"against it (default: {DEFAULT_DATA_ROOT})")
    parser.add_argument("--seeds", type=_positive_int, default=DEFAULT_SEEDS, metavar="N",
                        help=f"run seeds 0..N-1 of every recipe (default: {DEFAULT_SEEDS})")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--select-on", choices=choices, default=None,
                        help="split that picks the best epoch; test reproduces the published protocol "
                             "(default: the recipe's, val in every shipped recipe)")
    parser.add_argument("--epochs", type=_positive_int, default=None, metavar="N",
                        help="replace every stage's epochs by N, keeping its lr (smoke tests)")
    parser.add_argument("--limit-train-batches", type=_positive_int, default=None, metavar="N",
                        help="stop each training epoch after N batches (smoke tests)")


def main(args: argparse.Namespace) -> int:
    """0 when every row has all its seeds, 3 when a run failed (non-finite loss); errors raise to the CLI."""
    rows = reproduce(find_recipes(args.recipes), args.data_root, args.out, args.seeds, args.select_on,
                     args.epochs, args.limit_train_batches)
    incomplete = [r.recipe for r in rows if len(r.top1) < r.seeds]
    if incomplete:
        print(f"incomplete rows (see the logs above): {', '.join(incomplete)}", file=sys.stderr)
        return 3
    return 0
