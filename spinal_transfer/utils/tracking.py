"""`--log-to tensorboard,mlflow,wandb`: send a run to the tools people already watch runs in.

One `Tracker` fans every hook out to the chosen backends:

    tracker = Tracker.create("tensorboard,mlflow", run_dir, enabled=is_main())
    tracker.log_params(cfg.to_dict())                 # once, after the config is resolved
    tracker.log_step(step, {"train_loss": loss, "lr": lr})   # at the progress-bar refresh, not every step
    tracker.log_epoch(epoch, row)                     # the metrics.jsonl row
    tracker.log_summary(report)                       # report.json
    tracker.log_artifacts([run_dir / "report.json", *plots])
    tracker.close()                                   # or close("FAILED"), or use it as a context manager

Names are the same in every backend: `step/<key>` against the optimizer step, `train/loss`,
`train/top1`, `train/images_per_s`, `val/<metric>`, `test/<metric>`, `epoch/lr`, `epoch/seconds`,
`epoch/frozen`, `epoch/stage` against the 1-based epoch, and `final/<split>/<metric>`,
`final/best_epoch` once at the end. Hyper-parameters are the resolved config, flattened
(`a.b` keys, lists as text), because that is the one form all three backends accept.

Tracking is a side channel: it must never cost a run. A backend whose package is missing is
left out with one warning naming `pip install "spinal-transfer[track]"`; a backend that raises
(a server that is down, a full disk) warns once, is switched off, and training goes on. Only the
process given `enabled=True` (rank 0 under torchrun) logs anything.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union
from urllib.parse import urlparse
from urllib.request import url2pathname

from .atomic import atomic_write_text
from .filelock import exclusive

log = logging.getLogger("spinal_transfer.utils.tracking")
PathLike = Union[str, Path]
KINDS = ("tensorboard", "mlflow", "wandb")
INSTALL_HINT = 'pip install "spinal-transfer[track]"'
DEFAULT_EXPERIMENT = "spinal-transfer"
RUN_ID_FILE = "tracking.json"     # RUN/<this>: the MLflow run a resume continues, and the store it is in
DAMAGED_SUFFIX = ".damaged"       # RUN/tracking.json<this>: a damaged one, set aside (read_record)
Scalar = Union[str, int, float, bool]


def parse_log_to(value: Union[None, str, Sequence[str]]) -> list[str]:
    """`"tensorboard,mlflow"` (or a list, or None) -> ["tensorboard", "mlflow"]; unknown names raise.

    For the CLI's `--log-to`: a typo is a usage error at start-up, not a silent no-op.
    """
    if not value:
        return []
    parts = value.split(",") if isinstance(value, str) else [p for v in value for p in str(v).split(",")]
    kinds = []
    for p in (p.strip().lower() for p in parts):
        if not p or p == "none":
            continue
        if p not in KINDS:
            raise ValueError(f"--log-to {p!r}: choose from {', '.join(KINDS)} (comma-separated)")
        if p not in kinds:
            kinds.append(p)
    return kinds


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """Nested mappings as `a.b` keys; lists as compact JSON text; None as "None"; other scalars kept.

    TensorBoard's hparams take only str/int/float/bool, MLflow params only strings, so lists
    (`mean`, `stages`) are stringified the same way for all three backends.
    """
    out: dict[str, Scalar] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_params(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(list(v), separators=(",", ":"), default=str)
        elif v is None:
            out[key] = "None"
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


_ROW_KEYS = {"train_loss": "train/loss", "train_top1": "train/top1", "train_images_per_s": "train/images_per_s"}


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None


def epoch_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row as flat metric names (see the module docstring); unknown numeric keys
    become `epoch/<key>` so a field added to the row later is tracked without a change here."""
    m: dict[str, float] = {}
    for k, v in row.items():
        if k == "epoch":
            continue
        if isinstance(v, Mapping):
            for kk, vv in v.items():
                x = _number(vv)
                if x is not None:
                    m[f"{k}/{kk}"] = x
            continue
        x = _number(v)
        if x is not None:
            m[_ROW_KEYS.get(k, f"epoch/{k}")] = x
    return m


def summary_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """report.json's headline numbers as `final/...` metrics (per-class tables are left to the artifact)."""
    m: dict[str, float] = {}
    for split in ("val", "test"):
        for k, v in (report.get(split) or {}).items():
            x = _number(v)
            if x is not None:
                m[f"final/{split}/{k}"] = x
    for k in ("best_epoch", "num_skipped_files"):
        if _number(report.get(k)) is not None:
            m[f"final/{k}"] = float(report[k])
    stopped = report.get("stopped")
    if isinstance(stopped, Mapping) and _number(stopped.get("epoch")) is not None:
        m["final/stopped_epoch"] = float(stopped["epoch"])
    return m


def summary_tags(report: Mapping[str, Any]) -> dict[str, str]:
    """The textual part of report.json worth seeing in a runs table."""
    tags = {}
    if report.get("selected_on"):
        tags["selected_on"] = str(report["selected_on"])
    stopped = report.get("stopped")
    if isinstance(stopped, Mapping) and stopped.get("reason"):
        tags["stop_reason"] = str(stopped["reason"])
    if report.get("classes") is not None:
        tags["num_classes"] = str(len(report["classes"]))
    return tags


def read_record(run_dir: PathLike) -> dict:
    """RUN/tracking.json: where this run is tracked (its MLflow run's id, and the destination a driver of many runs
    gave it: `record_destination`); {} when there is none or it is damaged, since tracking never costs a run. A
    damaged one is set aside (`_set_aside`) instead of being read as absent without a word and overwritten."""
    path = Path(run_dir) / RUN_ID_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        _set_aside(path, f"{type(e).__name__}: {e}")
        return {}
    if not isinstance(record, dict):
        _set_aside(path, f"a JSON {type(record).__name__}, not an object")
        return {}
    return record


def _set_aside(path: Path, problem: str) -> None:
    """Keep a damaged RUN/tracking.json as tracking.json.damaged, with one warning: what it held (the MLflow run
    the run logs to, the store and name a compare or reproduce gave it) is lost to tracking, which goes on as for
    a new run; renamed, it is read (and warned about) once, and the next write does not destroy it."""
    kept = path.with_name(path.name + DAMAGED_SUFFIX)
    try:
        os.replace(path, kept)
        where = f"the damaged file is kept as {kept.name}"
    except OSError as e:
        where = f"it could not be set aside ({type(e).__name__}: {e})"
    log.warning(f"tracking: {path} is damaged ({problem}): where this run was tracked is unknown, so it is tracked "
                f"as a new MLflow run, in the store its command names (compare, reproduce, --tracking-uri) or else "
                f"in the one beside the run folder; {where}")


def record_destination(run_dir: PathLike, store_root: PathLike, run_name: str) -> None:
    """Keep in RUN/tracking.json where compare or reproduce tracks this run (`train.run`'s track_as: the folder of
    its default MLflow store and its name there), so a `train --resume RUN` started by hand continues it there
    (`recorded_destination`) instead of opening a second MLflow run in a store beside the run folder. The folder
    is kept relative to the run folder: an OUT moved as a whole keeps its store."""
    run_dir = Path(run_dir).resolve()
    where = {"store_root": os.path.relpath(Path(store_root).resolve(), run_dir), "run_name": run_name}
    record = read_record(run_dir)
    if {k: record.get(k) for k in where} != where:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / RUN_ID_FILE, json.dumps({**record, **where}))


def recorded_destination(run_dir: PathLike) -> Optional[tuple[Path, str]]:
    """(store folder, run name) that `record_destination` kept for this run, or None (a run of its own: its store
    is beside it, and it is named after its folder)."""
    record = read_record(run_dir)
    root, name = record.get("store_root"), record.get("run_name")
    if not isinstance(root, str) or not isinstance(name, str) or not name:
        return None
    return (Path(run_dir).resolve() / root).resolve(), name


# ------------------------------------------------------------------------------------------------
# Backends: each method may raise; Tracker turns the first exception into one warning.

class Backend:
    name = "backend"

    def log_params(self, params: dict[str, Scalar]) -> None: ...
    def log_step(self, step: int, values: dict[str, float]) -> None: ...
    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...
    def log_summary(self, metrics: dict[str, float], tags: dict[str, str], report: Mapping) -> None: ...
    def log_artifacts(self, files: list[Path]) -> None: ...
    def close(self, status: str) -> None: ...


class TensorBoardBackend(Backend):
    """Event files in RUN/tensorboard/ through torch.utils.tensorboard (needs the tensorboard package)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, run_name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.logdir), flush_secs=30)
        self.params: dict[str, Scalar] = {}

    def log_params(self, params: dict[str, Scalar]) -> None:
        self.params = dict(params)
        table = "| option | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in params.items())
        self.writer.add_text("config", table, 0)

    def log_step(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"step/{k}", v, step)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, epoch)
        self.writer.flush()

    def log_summary(self, metrics: dict[str, float], tags: dict[str, str], report: Mapping) -> None:
        from torch.utils.tensorboard.summary import hparams

        # The HParams dashboard: the config next to the final numbers, one row per run.
        exp, ssi, sei = hparams(self.params, metrics)
        fw = self.writer._get_file_writer()
        for s in (exp, ssi, sei):
            fw.add_summary(s)
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, int(metrics.get("final/best_epoch", 0)))
        if tags:
            self.writer.add_text("summary", "".join(f"* {k}: {v}\n" for k, v in tags.items()))

    def log_artifacts(self, files: list[Path]) -> None:
        import numpy as np
        from PIL import Image

        for f in files:      # TensorBoard keeps no files: the figures go in as images
            if f.suffix.lower() in (".png", ".jpg", ".jpeg"):
                with Image.open(f) as im:
                    self.writer.add_image(f"plots/{f.stem}", np.asarray(im.convert("RGB")), 0, dataformats="HWC")

    def close(self, status: str) -> None:
        self.writer.flush()
        self.writer.close()


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (one TCP connect) for an http(s) tracking server that is not there, instead of
    letting MLflow's retries stall the first epoch for minutes."""
    u = urlparse(uri)
    if u.scheme not in ("http", "https") or not u.hostname:
        return
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach the MLflow server at {uri}: {e}") from None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """For a SQLite store: held while the store is created and its experiment looked up or made. MLflow creates
    the schema (and migrates it) on first use without a lock of its own, so two processes starting on one new
    store (two `compare` workers sharing OUT) failed with "table experiments already exists" and one ran
    untracked. A server's store needs none: the server serialises it."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(db.with_name(f".{db.name}.lock")):
        yield


class MLflowBackend(Backend):
    """One MLflow run per training run, named after the run folder.

    Default store: SQLite `mlruns.db` beside the run folders (`<runs root>/mlruns.db`), with
    artifacts in `<runs root>/mlartifacts/`: the runs of one project end up in one table without a
    server (`mlflow ui --backend-store-uri sqlite:///<runs root>/mlruns.db`). compare and reproduce,
    whose runs sit in OUT/runs/<head or recipe>/seed<k>, give OUT as the root (`store_root`) and
    `<head or recipe>/seed<k>` as the name, so all their runs are in one store; RUN/tracking.json keeps both
    (`record_destination`), so a `train --resume` by hand continues there. Step metrics are
    buffered and written once per epoch, so a database or server round trip never sits in the
    training loop's inner steps.
    """

    name = "mlflow"
    FLUSH_AT = 900          # MLflow accepts at most 1000 metrics per batch

    def __init__(self, run_dir: Path, run_name: str, tracking_uri: Optional[str], experiment: Optional[str],
                 store_root: Optional[PathLike] = None) -> None:
        from mlflow.tracking import MlflowClient

        root = Path(store_root).resolve() if store_root else run_dir.resolve().parent
        default = f"sqlite:///{root / 'mlruns.db'}"
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default
        self.store_root = root if uri == default else None     # the store this backend keeps in a folder
        if urlparse(uri).scheme in ("http", "https"):
            # A server that dies mid-run: a few retries, then this backend is switched off.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
            _check_reachable(uri)
        self.uri = uri
        with _store_lock(uri):
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._experiment(experiment, root, tracking_uri)
        self.run_dir = run_dir.resolve()
        self.run_id = self._earlier_run() or self._new_run(self.experiment_id, run_name)
        self.pending: list = []

    def _experiment(self, experiment: Optional[str], root: Path, tracking_uri: Optional[str]) -> str:
        """The id of the experiment runs log to (created when missing; the first call also creates the store)."""
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = (root / "mlartifacts").as_uri() if self.uri.startswith("sqlite:") and not tracking_uri else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:         # another run (a server's client, not under our lock) created it in the meantime
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def _earlier_run(self) -> Optional[str]:
        """The MLflow run this run folder logged to before (a resumed run continues it, not a second MLflow run
        holding only the epochs after the interruption), when it is in this tracking store."""
        run_id = read_record(self.run_dir).get("mlflow_run_id")
        if not run_id:
            return None
        try:
            earlier = self.client.get_run(run_id)
            if earlier.info.experiment_id != self.experiment_id:
                return None
        except Exception:           # another store, a deleted run, a damaged file: a new MLflow run
            return None
        if self._copied_from(earlier.data.tags.get("run_dir"), run_id):
            return None
        self.client.update_run(run_id, status="RUNNING")
        self.resumed = True
        return run_id

    def _copied_from(self, logged_from: Optional[str], run_id: str) -> bool:
        """Whether this run folder is a copy of the one that logged MLflow run `run_id`: that folder is still
        there and still names the run (its tracking.json was copied with it). The copy's epochs must not land in
        the original's MLflow run, so it gets a new one; a folder moved as a whole (the original gone) continues
        it, its run_dir tag updated."""
        if not logged_from or Path(logged_from) == self.run_dir:
            return False
        if Path(logged_from).is_dir() and read_record(logged_from).get("mlflow_run_id") == run_id:
            log.warning(f"{self.run_dir / RUN_ID_FILE} names MLflow run {run_id} of {logged_from}, which still "
                        f"logs to it: this folder is a copy, so it is tracked as a new MLflow run")
            return True
        self.client.set_tag(run_id, "run_dir", str(self.run_dir))
        return False

    def _new_run(self, experiment_id: str, run_name: str) -> str:
        run = self.client.create_run(experiment_id, run_name=run_name, tags={"run_dir": str(self.run_dir),
                                                                             "mlflow.source.name": "spinal-transfer"})
        self.run_dir.mkdir(parents=True, exist_ok=True)      # the destination recorded with it stays
        atomic_write_text(self.run_dir / RUN_ID_FILE, json.dumps({**read_record(self.run_dir),
                                                                  "mlflow_run_id": run.info.run_id}))
        return run.info.run_id

    def _flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:1000], self.pending[1000:]
            self.client.log_batch(self.run_id, metrics=batch)

    def _metric(self, key: str, value: float, step: int):
        from mlflow.entities import Metric

        return Metric(key, value, int(time.time() * 1000), step)

    resumed = False

    def log_params(self, params: dict[str, Scalar]) -> None:
        from mlflow.entities import Param

        if self.resumed:            # MLflow refuses to change a logged param: a changed one (--epochs) is a tag
            logged = self.client.get_run(self.run_id).data.params
            for k, v in params.items():
                if k in logged and logged[k] != str(v)[:6000]:
                    self.client.set_tag(self.run_id, f"resumed_with.{k}", str(v)[:5000])
            params = {k: v for k, v in params.items() if k not in logged}
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):         # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self.pending += [self._metric(f"step/{k}", v, step) for k, v in values.items() if math.isfinite(v)]
        if len(self.pending) >= self.FLUSH_AT:
            self._flush()

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.pending += [self._metric(k, v, epoch) for k, v in metrics.items() if math.isfinite(v)]
        self._flush()

    def log_summary(self, metrics: dict[str, float], tags: dict[str, str], report: Mapping) -> None:
        step = int(metrics.get("final/best_epoch", 0))
        self.pending += [self._metric(k, v, step) for k, v in metrics.items() if math.isfinite(v)]
        self._flush()
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def log_artifacts(self, files: list[Path]) -> None:
        if not self._artifacts_in_store():
            return
        for f in files:
            try:
                rel = f.resolve().parent.relative_to(self.run_dir)
                sub = None if str(rel) == "." else rel.as_posix()
            except ValueError:
                sub = None
            self.client.log_artifact(self.run_id, str(f), artifact_path=sub)

    moved_warned = False

    def _artifacts_in_store(self) -> bool:
        """Whether this run's artifacts go in the folder of the store it logs to. MLflow keeps the absolute
        artifact folder of an experiment, and of each run, in its database and has no call to change it: once the
        OUT of a compare is moved as a whole, its runs (old and new) would write their artifacts to the old place,
        re-creating the folder the user moved away, or failing where a file now stands. Then the artifacts are not
        logged (one warning); the metrics and params still go to the moved store, in the same MLflow run, and the
        files are in the run folder. A store named by --tracking-uri keeps its artifacts where it says."""
        if self.store_root is None:
            return True
        where = self.client.get_run(self.run_id).info.artifact_uri
        u = urlparse(where)
        if u.scheme not in ("", "file"):
            return True
        path = Path(url2pathname(u.path)).resolve()
        if path.is_relative_to(self.store_root):
            return True
        if not self.moved_warned:
            self.moved_warned = True
            old = Path(*path.parts[:path.parts.index("mlartifacts")]) if "mlartifacts" in path.parts else path
            log.warning(f"tracking: the MLflow store {self.store_root} was moved from {old} (MLflow keeps its "
                        f"artifact folder, {where}, and cannot change it): this run's artifacts are not logged, "
                        f"so nothing is written to the old place; its metrics and params are, and its report and "
                        f"plots are in {self.run_dir}")
        return False

    def close(self, status: str) -> None:
        try:
            self._flush()
        finally:
            self.client.set_terminated(self.run_id, status)


def _wandb_logged_in(wandb: Any) -> bool:
    """True when W&B has credentials on this machine (checked locally: no request is made)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return bool(wandb.login(prompt=False, verify=False))
    except Exception:
        return False


class WandbBackend(Backend):
    """A W&B run in RUN/wandb/: offline (sync later with `wandb sync`) unless the user is logged in
    or WANDB_MODE says otherwise."""

    name = "wandb"

    def __init__(self, run_dir: Path, run_name: str, experiment: Optional[str]) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in(wandb) else "offline")
        project = experiment or os.environ.get("WANDB_PROJECT") or DEFAULT_EXPERIMENT
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir.resolve()
        kwargs: dict[str, Any] = dict(project=project, name=run_name, dir=str(self.run_dir), mode=mode,
                                      settings=wandb.Settings(console="off", init_timeout=60))
        try:
            self.run = wandb.init(reinit="create_new", **kwargs)   # never finish or reuse a run of the caller's
        except TypeError:         # wandb before 0.19.10 knows only reinit=True
            self.run = wandb.init(reinit=True, **kwargs)
        self.run.define_metric("optimizer_step")
        self.run.define_metric("epoch")
        self.run.define_metric("step/*", step_metric="optimizer_step")
        for prefix in ("train", "val", "test", "epoch"):
            self.run.define_metric(f"{prefix}/*", step_metric="epoch")

    def log_params(self, params: dict[str, Scalar]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self.run.log({**{f"step/{k}": v for k, v in values.items()}, "optimizer_step": step})

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.run.log({**metrics, "epoch": epoch})

    def log_summary(self, metrics: dict[str, float], tags: dict[str, str], report: Mapping) -> None:
        self.run.summary.update({**metrics, **tags})

    def log_artifacts(self, files: list[Path]) -> None:
        for f in files:
            f = f.resolve()
            base = self.run_dir if self.run_dir in f.parents else f.parent
            self.run.save(str(f), base_path=str(base), policy="now")

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


class Tracker:
    """The composite every training loop talks to; with no backend (or `enabled=False`) every call is a no-op."""

    def __init__(self, backends: Sequence[Backend] = ()) -> None:
        self.backends: list[Backend] = list(backends)
        self.warned: set[str] = set()

    @classmethod
    def create(cls, kinds: Union[None, str, Sequence[str]], run_dir: PathLike, run_name: Optional[str] = None,
               tracking_uri: Optional[str] = None, experiment: Optional[str] = None,
               enabled: bool = True, store_root: Optional[PathLike] = None) -> "Tracker":
        """Start the backends named in `kinds` ("tensorboard,mlflow,wandb" or a list).

        `run_name` defaults to the run folder's name; `experiment` names the MLflow experiment and
        the W&B project (default $MLFLOW_EXPERIMENT_NAME / $WANDB_PROJECT, else "spinal-transfer");
        `tracking_uri` is MLflow's (default: SQLite in `store_root`, by default the folder holding the run
        folder). Pass `enabled=is_main()`.
        Unknown kinds raise ValueError; every other problem only warns.
        """
        names = parse_log_to(kinds)
        tracker = cls()
        if not enabled or not names:
            return tracker
        run_dir = Path(run_dir)
        run_name = run_name or run_dir.resolve().name
        for kind in names:
            try:
                if kind == "tensorboard":
                    tracker.backends.append(TensorBoardBackend(run_dir, run_name))
                elif kind == "mlflow":
                    tracker.backends.append(MLflowBackend(run_dir, run_name, tracking_uri, experiment, store_root))
                else:
                    tracker.backends.append(WandbBackend(run_dir, run_name, experiment))
            except ImportError as e:
                tracker._warn(kind, f"--log-to {kind} needs the {_PACKAGES[kind]} package ({e}): "
                                    f"{INSTALL_HINT}; {kind} logging is off")
            except Exception as e:
                tracker._warn(kind, f"{kind} could not start ({type(e).__name__}: {e}); "
                                    f"{kind} logging is off, training goes on")
        return tracker

    @property
    def active(self) -> list[str]:
        """Names of the backends still logging."""
        return [b.name for b in self.backends]

    def _warn(self, name: str, message: str) -> None:
        if name not in self.warned:
            self.warned.add(name)
            log.warning(f"tracking: {message}")

    def _each(self, method: str, *args: Any) -> None:
        for b in list(self.backends):
            try:
                getattr(b, method)(*args)
            except Exception as e:
                self.backends.remove(b)
                self._warn(b.name, f"{b.name} failed in {method} ({type(e).__name__}: {e}); "
                                   f"{b.name} logging is off for the rest of this run, training goes on")
                try:
                    b.close("FAILED")
                except Exception:
                    pass

    def log_params(self, config: Mapping[str, Any]) -> None:
        """The resolved configuration (e.g. `cfg.to_dict()`), flattened, as hyper-parameters."""
        if self.backends:
            self._each("log_params", flatten_params(config))

    def log_step(self, step: int, values: Mapping[str, Any]) -> None:
        """Per-step scalars such as {"train_loss": .., "lr": ..} against the optimizer step.
        Values must already be Python numbers (sync once, where the progress bar does)."""
        if self.backends:
            clean = {k: x for k, v in values.items() if (x := _number(v)) is not None}
            self._each("log_step", int(step), clean)

    def log_epoch(self, epoch: int, row: Mapping[str, Any]) -> None:
        """One metrics.jsonl row against its 1-based epoch."""
        if self.backends:
            self._each("log_epoch", int(epoch), epoch_metrics(row))

    def log_summary(self, report: Mapping[str, Any]) -> None:
        """report.json: the final metrics, best epoch and stop reason (and TensorBoard's hparams table)."""
        if self.backends:
            self._each("log_summary", summary_metrics(report), summary_tags(report), report)

    def log_artifacts(self, files: Iterable[PathLike]) -> None:
        """Files to keep with the run (report.json, report.html, plots); missing ones are skipped."""
        if self.backends:
            paths = [Path(f) for f in files if Path(f).is_file()]
            if paths:
                self._each("log_artifacts", paths)

    def close(self, status: str = "FINISHED") -> None:
        """Flush and end every backend's run; `status` "FAILED" marks an interrupted run."""
        self._each("close", status)
        self.backends.clear()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FINISHED" if exc_type is None else "FAILED")
