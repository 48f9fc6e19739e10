"""`spinal-transfer export`."""
from __future__ import annotations

import argparse

from ..export import ATOL, CARD_FILE, CONFIG_FILE, FORMAT_FILES, WEIGHTS_FILE, export

EXAMPLES = """\
  spinal-transfer export runs/pets --out bundles/pets
  spinal-transfer export runs/pets --out bundles/pets --format export torchscript onnx
  spinal-transfer export runs/pets/checkpoints/last.pt --out bundles/pets_last --format onnx
RUN uses RUN/checkpoints/best.pt. Every format is read back and compared with the eager model
(max abs logit difference <= --atol) before it is kept; ONNX needs the extra: pip install -e ".[onnx]"."""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="run folder (uses checkpoints/best.pt) or checkpoint file")
    parser.add_argument("--out", required=True, metavar="DIR", help="bundle folder to write")
    parser.add_argument("--format", dest="formats", action="extend", nargs="+", default=[],
                        choices=list(FORMAT_FILES), help="extra format(s), repeatable; the bundle is always written")
    parser.add_argument("--atol", type=float, default=ATOL,
                        help=f"largest max abs logit difference accepted per format (default: {ATOL:g})")


def main(args: argparse.Namespace) -> int:
    config = export(args.run, args.out, args.formats, args.atol)
    print(f"wrote {args.out}: {WEIGHTS_FILE}, {CONFIG_FILE}, {CARD_FILE}")
    for fmt, f in config["formats"].items():
        print(f"  {fmt}: {f['file']} ({f['method']}, max abs logit difference {f['max_abs_diff']:.2g})")
    return 0
