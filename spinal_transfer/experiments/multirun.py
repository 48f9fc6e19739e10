"""What the commands that run many runs on one folder (`compare`, `tune`) share: the two modes, which
settings make a different experiment, and why they refuse torchrun.

Modes. `finetune` (the default): every run trains as `train` does, with train's own schedule (its frozen first
epoch(s) included), so the answer is about what the user will train. `frozen`: a fast screen, not what train
does: the backbone stays frozen for the whole run and its features are cached (`features`) in ONE folder for
every run of the command, so the backbone runs once per split and each run trains only its head. Every output
that shows the mode names it with MODE_NAMES. No torch here (the command line's help shows the modes).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence, Union

from ..config import RESUME_SAFE
from ..errors import UserError
from ..runs.rundir import RunDir
from ..utils.stamp import refuse_others

MODES = ("frozen", "finetune")
DEFAULT_MODE = "finetune"
# how the outputs (logs, tables, pages, JSON) name each mode: the screen must never pass for the real thing
MODE_NAMES = {"finetune": "fine-tune (as train)",
              "frozen": "frozen-backbone screen (features cached; not what train does)"}
MODE_HELP = ("finetune: every run trains as `train` does (with train's --freeze-epochs, 0 by default: end to end "
             "from the first step); frozen: a fast screen, not what train does: the backbone stays frozen and its "
             f"features are computed once and shared by every run (default: {DEFAULT_MODE})")
CACHE_DIR = "feature-cache"
RUNS = "runs"            # OUT/runs/<head or recipe>/seed<k>/: the run folders of compare and reproduce
# Settings that may differ between a run (or study) on disk and the one asked for: where and how fast it runs,
# not what it learns (config.RESUME_SAFE, less the schedule and the data, which change results).
IGNORED = (set(RESUME_SAFE) - {"epochs", "stages", "limit_train_batches", "data"}) | {"out"}


PathLike = Union[str, Path]
log = logging.getLogger(__name__)


class MultiRunError(UserError, ValueError):
    """A request to compare or tune that cannot run as given; the message says how to fix it."""


def mode_fields(mode: str, out: Path, cache_dir: str = "", cache_features: bool = False,
                freeze_backbone: bool = False) -> dict:
    """The TrainConfig fields a mode sets. Frozen: one feature cache for every run (OUT/feature-cache unless
    the config names another), so the backbone's features are computed once for all runs. Fine-tune: the
    backbone trains; `cache_features` (the config's) is turned off only when it is on, since a field set here
    for nothing would be warned about as a flag given for nothing. A recipe's `freeze_backbone: true` (a frozen
    tune's best.yaml) that fine-tune mode overrides is said: the runs would train what the recipe kept frozen."""
    if mode not in MODES:
        raise MultiRunError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "finetune" and freeze_backbone:
        log.warning("the recipe keeps the backbone frozen (freeze_backbone: true), but --mode finetune (the default) "
                    "trains it, as train does; give --mode frozen to keep it frozen")
    if mode == "frozen":
        return {"freeze_backbone": True, "cache_features": True, "cache_dir": cache_dir or str(out / CACHE_DIR)}
    return {"freeze_backbone": False, **({"cache_features": False} if cache_features else {})}


def check_out(out: PathLike, data: str, command: str) -> None:
    """Before anything is written to `command`'s --out: not a file, not inside the data folder (its files would
    be read as a class next time: data.splits.check_outside), and not one train run's folder, which would get
    the command's runs/ and tables mixed into it."""
    from ..data.splits import check_outside  # lazy: OpenCV, which this module keeps out of --help too
    from ..runs.rundir import RunDir, user_image  # lazy: torch, which this module keeps out of --help

    check_outside(out, data)
    if RunDir(Path(out).expanduser()).holds_run():
        raise MultiRunError(f"--out {out} is the folder of a train run; give {command} a folder of its own")
    image = user_image(Path(out).expanduser())
    if image is not None:
        raise MultiRunError(f"--out {out} holds images ({image}): it is a data folder, and {command}'s runs there "
                            f"would be read as a class by a train on it; give {command} a folder of its own")


def run_dir(out: PathLike, name: str, seed: int) -> RunDir:
    """Seed `seed` of head or recipe `name`: OUT/runs/<name>/seed<k>."""
    return RunDir(Path(out) / RUNS / name / f"seed{seed}")


def refuse_others_in(out: PathLike, result_files: Sequence[str], csv_columns: Sequence[str]) -> None:
    """`refuse_others` for a command of many runs: its result files, and OUT/runs/, which may hold only run
    folders (a user's own runs/ there would get the command's runs mixed into it)."""
    refuse_others(out, (*result_files, f"{RUNS}/"), csv_columns, run_folder=lambda p: RunDir(p).is_run_folder())


def tracked_as(run: PathLike) -> tuple[Path, str]:
    """A run of compare or reproduce, OUT/runs/<head or recipe>/seed<k>, in the trackers (`train.run`'s track_as):
    in ONE MLflow store, OUT/mlruns.db (not one per head or recipe beside its seeds), named `<head or
    recipe>/seed<k>` (not just `seed0`, which every head and recipe has)."""
    p = Path(run)
    return p.parents[2], f"{p.parent.name}/{p.name}"


def refuse_torchrun(command: str) -> None:
    """A driver of many runs decides per run whether to train, skip or leave it to another process; ranks of one
    torchrun job could decide differently and wait on each other forever. Several processes on one OUT share
    the work instead (one per GPU, or per machine on a shared file system)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MultiRunError(f"{command} is not run under torchrun: start one {command} process per GPU (or machine) "
                            f"on the same --out; they share the work between them")
