"""`spinal-transfer compare`."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ..config import CONFIG_FIELDS, add_config_args, given_flags, resolve_config
from ..errors import ConfigError
from ..experiments.compare import CONTROLLED, DEFAULT_OUT, DEFAULT_SEEDS, RESULT_FILES, compare
from ..experiments.multirun import CACHE_DIR, DEFAULT_MODE, MODE_HELP, MODES
from ..models.heads_spec import parse_head_specs
from . import positive_int

EXAMPLES = f"""\
  # fine-tune (default): every head x seed trains as `train` does (each run costs a full training)
  spinal-transfer compare --data ~/pets --backbone timm/resnet50 --weights default \\
      --heads linear spinal spinal:vgg mlp:hidden=1024 --seeds 3 --out runs/pets_heads

  # a fast screen first: frozen backbone, its features computed once, every run trains its head in seconds
  # (answers "which head on a frozen backbone?", not what train does; confirm the winner without --mode frozen)
  spinal-transfer compare --data ~/pets --backbone timm/resnet50 --weights default --mode frozen \\
      --heads linear spinal:width=256,layers=6 spinal:vgg,width=1024 --seeds 5 --epochs 10 --out runs/pets_screen

  # the best configuration of a search (tune's best.yaml) against a linear head, over 5 seeds
  spinal-transfer compare --recipe runs/tune/best.yaml --heads linear spinal --seeds 5 --out runs/check

HEAD SPECS: KIND[:OPTION,...]. linear | mlp[:hidden=1024-512,dropout=0.2] |
spinal[:vgg|resnet][,width=256,layers=6,splits=2,shared=true,dropout=0.3]. Options not given keep the
other flags' (or the recipe's) values. The first head is the reference that every other head is tested
against. Runs go to OUT/runs/<head>/seed<k>/ (seeds 0..N-1, one split for all: --split-seed); in frozen
mode all of them share OUT/feature-cache. The tables and the log name the mode. Rerun the same command
after an interruption: finished runs are skipped, interrupted ones resume; several compare processes may
share one --out (each ends when all runs are done). Writes OUT/{', OUT/'.join(RESULT_FILES)}."""


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `spinal-transfer compare`: its own, then every train option it does not set itself."""
    parser.add_argument("--heads", nargs="+", required=True, metavar="SPEC",
                        help="head specs, the first is the reference, e.g. linear spinal spinal:vgg "
                             "spinal:width=256,layers=6 mlp:hidden=1024 (see below)")
    parser.add_argument("--seeds", type=positive_int, default=DEFAULT_SEEDS, metavar="N",
                        help=f"train every head with seeds 0..N-1 (default: {DEFAULT_SEEDS})")
    parser.add_argument("--mode", choices=MODES, default=DEFAULT_MODE, help=MODE_HELP)
    parser.add_argument("--recipe", help="YAML file of train options (see recipes/); flags win over it")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help=f"--mode frozen: where the backbone's features are computed once and kept for every run "
                             f"(default: OUT/{CACHE_DIR}); --mode finetune caches nothing")
    group = parser.add_argument_group("train options (the same for every run)")
    add_config_args(group, only=tuple(n for n in CONFIG_FIELDS if n not in CONTROLLED and n != "cache_dir"))


def main(args: argparse.Namespace) -> int:
    """0 when every head has all its seeds, 3 when a run could not finish (diverged, or in use elsewhere)."""
    heads = parse_head_specs(args.heads)
    flags = {k: v for k, v in given_flags(args).items() if k not in ("out", "cache_dir")}
    base = resolve_config(args.recipe, flags)
    if args.cache_dir:              # compare turns feature caching on itself (--mode frozen), so it is no train flag
        if args.mode != "frozen":
            raise ConfigError(f"--cache-dir is for --mode frozen (features cached once); --mode {args.mode} trains "
                              f"every run end to end and caches nothing")
        base = dataclasses.replace(base, cache_dir=args.cache_dir)
    results = compare(base, heads, args.seeds, args.mode, args.out)
    if not results.complete:
        missing = [h.head.text for h in results.heads if len(h.metrics) < h.seeds]
        print(f"heads without all their seeds (see the log above): {', '.join(missing)}", file=sys.stderr)
        return 3
    return 0
