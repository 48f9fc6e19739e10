"""`spinal-transfer tune`."""
from __future__ import annotations

import argparse
import json

from ..config import CONFIG_FIELDS, add_config_args, given_flags, resolve_config
from ..evaluation.metrics import summary
from ..experiments.multirun import DEFAULT_MODE, MODE_HELP, MODE_NAMES, MODES
from ..experiments.tune import DEFAULT_OUT, DEFAULT_SAMPLER_SEED, DEFAULT_STUDY, DEFAULT_TRIALS, PRUNERS, SEARCHED, tune
from . import positive_int, seed

# TrainConfig fields tune searches or sets itself, so they are not its flags (--epochs is: the longest trial)
CONTROLLED = (*SEARCHED, "out", "freeze_backbone", "cache_features", "select_on")

EXAMPLES = """\
  pip install 'spinal-transfer[tune]'          # Optuna

  # 40 trials, each fine-tuned as `train` does for up to 10 epochs; trial 0 is the untuned defaults
  spinal-transfer tune --data ~/pets --backbone timm/resnet50 --weights default --trials 40 --epochs 10 \\
      --out runs/pets_tune
  spinal-transfer tune --data ~/pets --backbone timm/resnet50 --weights default --trials 60 --epochs 10 \\
      --out runs/pets_tune                      # rerun: continues the same study up to 60 trials

  # a fast screen: frozen backbone, features computed once, every trial trains a head in seconds (its
  # best.yaml trains a frozen backbone too: not what train does by default)
  spinal-transfer tune --data ~/pets --backbone timm/resnet50 --weights default --mode frozen --trials 100 \\
      --out runs/pets_screen

  # retrain the winner, exactly (add --deterministic to the tune command for a bit-identical val metric on CPU)
  spinal-transfer train --recipe runs/pets_tune/best.yaml --out runs/pets_best

  # many machines on one study: a database server, the same --study-name, a shared --out, one seed each
  spinal-transfer tune --data /shared/pets --backbone timm/resnet50 --weights default --trials 200 \\
      --storage postgresql://user:password@dbhost/optuna --study-name pets-r50 --sampler-seed 1 --out /shared/pets_tune

Searches the head (linear, mlp, spinal and their width, depth, splits, dropout, batch norm, shared
weights) and lr, weight decay, label smoothing and epochs (up to --epochs); README "Which head for my
data?" lists the ranges. Every trial has the same seed, split and other options; trials are chosen on
val (TPE) and stopped early when their per-epoch val top-1 falls below the median of earlier trials;
only the best trial is tested. Trial 0 of a new study trains the untuned defaults (these options as
`train` would use them); the recipe is the best trial only if it beats them on val, else the defaults, and
the output says which. Writes OUT/best.yaml (a recipe for train --recipe), OUT/trials.csv and
OUT/tune.html; the study lives in OUT/study.db unless --storage names another."""


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `spinal-transfer tune`: its own, then every train option it does not search or set."""
    parser.add_argument("--trials", type=positive_int, default=DEFAULT_TRIALS, metavar="N",
                        help=f"finished trials the study should have in all; a rerun adds only the missing ones "
                             f"(default: {DEFAULT_TRIALS})")
    parser.add_argument("--mode", choices=MODES, default=DEFAULT_MODE, help=MODE_HELP)
    parser.add_argument("--storage", metavar="URL",
                        help="Optuna RDB storage, e.g. postgresql://user:password@host/db for workers on many "
                             "machines (default: sqlite:///OUT/study.db)")
    parser.add_argument("--study-name", default=DEFAULT_STUDY, metavar="NAME",
                        help=f"study to create or continue in the storage (default: {DEFAULT_STUDY})")
    parser.add_argument("--sampler-seed", type=seed, default=DEFAULT_SAMPLER_SEED, metavar="N",
                        help="seed of the TPE sampler; give each parallel worker its own "
                             f"(default: {DEFAULT_SAMPLER_SEED}). --seed is the training seed of every trial")
    parser.add_argument("--pruner", choices=PRUNERS, default=PRUNERS[0],
                        help="median: stop a trial whose val top-1 after an epoch (from epoch 2, from the 6th "
                             "trial) is below the median of earlier trials; none: never (default: median)")
    parser.add_argument("--recipe", help="YAML file of train options (see recipes/); flags win over it")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default: {DEFAULT_OUT})")
    group = parser.add_argument_group("train options (the same for every trial; --epochs is the most a trial "
                                      "trains)")
    add_config_args(group, only=tuple(n for n in CONFIG_FIELDS if n not in CONTROLLED))


def main(args: argparse.Namespace) -> int:
    base = resolve_config(args.recipe, {k: v for k, v in given_flags(args).items() if k != "out"})
    result = tune(base, args.trials, args.mode, args.out, args.storage, args.study_name, args.sampler_seed,
                  args.pruner)
    print(json.dumps({"mode": MODE_NAMES[result.mode], "best_trial": result.best.number,
                      "params": result.best.params, "val": summary(result.report["val"]),
                      "test": summary(result.report["test"]), "versus_untuned": result.versus_untuned,
                      "recipe": str(result.recipe)}, indent=1))
    return 0
