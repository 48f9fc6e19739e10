"""`spinal-transfer evaluate`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = """\
  spinal-transfer evaluate runs/pets                       # the run's own test split, as in report.json
  spinal-transfer evaluate runs/pets --split val --out runs/pets/eval_val
  spinal-transfer evaluate runs/pets/checkpoints/last.pt --data ~/other_pets --split test --full
Without --data the run's recorded split (RUN/splits.json) is used, so the numbers equal report.json's.
Another --data folder is read as it is: its SPLIT/ folder, or all its images when it has no split
folders (a split is never carved out of it). Which images were used is printed on stderr."""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_OR_CHECKPOINT")
    parser.add_argument("--data", help="image folder (default: the run's own data folder and recorded splits)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--out", metavar="DIR", help="write metrics_<split>.json and predictions_<split>.csv there")
    parser.add_argument("--full", action="store_true", help="also print per-class metrics and the confusion matrix")


def main(args: argparse.Namespace) -> int:
    from ..checkpoint import atomic_write_text
    from ..evaluation import evaluate, predictions_csv
    from ..metrics import summary

    ev = evaluate(args.run, args.data, args.split, args.device, args.batch_size, args.workers)
    print(f"evaluated {ev.source}", file=sys.stderr)
    m = ev.metrics
    print(json.dumps(m if args.full else {**summary(m), "num_samples": m["num_samples"],
                                           "num_skipped_files": m["num_skipped_files"]}, indent=1))
    if args.out:
        out = Path(args.out)
        atomic_write_text(out / f"metrics_{args.split}.json", json.dumps({**m, "images": ev.source}, indent=1))
        atomic_write_text(out / f"predictions_{args.split}.csv", predictions_csv(ev.samples, ev.outputs, ev.classes))
        print(f"wrote {out / f'metrics_{args.split}.json'} and {out / f'predictions_{args.split}.csv'}",
              file=sys.stderr)
    return 0
