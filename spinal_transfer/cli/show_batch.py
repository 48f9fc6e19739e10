"""`spinal-transfer show-batch`."""
from __future__ import annotations

import argparse
import sys

from ..config import CONFIG_FIELDS, add_config_args, given_flags, resolve_config
from ..errors import ConfigError
from . import output_file, replacing

EXAMPLES = """\
  spinal-transfer show-batch --data data/digits --img-size 64 --out batch.png
  spinal-transfer show-batch --data ~/pets --augment trivial --random-erase 0.25 --out pets_batch.png
  spinal-transfer show-batch --recipe recipes/stl10_wrn101_spinal.yaml --data data/stl10 -n 16
Takes the options of `train` (same recipe and flags) and draws the first images of the first training
batch, augmented exactly as the run would (same order, same per-image seeds), denormalized, with their
class names. Nothing is trained and nothing is downloaded: the input size and normalization come from
the backbone's registry entry (--weights only picks the preset)."""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="YAML file of options (see recipes/)")
    parser.add_argument("--out", default="batch.png", metavar="PNG", help="where to write the grid (default: batch.png)")
    parser.add_argument("-n", "--num-images", type=int, default=None, metavar="N",
                        help="images in the grid (default: the batch size, at most 32)")
    add_config_args(parser, only=tuple(k for k in CONFIG_FIELDS if k != "out"))


def main(args: argparse.Namespace) -> int:
    from ..data.splits import check_outside  # lazy: OpenCV, not needed at --help
    from ..training.preview import show_batch  # lazy: no torch at --help

    if args.num_images is not None and args.num_images < 1:
        raise ConfigError(f"--num-images must be >= 1, got {args.num_images}")
    replaced = output_file(args.out, (".png",))   # before the work: a folder or a file of another kind is refused
    cfg = resolve_config(args.recipe, given_flags(args))
    if not cfg.data:
        raise ConfigError("--data DIR is required (or a --recipe that sets data)")
    check_outside(args.out, cfg.data, folder=False)   # a picture there would replace or join the training images
    preview = show_batch(cfg, args.out, args.num_images)
    for path, reason in preview.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    aug = "none: cached features are of unaugmented images" if cfg.cache_features else cfg.augment
    print(f"wrote {preview.path} ({len(preview.indices)} training images, augment {aug})"
          f"{replacing(replaced)}", file=sys.stderr)
    return 0
