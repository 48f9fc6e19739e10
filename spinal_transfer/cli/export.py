"""`spinal-transfer export`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..deploy.export import (
    ATOL,
    CARD_FILE,
    CONFIG_FILE,
    FORMAT_FILES,
    MAX_ACCURACY_DROP,
    QUANTIZE,
    STANDALONE,
    WEIGHTS_FILE,
    check_out,
    export,
    format_check,
)
from ..errors import ConfigError
from . import finite_nonnegative

EXAMPLES = f"""\
  spinal-transfer export runs/pets --out bundles/pets
  spinal-transfer export runs/pets --out bundles/pets --format export torchscript onnx
  spinal-transfer export runs/pets/checkpoints/last.pt --out bundles/pets_last --format onnx
  spinal-transfer export runs/pets --out bundles/pets --format onnx --quantize int8
  spinal-transfer export runs/pets --out bundles/pets --format onnx --quantize int8 --max-accuracy-drop 2
  spinal-transfer export runs/pets --out bundles/pets --format onnx --quantize int8 --force
RUN uses RUN/checkpoints/best.pt. Every format is read back and compared with the eager model
(max abs logit difference <= --atol) before it is kept; ONNX needs the extra: pip install -e ".[onnx]".
--quantize int8 also writes model.int8.onnx (onnxruntime static int8, for CPUs): calibrated on up to 512
of the run's train images (preprocessed as evaluation), then top-1 of fp32 ONNX and of int8 is measured
on the run's val split (test when it has none) and both are recorded in config.json. When int8 loses
more than --max-accuracy-drop points (default {MAX_ACCURACY_DROP:g}), the nodes around the activations int8
represents worst are kept in fp32 (1, 2, 4, then 8 of them; recorded in config.json); when that does not
hold the drop either, the export fails and changes nothing, unless --force.
--data DIR: the run's data folder at a new place (or a copy) is read as the run's own. Another labelled folder
is never calibrated on the images its guard scores: its train/ calibrates and its val/ (else test/) is scored;
without that pair its images are split in two, stratified by class with seed 0, half for the guard; byte-identical
copies of calibration images are not scored. A line on stderr says which images did which.
Predict with it: `spinal-transfer predict BUNDLE PHOTOS --runner onnx-int8` (or auto)."""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="run folder (uses checkpoints/best.pt) or checkpoint file")
    parser.add_argument("--out", required=True, metavar="DIR", help="bundle folder to write")
    parser.add_argument("--format", dest="formats", action="extend", nargs="+", default=[],
                        choices=list(FORMAT_FILES), help="extra format(s), repeatable; the bundle is always written")
    parser.add_argument("--atol", type=finite_nonnegative, default=ATOL,
                        help=f"largest max abs logit difference accepted per format (default: {ATOL:g})")
    parser.add_argument("--quantize", choices=QUANTIZE,
                        help="also write model.int8.onnx, quantized from model.onnx (implies --format onnx), "
                             "calibrated on the run's train images and checked on its val (or test) split")
    parser.add_argument("--max-accuracy-drop", type=finite_nonnegative, default=MAX_ACCURACY_DROP, metavar="POINTS",
                        help="with --quantize: the most top-1 percentage points int8 may lose against fp32 ONNX, "
                             f">= 0 (default: {MAX_ACCURACY_DROP:g}; 0: int8 must score as fp32 does)")
    parser.add_argument("--data", metavar="DIR", help="with --quantize: the run's data folder, if it moved since "
                                                      "training (default: the one the run recorded), or another "
                                                      "labelled folder (calibration and guard on disjoint parts)")
    parser.add_argument("--force", action="store_true",
                        help="with --quantize: keep the int8 file even when it loses more than --max-accuracy-drop")


def main(args: argparse.Namespace) -> int:
    if args.quantize is None and (args.force or args.data or args.max_accuracy_drop != MAX_ACCURACY_DROP):
        raise ConfigError("--max-accuracy-drop, --force and --data apply to --quantize int8 only")
    earlier = check_out(Path(args.out))
    config = export(args.run, args.out, args.formats, args.atol, quantize=args.quantize,
                    max_accuracy_drop=args.max_accuracy_drop, force=args.force, data=args.data)
    if earlier:
        print(f"replaced the earlier bundle in {args.out} ({', '.join(f.name for f in earlier)})")
    print(f"wrote {args.out}: {WEIGHTS_FILE}, {CONFIG_FILE}, {CARD_FILE}")
    for fmt, f in config["formats"].items():
        print(f"  {fmt}: {f['file']} ({format_check(f)})")
    if "onnx" in config["formats"]:
        print(f"  {STANDALONE.name}: predicts with the ONNX file without spinal-transfer (see {CARD_FILE})")
    if not config.get("temperature"):       # last.pt, a run still training: its bundle would pass for calibrated
        from ..evaluation.calibration import probabilities_note  # lazy: no torch at --help

        print(f"note: {probabilities_note(config)}", file=sys.stderr)
    int8 = config["formats"].get("onnx-int8")
    if int8 is not None:
        print(f"int8: calibrated on {int8['calibration_images']} images ({int8['calibration_source']}); the accuracy "
              f"guard scored {int8['eval_images']} others ({int8['eval_source']})", file=sys.stderr)
        for warning in int8["warnings"]:
            print(f"warning: int8: {warning}", file=sys.stderr)
        if int8["forced"]:
            print(f"warning: kept {int8['file']} with --force although it loses {int8['top1_drop_points']:.2f} "
                  f"top-1 points (more than --max-accuracy-drop {int8['max_accuracy_drop']:g})", file=sys.stderr)
    return 0
