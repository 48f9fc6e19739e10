"""`spinal-transfer lr-find`."""
from __future__ import annotations

import argparse
import sys

from ..config import CONFIG_FIELDS, add_config_args, given_flags, resolve_config
from ..errors import ConfigError
from . import number, output_file, replacing

EXAMPLES = """\
  spinal-transfer lr-find --data data/digits --weights bundled --img-size 32 --out lr_find.png
  spinal-transfer lr-find --data ~/pets --backbone timm/resnet50 --optimizer adamw --weight-decay 0.05
  spinal-transfer lr-find --recipe recipes/stl10_wrn101_spinal.yaml --data data/stl10 --num-steps 300
Takes the options of `train` and runs the learning-rate range test on a copy of that run's model
(its data, weights, augmentation, optimizer, backbone lr multiplier, frozen first epoch if any): the lr grows
exponentially from --start-lr to --end-lr over --num-steps batches, stopping once the smoothed loss
exceeds 4x its minimum. Prints the suggested lr (fastai's "valley" rule: half way along the longest
stretch where the loss keeps falling) and writes the curve with the suggestion marked. Then:
  spinal-transfer train --data ~/pets --lr <suggested> ...
On an ImageNet-pretrained backbone the suggestion has measured 3-15x below the lr that fine-tunes best
(benchmarks/bench_lr_auto.py: 7e-5 to 4e-4 against the default 1e-3, 13.5 points lower on average):
read the curve for where the loss blows up rather than taking the suggestion as it is."""


def _positive(kind):
    def parse(s: str):
        v = number(s, kind)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {s}")
        return v
    return parse


def add_args(parser: argparse.ArgumentParser) -> None:
    from ..training.lr_find import DEFAULT_END, DEFAULT_START, DEFAULT_STEPS, RULES  # lazy: no torch at --help

    parser.add_argument("--recipe", help="YAML file of options (see recipes/)")
    parser.add_argument("--out", default="lr_find.png", metavar="PNG", help="the plot (default: lr_find.png)")
    parser.add_argument("--start-lr", type=_positive(float), default=DEFAULT_START,
                        help=f"first lr of the sweep (default: {DEFAULT_START:g})")
    parser.add_argument("--end-lr", type=_positive(float), default=DEFAULT_END,
                        help=f"last lr of the sweep (default: {DEFAULT_END:g})")
    parser.add_argument("--num-steps", type=_positive(int), default=DEFAULT_STEPS,
                        help=f"optimizer steps of the sweep (default: {DEFAULT_STEPS})")
    parser.add_argument("--rule", choices=RULES, default="valley",
                        help="how the lr is suggested (default: valley, fastai's default)")
    add_config_args(parser, only=tuple(k for k in CONFIG_FIELDS if k not in ("out", "lr")))


def main(args: argparse.Namespace) -> int:
    from ..data.splits import check_outside  # lazy: OpenCV, not needed at --help
    from ..training.lr_find import lr_find_for_config  # lazy: no torch at --help

    if args.start_lr >= args.end_lr:
        raise ConfigError(f"--start-lr ({args.start_lr:g}) must be below --end-lr ({args.end_lr:g})")
    if args.num_steps < 10:
        raise ConfigError(f"--num-steps {args.num_steps} is too few for a curve; use at least 10 (default 200)")
    replaced = output_file(args.out, (".png",))   # before the work: a folder or a file of another kind is refused
    cfg = resolve_config(args.recipe, given_flags(args))
    if not cfg.data:
        raise ConfigError("--data DIR is required (or a --recipe that sets data)")
    check_outside(args.out, cfg.data, folder=False)   # a picture there would replace or join the training images
    result = lr_find_for_config(cfg, args.out, start_lr=args.start_lr, end_lr=args.end_lr,
                                num_steps=args.num_steps, rule=args.rule)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{result.describe()}; plot: {args.out}{replacing(replaced)}", file=sys.stderr)
    print(f"{result.suggestion:.3g}")
    return 0
