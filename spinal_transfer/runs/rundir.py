"""A run folder: the one owner of its layout, its lock, its finished marker and its skip log.

No other module builds a path inside a run folder by hand: they ask a `RunDir` for it. Files are written
atomically (temporary file, then rename), so a kill at any moment leaves each file old or new, never torn.

Layout (README, "What lands in RUN/"):

    config.yaml  classes.json  splits.json  metrics.jsonl  report.json  report.html  test_predictions.csv
    skipped_files.txt  train.log  checkpoints/{best,last,stage_best}.pt  plots/*.png  .lock

`report.json` is written last: its presence is the one marker of a finished run (`is_finished`).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from ..config import TrainConfig
from ..data.images import IMG_EXTENSIONS
from ..data.splits import changed_splits, recorded_fingerprints
from ..errors import CheckpointError, ResourceError, RunFolderError
from ..utils.atomic import TMP_SUFFIX, atomic_write_text, system_error
from ..utils.stamp import is_ours
from .checkpoint import load_checkpoint

PathLike = Union[str, os.PathLike]

# Every file and folder a run writes; --overwrite removes these and nothing else.
OWN_FILES = ("config.yaml", "classes.json", "splits.json", "metrics.jsonl", "report.json", "report.html",
             "test_predictions.csv", "skipped_files.txt", "train.log", "lr_find.png",
             "lr_find.json", "tracking.json", "tracking.json.damaged")
OWN_DIRS = ("checkpoints", "plots", "tensorboard", "wandb")


def default_run_name(backbone: str, head: str, now: Optional[datetime.datetime] = None) -> str:
    """runs/<backbone>-<head>-<date-time>: a new folder per run, sortable by time (-2, -3, ... when two runs
    start in the same second)."""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    name = backbone.split("/")[-1].replace(":", "_").replace("/", "_")
    base = Path("runs") / f"{name}-{head}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return str(path)


class RunDir:
    """Paths, state and atomic writes of one run folder."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._lock_fd: Optional[int] = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # --- paths ----------------------------------------------------------------------------------
    config = property(lambda self: self.path / "config.yaml")
    classes = property(lambda self: self.path / "classes.json")
    splits = property(lambda self: self.path / "splits.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    report = property(lambda self: self.path / "report.json")
    report_html = property(lambda self: self.path / "report.html")
    predictions = property(lambda self: self.path / "test_predictions.csv")
    skipped = property(lambda self: self.path / "skipped_files.txt")
    log = property(lambda self: self.path / "train.log")
    lr_find = property(lambda self: self.path / "lr_find.json")     # train --lr auto: the range test it ran
    checkpoints = property(lambda self: self.path / "checkpoints")
    best = property(lambda self: self.path / "checkpoints" / "best.pt")
    last = property(lambda self: self.path / "checkpoints" / "last.pt")
    stage_best = property(lambda self: self.path / "checkpoints" / "stage_best.pt")
    plots = property(lambda self: self.path / "plots")
    lock_file = property(lambda self: self.path / ".lock")

    def plot(self, name: str) -> Path:
        return self.plots / name

    # --- state ----------------------------------------------------------------------------------
    def holds_run(self) -> bool:
        """A run was started here (its config, metrics or a checkpoint exist)."""
        return any(p.exists() for p in (self.config, self.metrics, self.last, self.best))

    def is_run_folder(self) -> bool:
        """A run's folder, or one a run is being started in (the lock it takes before it writes anything): what a
        command's folder of runs may hold (`utils.stamp.stray_run`)."""
        return self.holds_run() or self.lock_file.exists()

    def is_finished(self) -> bool:
        """The one marker of a finished run: report.json, which training writes last."""
        return self.report.is_file()

    def state(self) -> str:
        """finished, interrupted (has last.pt to resume from), started (config but no checkpoint yet) or new."""
        if self.is_finished():
            return "finished"
        if self.last.is_file():
            return "interrupted"
        return "started" if self.holds_run() else "new"

    def unfinished(self) -> Optional[str]:
        """None for a finished run (or no run); else how far it got and how to finish it, in a sentence."""
        state = self.state()
        if state in ("finished", "new"):
            return None
        done = len(self.read_metrics())
        total = self.read_config().total_epochs() if self.config.is_file() else "?"
        holder = self.lock_holder()
        how = f"{holder} is training it now" if holder else \
            f"`spinal-transfer train --resume {self.path}` finishes it{self._made_by()}" if state == "interrupted" \
            else "it stopped before its first checkpoint: train it again"
        return f"{self.path} has not finished ({done} of {total} epochs done); {how}"

    def _made_by(self) -> str:
        """For a run inside a compare/reproduce OUT/runs/<name>/seed<k>/ or a tune OUT/trials/trial<n>/ folder: that
        rerunning the command resumes it too (with the rest of its runs), in words; "" for a run of its own."""
        inside = self.path.parent.name == "trials" or self.path.parent.parent.name == "runs"
        return (", or rerunning the compare, reproduce or tune command that made it (it resumes its runs)"
                if inside else "")

    def own_files(self) -> list[Path]:
        """Everything here that a run wrote (what --overwrite may remove)."""
        names = [self.path / n for n in OWN_FILES] + [self.path / d for d in OWN_DIRS]
        return [p for p in names if p.exists()] + sorted(self.path.glob(f".*{TMP_SUFFIX}"))

    # --- reading --------------------------------------------------------------------------------
    def read_config(self):
        if not self.config.is_file():
            raise RunFolderError(f"{self.path} is not a run folder (no {self.config.name})")
        return TrainConfig.from_yaml(self.config, saved=True)

    def read_json(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise RunFolderError(f"{path} does not exist") from None
        except (ValueError, OSError) as e:
            raise RunFolderError(f"{path} is unreadable ({e}); the run folder is damaged") from None

    def read_report(self) -> dict:
        return self.read_json(self.report)

    def read_classes(self) -> list[str]:
        return self.read_json(self.classes)

    def read_metrics(self) -> list[dict]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def check_own(self, ckpt: dict, path: Path, instead: str) -> None:
        """CheckpointError (saying `instead`) when `ckpt`, read from `path` in this folder, is another run's: its
        split fingerprints differ from splits.json's (a checkpoint copied in from a run on other images or labels
        would be resumed, evaluated or exported as this run's, with this run's report), or its backbone or head
        from config.yaml's (a run on the same images: a resume named flags the user never gave as the change).
        Unchecked where either side has none (a run from before fingerprints)."""
        recorded = recorded_fingerprints(self.read_json(self.splits)) if self.splits.is_file() else None
        if changed_splits(ckpt.get("split_fingerprints"), recorded):
            raise CheckpointError(f"{path} comes from another run (its split fingerprints differ from {self.splits}'s: "
                                  f"other images or labels); {instead}")
        mine = self.read_config().to_dict() if self.config.is_file() else {}
        for key in ("backbone", "head"):
            if key in mine and key in ckpt.get("config", {}) and ckpt["config"][key] != mine[key]:
                raise CheckpointError(f"{path} comes from another run (its {key} {ckpt['config'][key]!r} is not "
                                      f"{self.config}'s {mine[key]!r}); {instead}")

    # --- writing (rank 0) -----------------------------------------------------------------------
    def write_text(self, path: Path, text: str) -> None:
        atomic_write_text(path, text)

    def write_json(self, path: Path, obj: Any) -> None:
        atomic_write_text(path, json.dumps(obj, indent=1) + "\n")

    def append_metrics(self, row: dict) -> None:
        try:
            with self.metrics.open("a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise system_error(e, self.metrics) from None

    def keep_metrics_until(self, epoch: int) -> None:
        """Drop metric rows after `epoch` (1-based): epochs a killed run logged after its last checkpoint."""
        rows = [r for r in self.read_metrics() if r["epoch"] <= epoch]
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))

    def remove_stray_temps(self) -> list[Path]:
        """Temporary files an interrupted atomic write left behind (kill -9 mid-save); removed on the next start."""
        stray = [p for d in (self.path, self.checkpoints, self.plots) if d.is_dir()
                 for p in d.glob(f".*{TMP_SUFFIX}")]
        for p in stray:
            p.unlink(missing_ok=True)
        return stray

    def clear(self) -> list[Path]:
        """--overwrite: remove what a run wrote here, nothing else; returns what was removed."""
        import shutil

        removed = self.own_files()
        for p in removed:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        return removed

    def set_aside_report(self) -> Optional[Path]:
        """A finished run that is extended is unfinished again until it ends: its report moves aside
        (report-epoch<N>.json), so the finished marker never describes weights that are gone."""
        if not self.report.is_file():
            return None
        epoch = self.read_report().get("epochs_trained", "x")
        aside = self.path / f"report-epoch{epoch}.json"
        os.replace(self.report, aside)
        return aside

    # --- the lock -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of this folder by this process for the block. A POSIX lock (fcntl): the kernel drops it
        when the process dies, even by kill -9, so a killed run never leaves it stuck; forked DataLoader workers
        do not inherit it; it works on NFS. The lock file holds who has it, for the message of the next one."""
        made = [p for p in (self.path, *self.path.parents) if not p.exists()]     # folders this lock creates
        new_lock = not self.lock_file.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise system_error(e, self.lock_file) from None
        yield from self._locked(fd, made if new_lock else None)

    def _remove_if_untouched(self, made: list[Path]) -> None:
        """At the end of a start that was refused before writing anything (no file a run writes is here): the
        lock file this process made and the folders made for it are removed, so --out is as it was."""
        try:
            if self.own_files():
                return
            self.lock_file.unlink()
            for folder in made:            # innermost first; stops at the first one something else is in
                folder.rmdir()
        except OSError:
            return

    def _locked(self, fd: int, made: Optional[list[Path]]) -> Iterator[None]:
        """Hold the lock on `fd` for the block; `made`: the folders made for a lock file this process created
        (removed with it when nothing else was written, while the lock is still held)."""
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise RunFolderError(f"{self.path} is in use by {holder}; wait for it to end, or use another "
                                     f"--out") from None
            raise ResourceError(f"cannot lock {self.lock_file}: {e.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n".encode(), 0)
        self._lock_fd = fd
        try:
            yield
        finally:
            self._lock_fd = None
            if made is not None:
                self._remove_if_untouched(made)
            os.ftruncate(fd, 0)   # nobody holds it now
            os.close(fd)          # closing releases the POSIX lock

    def is_locked(self) -> bool:
        """Whether another process holds this folder's lock right now (a test that takes nothing)."""
        return self.lock_holder() is not None

    def lock_holder(self) -> Optional[str]:
        """Who holds this folder's lock right now ("pid N on HOST since ..."), or None (a test that takes nothing)."""
        if self._lock_fd is not None or not self.lock_file.exists():
            return None
        fd = os.open(self.lock_file, os.O_RDWR)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return _holder(fd)
        finally:
            os.close(fd)
        return None


def _holder(fd: int) -> str:
    """Who holds the lock on `fd`, as its holder wrote it ("pid N on HOST since ...")."""
    return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"


def user_image(folder: Path) -> Optional[Path]:
    """An image file directly in `folder` or in one of its subfolders (hidden ones left out) that spinal-transfer
    did not write (`is_ours`: a plot of ours is marked), or None: such a folder is a data folder, and an output
    written into it would join its classes (a run's plots read as class "runs" by the next train on it)."""
    if not folder.is_dir():
        return None
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        for p in [*entries, *(q for d in entries if d.is_dir() for q in sorted(d.iterdir())
                              if not q.name.startswith("."))]:
            if p.suffix.lower() in IMG_EXTENSIONS and p.is_file() and not is_ours(p):
                return p
    except OSError:               # unreadable: the write that follows says so
        return None
    return None


def check_new_run(run: RunDir, overwrite: bool, log: Any) -> None:
    """Starting a new run in `run`: refuse a folder that holds a run unless `overwrite`, which removes only
    what a run wrote there, and says what; refuse a data folder (`user_image`)."""
    if not run.holds_run():
        image = user_image(run.path)
        if image is not None:
            raise RunFolderError(f"--out {run.path} holds images ({image}): it is a data folder, and the run's files "
                                 f"there would be read as a class by a train on it; choose another --out")
        return
    holder = run.lock_holder()
    if holder:                     # a run in progress: neither interrupted nor ours to clear
        raise RunFolderError(f"{run.path} holds a run that {holder} is training now; wait for it to end, or "
                             f"choose another --out")
    if run.state() == "started" and not overwrite:     # it never finished an epoch: nothing to lose
        removed = run.clear()
        log(f"{run.path} held a run that never finished an epoch; starting over (removed "
            f"{', '.join(p.name for p in removed)})")
        return
    if not overwrite:
        state = run.state()
        hint = (f"extend it with `spinal-transfer train --resume {run.path} --epochs N`" if state == "finished"
                else f"continue it with `spinal-transfer train --resume {run.path}`")
        raise RunFolderError(f"{run.path} already holds {'an' if state[0] in 'aeiou' else 'a'} {state} run; {hint}, "
                             f"start over with --overwrite (removes that run's files), or choose another --out")
    removed = run.clear()
    kept = sorted(p.name + "/" * p.is_dir() for p in run.path.iterdir() if not p.name.startswith("."))
    log(f"--overwrite: removed the earlier run's {', '.join(p.name for p in removed)} from {run.path}" + (
        f"; kept what a train run does not write: {', '.join(kept)} (an evaluate or report page among them "
        f"describes the earlier model, not the new one)" if kept else ""))


# --- the skip log --------------------------------------------------------------------------------


def load_run_checkpoint(path: PathLike) -> dict:
    """A run folder (its best.pt) or a checkpoint file -> the verified checkpoint."""
    p = Path(path)
    if p.is_dir():
        run = RunDir(p)
        if not run.best.is_file():
            raise CheckpointError(f"{p} has no {run.best.relative_to(p)}: it is not a run folder, or the run "
                                  f"has not finished an epoch yet")
        p = run.best
    ckpt = load_checkpoint(p)
    if "config" not in ckpt or "head_info" not in ckpt:
        raise CheckpointError(f"{p} holds no model description (config, head_info)")
    if Path(path).is_dir():
        RunDir(path).check_own(ckpt, p, "put the run's own best.pt back, or pass the checkpoint file itself")
    return ckpt
