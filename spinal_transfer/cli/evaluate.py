"""`spinal-transfer evaluate`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import add_config_args, check_flags, given_flags
from ..errors import ConfigError
from ..utils.stamp import json_generator, refuse_others

# the flags evaluate shares with train, generated from the same TrainConfig fields
SHARED = ("tta", "tta_crops", "batch_size", "workers", "device")

EXAMPLES = """\
  spinal-transfer evaluate runs/pets                       # the run's own test split (report.json's top-1,
                                                           # with TTA if the run trained with --tta)
  spinal-transfer evaluate runs/pets --split val --out runs/pets/eval_val
  spinal-transfer evaluate runs/pets/checkpoints/last.pt --data ~/other_pets --split test --full
  spinal-transfer evaluate runs/pets --tta                 # also with test-time augmentation (image + mirror)
  spinal-transfer evaluate runs/pets --tta --tta-crops 5   # ... and 4 corner + centre crops (12 views)
Without --data the run's recorded split (RUN/splits.json) is used, so the accuracy metrics equal report.json's
(its loss too with --no-calibration: see below).
A --data folder that holds most of the run's train and SPLIT images at their recorded paths and sizes
(its data folder, moved or copied) is read as the run's own: its recorded split is used.
Another --data folder is read as it is: its SPLIT/ folder (no train/ needed), or all its images when it
has no split folders (a split is never carved out of it). Its class folders are matched to the model's
classes by name: any subset, in any order; one the model does not know is refused. Which images were
used is printed on stderr. With --tta the metrics are printed without and with TTA (mean softmax over
the views); metrics_<split>.json holds the TTA ones, its "tta" entry the setting, and "without_tta" the
plain summary.
The loss and the predictions' probabilities are calibrated: softmax(logits / T) with the temperature
the run fitted on its val split (metrics "temperature"); --no-calibration gives the plain softmax, whose
loss is report.json's. Accuracy metrics are the same either way."""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_OR_CHECKPOINT")
    parser.add_argument("--data", help="image folder (default: the run's own data folder and recorded splits)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--out", metavar="DIR", help="write metrics_<split>.json, predictions_<split>.csv and "
                                                     "report.html (the page a run has, for this split) there")
    parser.add_argument("--full", action="store_true", help="also print per-class metrics and the confusion matrix")
    add_config_args(parser, only=SHARED, defaults={"batch_size": "the run's", "workers": "the run's"})
    parser.add_argument("--no-calibration", dest="calibrated", action="store_false",
                        help="the plain softmax, without the run's temperature (default: calibrated)")


def main(args: argparse.Namespace) -> int:
    from ..evaluation.evaluate import TTA, evaluate, write_predictions  # lazy: no torch at --help
    from ..evaluation.metrics import summary  # lazy: no torch at --help
    from ..runs.rundir import RunDir  # lazy: no torch at --help
    from ..utils.atomic import atomic_write_text  # lazy: no torch at --help

    flags = check_flags({k: v for k, v in given_flags(args).items() if k in SHARED})
    names = (f"metrics_{args.split}.json", f"predictions_{args.split}.csv", "report.html")
    if args.out:
        _check_out(Path(args.out), args.split, names)
    if flags.get("tta_crops") and not flags.get("tta"):
        raise ConfigError("--tta-crops needs --tta")
    # without --tta: as the run was tested (its report.json's metrics are TTA ones when it trained with --tta)
    tta = (TTA(flip=True, crops=flags.get("tta_crops", 0)) if flags.get("tta") else
           None if flags.get("tta") is False else "run")
    ev = evaluate(args.run, args.data, args.split, flags.get("device", "auto"), flags.get("batch_size"),
                  flags.get("workers"), tta=tta, calibrated=args.calibrated)
    tta = ev.tta
    print(f"evaluated {ev.source}" + (f"; {ev.tta.describe()}" + (" as the run was tested (--tta false: "
                                                                  "without)" if "tta" not in flags else "")
                                      if ev.tta else ""), file=sys.stderr)
    source = Path(args.run)              # a run folder, or its checkpoints/best.pt
    best_of = source if source.is_dir() else source.parent.parent if source.parts[-2:] == ("checkpoints", "best.pt") \
        else None
    unfinished = RunDir(best_of).unfinished() if best_of else None
    if unfinished:                      # its best epoch so far, and no temperature fitted yet (that comes last)
        print(f"note: {unfinished}; these are its best epoch so far, uncalibrated (temperature 1)", file=sys.stderr)
    m = ev.metrics
    shown = m if args.full else {**summary(m), "num_samples": m["num_samples"],
                                 "num_skipped_files": m["num_skipped_files"], "temperature": m["temperature"]}
    if tta is not None:
        shown = {"without_tta": summary(ev.plain_metrics), "with_tta": {**shown, "tta": m["tta"]}}
        print(f"top1 {ev.plain_metrics['top1']:.4f} without TTA, {m['top1']:.4f} with TTA "
              f"({m['top1'] - ev.plain_metrics['top1']:+.4f})", file=sys.stderr)
    print(json.dumps(shown, indent=1))
    if args.out:
        out = Path(args.out)
        replaced = [n for n in names if (out / n).exists()]        # ours (_check_out): said, never silent
        record = {**json_generator(), **m, "images": ev.source}
        if tta is not None:
            record["without_tta"] = summary(ev.plain_metrics)
        atomic_write_text(out / f"metrics_{args.split}.json", json.dumps(record, indent=1))
        write_predictions(out / f"predictions_{args.split}.csv", ev.samples, ev.outputs, ev.classes)
        page = _page(args, ev, out)
        print(f"wrote {out / f'metrics_{args.split}.json'}, {out / f'predictions_{args.split}.csv'} and {page}"
              + (f" (replacing the {', '.join(replaced)} that were there)" if replaced else ""), file=sys.stderr)
    return 0


def _check_out(out: Path, split: str, names: tuple[str, ...]) -> None:
    """Before evaluating: --out is a folder, not a run's (its report.html would be replaced by this page), and
    holds none of the user's own files under `names` (the ones it writes)."""
    from ..evaluation.interpret import prediction_header  # lazy: no torch at --help
    from ..runs.rundir import RunDir  # lazy: no torch at --help

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for metrics_{split}.json, predictions_{split}.csv "
                          f"and report.html")
    if RunDir(out).state() != "new":
        raise ConfigError(f"--out {out} is a run folder, whose report.html this page would replace; give another "
                          f"folder, e.g. --out {out / f'eval_{split}'}")
    refuse_others(out, names, prediction_header(1, topk=0))     # the columns every predictions CSV begins with


def _page(args: argparse.Namespace, ev, out: Path) -> Path:
    """report.html of this evaluation: the run's settings and curves, this split's analysis."""
    from ..evaluation.metrics import summary  # lazy: no torch at --help
    from ..evaluation.report_page import WITHOUT_TTA, run_settings, write_evaluation_html  # lazy: no torch at --help
    from ..runs.rundir import RunDir, load_run_checkpoint  # lazy: no torch at --help

    source = Path(args.run)
    run = RunDir(source if source.is_dir() else source.parent.parent)
    report = run.read_report() if run.is_finished() else None
    cfg = load_run_checkpoint(source)["config"]
    return write_evaluation_html(out / "report.html", ev.metrics, out / f"predictions_{args.split}.csv", ev.classes,
                                 {**run_settings(cfg, report, {args.split: ev.metrics["num_samples"]}),
                                  "images evaluated": ev.source, "probabilities": _probabilities(ev.metrics)},
                                 run.read_metrics() or None,
                                 [tuple(x) for x in ev.metrics["skipped_files"]], split=args.split,
                                 title=f"{run.path.name}: {args.split}", best_epoch=report and report["best_epoch"],
                                 other_metrics={WITHOUT_TTA: summary(ev.plain_metrics)} if ev.plain_metrics else None)


def _probabilities(metrics: dict) -> str:
    t = metrics["temperature"]
    return f"softmax(logits / T), T = {t:.3f} (the run's calibration)" if t != 1.0 else "plain softmax (T = 1)"
