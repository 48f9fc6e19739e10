"""`spinal-transfer predict`."""
from __future__ import annotations

import argparse
import sys

from ..config import CONFIG_FIELDS
from ..errors import ConfigError
from ..deploy.predict import RUNNERS, TOPK, predict, write_csv

EXAMPLES = """\
  spinal-transfer predict bundles/pets photos/ --out preds.csv
  spinal-transfer predict bundles/pets/model.onnx photos/ extra.jpg --topk 3 --out preds.csv
  spinal-transfer predict runs/pets photos/ --batch-size 128 --workers 8 --device cuda
  spinal-transfer predict bundles/pets photos/ --tta --tta-crops 5 --out preds_tta.csv
  spinal-transfer predict bundles/pets photos/ --runner onnx-int8 --out preds_int8.csv
  spinal-transfer predict bundles/pets photos/ --runner torch --device cuda
Folders are searched recursively for images. The CSV has path, label_1, prob_1, ... label_k, prob_k;
unreadable files are skipped and listed on stderr and in OUT.skipped.txt (path<TAB>reason).
--runner auto runs a bundle on the CPU with its int8 ONNX file when it has one (export --quantize int8),
else its ONNX file, else PyTorch; a run folder or checkpoint with PyTorch, an .onnx file with
onnxruntime, and a bundle on a GPU with PyTorch. The last line gives the runner and images/s."""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="BUNDLE_OR_RUN",
                        help="bundle folder, bundle .onnx file, run folder (best.pt) or checkpoint file")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument("--topk", type=int, default=TOPK, help=f"classes per image (default: {TOPK})")
    parser.add_argument("--batch-size", type=int, help=f"images per batch (default: {CONFIG_FIELDS['batch_size'].default})")
    parser.add_argument("--workers", type=int, help="DataLoader worker processes decoding images (default: as in training)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (ONNX: cuda if onnxruntime has it)")
    parser.add_argument("--out", default="predictions.csv", help="CSV to write (default: predictions.csv)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average the softmax over the image and its horizontal mirror")
    parser.add_argument("--tta-crops", type=int, default=0, choices=[0, 5],
                        help="with --tta, also 4 corner crops and the centre crop, each mirrored too (default: 0)")
    parser.add_argument("--runner", default="auto", choices=RUNNERS,
                        help="what runs the model: torch, onnx (the bundle's model.onnx), onnx-int8 (its "
                             "model.int8.onnx) or auto (int8 ONNX, else ONNX, else torch; see below) (default: auto)")
    parser.add_argument("--no-verify", action="store_true",
                        help="use a bundle whose files differ from the digests export recorded in its config.json "
                             "(a bundle edited on purpose); without it such a bundle is refused")


def main(args: argparse.Namespace) -> int:
    if args.topk < 1:
        raise ConfigError(f"--topk must be >= 1, got {args.topk}")
    if args.tta_crops and not args.tta:
        raise ConfigError("--tta-crops needs --tta")
    from ..evaluation.evaluate import TTA

    tta = TTA(flip=True, crops=args.tta_crops) if args.tta else None
    preds = predict(args.model, args.paths, args.batch_size, args.workers, args.device, tta=tta, runner=args.runner,
                    verify=not args.no_verify)
    if tta is not None:
        print(tta.describe(), file=sys.stderr)
    skipped_path = write_csv(preds, args.out, args.topk)
    for path, reason in preds.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"wrote {len(preds.paths)} predictions to {args.out}; {len(preds.skipped)} file(s) skipped "
          f"(listed in {skipped_path})", file=sys.stderr)
    print(f"{len(preds.paths)} images in {preds.seconds:.2f} s with {preds.runner}: "
          f"{preds.images_per_second:.1f} images/s", file=sys.stderr)
    return 0
