"""`spinal-transfer predict`."""
from __future__ import annotations

import argparse
import sys

from ..config import add_config_args, check_flags, given_flags
from ..deploy.predict import RUNNERS, TOPK, predict, write_csv
from ..errors import ConfigError, DataError
from ..evaluation.evaluate import TTA
from . import output_file, replacing

# the flags predict shares with train, generated from the same TrainConfig fields (ONNX: --device cuda if
# onnxruntime has it)
SHARED = ("tta", "tta_crops", "batch_size", "workers", "device")

EXAMPLES = """\
  spinal-transfer predict bundles/pets photos/ --out preds.csv
  spinal-transfer predict bundles/pets/model.onnx photos/ extra.jpg --topk 3 --out preds.csv
  spinal-transfer predict runs/pets photos/ --batch-size 128 --workers 8 --device cuda
  spinal-transfer predict bundles/pets photos/ --tta --tta-crops 5 --out preds_tta.csv
  spinal-transfer predict bundles/pets photos/ --runner onnx-int8 --out preds_int8.csv
  spinal-transfer predict bundles/pets photos/ --runner torch --device cuda
  spinal-transfer predict bundles/pets photos/ --min-confidence 0.8 --out preds.csv
Folders are searched recursively for images. The CSV has path, label_1, prob_1, ... label_k, prob_k;
unreadable files are skipped and listed on stderr and in OUT.skipped.txt (path<TAB>reason).
--runner auto runs a bundle on the CPU with its int8 ONNX file when it has one (export --quantize int8),
else its ONNX file, else PyTorch; a run folder or checkpoint with PyTorch, an .onnx file with
onnxruntime, and a bundle on a GPU with PyTorch. The last line gives the runner and images/s.
Probabilities are calibrated: softmax(logits / T) with the temperature fitted on the run's val split
(--no-calibration: the plain softmax). --min-confidence P adds a `prediction` column: the top class, or
`uncertain` where its probability is below P; the number of uncertain rows is printed."""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="BUNDLE_OR_RUN",
                        help="bundle folder, bundle .onnx file, run folder (best.pt) or checkpoint file")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument("--topk", type=int, default=TOPK, help=f"classes per image (default: {TOPK})")
    parser.add_argument("--out", default="predictions.csv", help="CSV to write (default: predictions.csv); an "
                        "existing .csv file is replaced, and its 'wrote' line says so; any other file is refused")
    add_config_args(parser, only=SHARED, defaults={"workers": "as in training"},
                    texts={"tta": "predict with test-time augmentation: the mean softmax over each image and its "
                                  "mirror (slower; the CSV's probabilities are those means)"})
    parser.add_argument("--runner", default="auto", choices=RUNNERS,
                        help="what runs the model: torch, onnx (the bundle's model.onnx), onnx-int8 (its "
                             "model.int8.onnx) or auto (int8 ONNX, else ONNX, else torch; see below) (default: auto)")
    parser.add_argument("--no-calibration", dest="calibrated", action="store_false",
                        help="the plain softmax, without the model's temperature (default: calibrated)")
    parser.add_argument("--min-confidence", type=float, metavar="P",
                        help="write `uncertain` as the prediction of images whose top probability is below P, in "
                             "a `prediction` column, and count them")
    parser.add_argument("--no-verify", action="store_true",
                        help="use a bundle whose files or config.json (class names, preprocessing, temperature) "
                             "differ from the digests export recorded in its config.json (a bundle edited on "
                             "purpose); without it such a bundle is refused")


def main(args: argparse.Namespace) -> int:
    if args.topk < 1:
        raise ConfigError(f"--topk must be >= 1, got {args.topk}")
    flags = check_flags({k: v for k, v in given_flags(args).items() if k in SHARED})
    if flags.get("tta_crops") and not flags.get("tta"):
        raise ConfigError("--tta-crops needs --tta")
    if args.min_confidence is not None and not 0 <= args.min_confidence <= 1:
        raise ConfigError(f"--min-confidence must be a probability in [0, 1], got {args.min_confidence}")
    # said, never silent: they may hold another model's predictions and skip list
    replaced = output_file(args.out, (".csv",))
    replaced_list = output_file(f"{args.out}.skipped.txt", (".txt",), option="--out's skip list")
    tta = TTA(flip=True, crops=flags.get("tta_crops", 0)) if flags.get("tta") else None
    preds = predict(args.model, args.paths, flags.get("batch_size"), flags.get("workers"), flags.get("device", "auto"),
                    tta=tta, runner=args.runner, calibrated=args.calibrated,
                    verify=not args.no_verify, min_confidence=args.min_confidence)
    print(preds.probabilities, file=sys.stderr)
    if tta is not None:
        print(TTA.from_dict(preds.tta).describe(), file=sys.stderr)     # as used: without a mirror for --hflip 0
    for path, reason in preds.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if not preds.paths:
        raise DataError(f"none of the {len(preds.skipped)} image file(s) could be read (each is named above with "
                        f"the reason); nothing was written to {args.out}")
    skipped_path = write_csv(preds, args.out, args.topk, args.min_confidence)
    print(f"wrote {len(preds.paths)} predictions to {args.out}{replacing(replaced)}; {len(preds.skipped)} file(s) "
          f"skipped (listed in {skipped_path}" + (", replacing the list that was there)" if replaced_list else ")"),
          file=sys.stderr)
    if args.min_confidence is not None:
        print(f"{int(preds.uncertain(args.min_confidence).sum())} of {len(preds.paths)} image(s) uncertain: top "
              f"probability below {args.min_confidence:g} (softmax(logits / T), T = {preds.temperature:.3f})",
              file=sys.stderr)
    print(f"{len(preds.paths)} images in {preds.seconds:.2f} s with {preds.runner}: "
          f"{preds.images_per_second:.1f} images/s", file=sys.stderr)
    return 0
