"""`spinal-transfer tune`: search the head's kind and shape and the optimisation settings with Optuna.

Why this shape: which head (and which width and depth) suits a folder, trained how, is an empirical question.
By default every trial fine-tunes as `train` does (mode `finetune`, `multirun`), so the recipe is judged as the
user will train it. `--mode frozen` is a fast screen, not what train does: with a frozen backbone every
candidate trains in seconds on cached features (`features`), so a search of dozens of trials takes minutes on
a CPU, but its answer is about a frozen backbone (its recipe trains one). The rules that keep the answer honest:

* Selection uses val only. A trial's score is the best val top-1 over its epochs (the epoch train.run keeps);
  pruning reads the per-epoch val top-1 (`train.run(on_epoch=...)`). A trial stops right after its last
  epoch, BEFORE the test split is evaluated: only the best trial's run is then resumed to its end, which
  evaluates test once with its chosen weights. (A later command that continues the study and finds a
  better trial tests that one too; the page counts the trials whose test split was evaluated.)
* Every trial has the same seed, data split and options (flags or recipe); only the searched fields differ.
* Tuning must not make things worse: trial 0 of a new study trains the untuned defaults (the options as
  given, `train`'s defaults for the rest: `untuned_params`). The recipe is the best trial only when its val
  top-1 beats the defaults'; otherwise it is the defaults, and the outputs say so (`versus_untuned`).
* The chosen configuration is written as a recipe that `train --recipe` accepts unchanged; with
  `--deterministic` on a CPU it reproduces the trial's val metric exactly.

Search space: `SPACE` below, a table of (parameter, values, when); the head's kind and shape (width, layers,
splits, dropout, batch norm via the preset, shared weights) and the optimisation (lr, weight decay, label
smoothing, epochs up to --epochs). The README and tune.html show the same table (a test holds the README to it).

Sampling: TPE (`optuna.samplers.TPESampler`) with `--sampler-seed`, its first `STARTUP_TRIALS` trials random;
constant liar on, so parallel workers do not all try the same point. Pruning: `MedianPruner`: once 5 trials
have ended, a trial whose val top-1 after epoch e >= 2 is below the median of earlier trials at epoch e stops.
A trial whose loss diverges, or whose shape the backbone cannot take (shared weights need a feature width
divisible by num_splits), is recorded as failed with the reason.

Storage: an SQLite file in the output folder by default, so rerunning the command continues the study (to
`--trials` finished trials in all); several processes on one machine may share it. `--storage
postgresql://user:password@host/db` (any Optuna RDB URL) lets workers on many machines share one study: start
the same command on each, with the same --study-name, a --out on a shared file system and each its own
--sampler-seed. Heartbeats mark the trials of a worker that died as failed; such a trial is run again once, from
its last.pt when it has one, and is not counted (`requeue_dead`); a trial left RUNNING by a process that died
before its first heartbeat ends as abandoned (failed, not counted, re-queued: `fail_abandoned`).

Layout: OUT/study.db, OUT/trials/trial<NNNN>/ (run folders), OUT/feature-cache/ (frozen mode),
OUT/best.yaml, OUT/trials.csv, OUT/tune.html. A trial's checkpoints (the whole model, twice) are deleted when
it ends unless it is the best so far; its config, metrics and log stay.
"""
from __future__ import annotations

import contextlib
import html
import json
import logging
import math
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Union

from ..config import TrainConfig, resolve_config
from ..data.augment import values_in_force
from ..errors import ConfigError, Interrupted, MissingDependency, NonFiniteLoss, rerun_resumes
from ..evaluation.plots import figure_png
from ..evaluation.tables import Table, page, png_img, table_html, to_csv, write_files
from ..models.surgery import check_backbone
from ..runs.checkpoint import load_checkpoint
from ..runs.rundir import RunDir
from ..training import train
from ..utils.atomic import atomic_write_text
from ..utils.filelock import exclusive
from ..utils.preemption import StopControl, parse_signals
from ..utils.stamp import refuse_others, yaml_generator
from .multirun import (
    DEFAULT_MODE,
    IGNORED,
    MODE_NAMES,
    MultiRunError,
    check_out,
    mode_fields,
    refuse_torchrun,
)

if TYPE_CHECKING:
    import optuna

DEFAULT_OUT = "runs/tune"
DEFAULT_TRIALS = 20
DEFAULT_STUDY = "spinal-transfer"
DEFAULT_SAMPLER_SEED = 0
STORAGE_FILE = "study.db"
STARTUP_TRIALS = 10                   # TPE samples at random until this many trials exist
PRUNE_AFTER_TRIALS = 5                # the median pruner waits for this many finished trials...
PRUNE_FROM_EPOCH = 2                  # ...and stops a trial no earlier than after this epoch
PRUNERS = ("median", "none")
HEARTBEAT_S, GRACE_S = 60, 180        # a RUNNING trial silent for GRACE_S is marked failed
ABANDONED_S = HEARTBEAT_S             # a RUNNING trial this old with no heartbeat at all was never trained
UNTUNED = "untuned"                   # user attribute of the trial that trains the untuned defaults
INTERRUPTED = "interrupted"           # ... of a trial a signal stopped: not counted, its folder handed on
RESUME_FROM = "resume_from"           # ... of the trial that continues it there (enqueued with its params)
RETRY_OF = "retry_of"                 # ... of the trial that reruns one whose worker died (once, then it counts)
OWNER_FILE = ".study.json"            # OUT/<this>: the one study whose trial folders OUT/trials/ holds
OUTSIDE = "outside_space"             # ... and its parameters the search space does not hold
OUTPUT_FILES = ("best.yaml", "trials.csv", "tune.html")
# TrainConfig fields the search sets (--epochs is the longest a trial may train; the others are not flags)
SEARCHED = ("head", "head_preset", "layer_width", "num_layers", "num_splits", "shared_weights", "head_dropout",
            "mlp_hidden", "lr", "weight_decay", "label_smoothing")
# (parameter, values, when): the documented space; `suggest` samples exactly these
SPACE = (
    ("head", "linear, mlp, spinal", "always"),
    ("head_preset", "resnet (no batch norm), vgg (batch norm after each spinal layer)", "spinal"),
    ("layer_width", "16 .. 1024, log scale", "spinal"),
    ("num_layers", "2 .. 8", "spinal"),
    ("num_splits", "2 .. 4", "spinal"),
    ("shared_weights", "false, true", "spinal"),
    ("mlp_width", "64 .. 2048, log scale (mlp_hidden = [mlp_width] * mlp_layers)", "mlp"),
    ("mlp_layers", "1 .. 2", "mlp"),
    ("head_dropout", "0 .. 0.5 (replaces the preset's dropout)", "spinal, mlp"),
    ("lr", "1e-4 .. 1e-1, log scale", "always"),
    ("weight_decay", "1e-5 .. 1e-1, log scale", "always"),
    ("label_smoothing", "0 .. 0.2", "always"),
    ("epochs", "max(1, E // 3) .. E, E = --epochs",
     "with --epochs; without it, the length follows the data as train's does"),
)

PathLike = Union[str, Path]


class TuneError(MultiRunError):
    """A tune request that cannot run as given; the message says how to fix it."""


def _optuna():
    try:
        import optuna
    except ImportError:
        raise MissingDependency("tune needs Optuna: pip install 'spinal-transfer[tune]'") from None
    return optuna


# --- the search space ----------------------------------------------------------------------------

def suggest(trial: "optuna.Trial", max_epochs: Optional[int]) -> dict:
    """The TrainConfig fields of one trial, sampled from SPACE (conditional: shape parameters only for the
    head kind that has them). Epochs are searched up to `max_epochs` when the base config sets them; without,
    every trial's length follows the data as train's does (TrainConfig.epochs_by_data)."""
    head = trial.suggest_categorical("head", ["linear", "mlp", "spinal"])
    f: dict[str, Any] = {"head": head}
    if head == "spinal":
        f["head_preset"] = trial.suggest_categorical("head_preset", ["resnet", "vgg"])
        f["layer_width"] = trial.suggest_int("layer_width", 16, 1024, log=True)
        f["num_layers"] = trial.suggest_int("num_layers", 2, 8)
        f["num_splits"] = trial.suggest_int("num_splits", 2, 4)
        f["shared_weights"] = trial.suggest_categorical("shared_weights", [False, True])
    if head == "mlp":
        width = trial.suggest_int("mlp_width", 64, 2048, log=True)
        f["mlp_hidden"] = [width] * trial.suggest_int("mlp_layers", 1, 2)
    if head != "linear":
        f["head_dropout"] = trial.suggest_float("head_dropout", 0.0, 0.5)
    f["lr"] = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    f["weight_decay"] = trial.suggest_float("weight_decay", 1e-5, 1e-1, log=True)      # train's 0.05 inside
    f["label_smoothing"] = trial.suggest_float("label_smoothing", 0.0, 0.2)
    if max_epochs is not None:
        f["epochs"] = trial.suggest_int("epochs", max(1, max_epochs // 3), max_epochs)
    return f


def untuned_params(base: TrainConfig) -> dict:
    """The untuned defaults in the search's parameters (`suggest`'s names), enqueued as a new study's first
    trial. None where the config has no value in the space's terms: a spinal layer width or a head dropout left
    to train's rules (the class count, the preset), an mlp whose hidden widths differ."""
    hidden = list(base.mlp_hidden)
    uniform = bool(hidden) and len(set(hidden)) == 1
    return {"head": base.head, "head_preset": base.head_preset, "layer_width": base.layer_width,
            "num_layers": base.num_layers, "num_splits": base.num_splits, "shared_weights": base.shared_weights,
            "mlp_width": hidden[0] if uniform else None, "mlp_layers": len(hidden), "head_dropout": base.head_dropout,
            "lr": base.lr, "weight_decay": base.weight_decay, "label_smoothing": base.label_smoothing,
            "epochs": base.epochs}


class _Untuned:
    """How `suggest` sees the untuned trial: a parameter whose untuned value lies in the space is suggested (the
    queue fixes it to that value, so the trial records it under the space's distribution, for the sampler and
    trials.csv); any other is handed back unrecorded, and named in `outside` unless it is None (left to a rule
    of train's). The trial trains the untuned config itself, whatever `suggest` returns."""

    def __init__(self, trial: "optuna.Trial", values: dict):
        self.trial, self.values, self.outside = trial, values, []

    def _pick(self, name: str, inside: bool, space: str, suggest: Callable[[], Any]) -> Any:
        value = self.values[name]
        if value is not None and inside:
            return suggest()
        if value is not None:
            self.outside.append(f"{name} {value!r} (searched: {space})")
        return value

    def suggest_categorical(self, name: str, choices: list) -> Any:
        return self._pick(name, self.values[name] in choices, ", ".join(map(str, choices)),
                          lambda: self.trial.suggest_categorical(name, choices))

    def suggest_int(self, name: str, low: int, high: int, log: bool = False) -> Any:
        return self._pick(name, _within(self.values[name], low, high), f"{low} .. {high}",
                          lambda: self.trial.suggest_int(name, low, high, log=log))

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> Any:
        return self._pick(name, _within(self.values[name], low, high), f"{low:g} .. {high:g}",
                          lambda: self.trial.suggest_float(name, low, high, log=log))


def _within(value: Any, low: float, high: float) -> bool:
    """A number in [low, high] (not a bool, not `lr: auto`)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


# --- one trial -----------------------------------------------------------------------------------

class _Trained(Exception):
    """Raised from on_epoch after a trial's last epoch: the run stops before train.finish tests it."""


def trial_dir(out: Path, number: int) -> RunDir:
    return RunDir(out / "trials" / f"trial{number:04d}")


def best_epoch(run: RunDir) -> tuple[int, float]:
    """(epoch, val top-1) of the epoch train.run's CheckpointSaver selected, as best.pt records it: a trial
    scores what `train --recipe` keeps, whatever --select-metric picks it."""
    rows = {r["epoch"]: r for r in run.read_metrics()}
    if not rows or not run.best.is_file():
        raise TuneError(f"{run.path} has no finished epoch")
    epoch = int(load_checkpoint(run.best)["epoch"])
    return epoch, rows[epoch]["val"]["top1"]


def trial_fields(trial: "optuna.Trial", base: TrainConfig) -> dict:
    """The searched TrainConfig fields a trial trains with: sampled, or none for the untuned trial (it trains
    `base` itself; its parameters the space holds are recorded, the others noted in its OUTSIDE attribute)."""
    if not trial.user_attrs.get(UNTUNED):
        return suggest(trial, base.epochs)
    view = _Untuned(trial, untuned_params(base))
    suggest(view, base.epochs)                   # type: ignore[arg-type]  # records the parameters
    if view.outside:
        trial.set_user_attr(OUTSIDE, view.outside)
    return {}


def make_objective(base: TrainConfig, out: Path,
                   stop: Optional[StopControl] = None) -> Callable[["optuna.Trial"], float]:
    """The objective: train one sampled configuration (or the untuned defaults) in OUT/trials/trial<N>/, report
    val top-1 every epoch (pruning), stop before the test evaluation, return the best val top-1. `stop` is the
    command's control: a signal that came between trials stops the trial Optuna has just created before it
    trains, as not counted (like one a signal stopped while training)."""
    stop = stop or StopControl([])
    optuna = _optuna()

    def objective(trial: "optuna.Trial") -> float:
        folder = trial.user_attrs.get(RESUME_FROM) or str(trial_dir(out, trial.number).path)
        cfg = resolve_config(base, {**trial_fields(trial, base), "out": folder})
        trial.set_user_attr("run", cfg.out)
        trial.set_user_attr("config", replace(cfg, **values_in_force(cfg)).to_dict())      # as it trains
        last = cfg.total_epochs()

        def on_epoch(row: dict) -> None:
            trial.report(row["val"]["top1"], row["epoch"])
            if row["epoch"] >= last:
                raise _Trained()
            if trial.should_prune():
                raise optuna.TrialPruned(f"val top-1 {row['val']['top1']:.4f} after epoch {row['epoch']} is below "
                                         f"the median of earlier trials")

        try:
            stop.raise_if_stopped("between trials")
            if RunDir(folder).state() == "interrupted":       # a trial a signal stopped: continued from its last.pt
                train.run(resume=folder, on_epoch=on_epoch)
            else:
                train.run(cfg, on_epoch=on_epoch)
        except _Trained:
            pass
        except Interrupted:
            # not a failure of these parameters: the next run of tune continues this trial first, in its folder
            trial.set_user_attr(INTERRUPTED, True)
            untuned = {UNTUNED: True} if trial.user_attrs.get(UNTUNED) else {}
            trial.study.enqueue_trial(trial.params, user_attrs={RESUME_FROM: folder, **untuned})
            raise
        except (NonFiniteLoss, ConfigError) as e:
            trial.set_user_attr("error", str(e))
            raise
        epoch, top1 = best_epoch(RunDir(cfg.out))
        trial.set_user_attr("best_epoch", epoch)
        return top1

    return objective


# --- the study -----------------------------------------------------------------------------------

def default_storage(out: Path) -> str:
    return f"sqlite:///{(out / STORAGE_FILE).resolve()}"


def shown_storage(url: str) -> str:
    """The storage URL without its password, for pages and logs."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def _stale_callback_name() -> str:
    """The RDBStorage argument for the callback of a trial failed by the heartbeat check: Optuna 4.9 renamed
    failed_trial_callback (deprecated, gone in 6.0) to heartbeat_stale_trial_callback; setup.cfg allows 4.0."""
    import inspect

    optuna = _optuna()
    params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    return "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"


def make_storage(url: str) -> "optuna.storages.RDBStorage":
    """An RDB storage with heartbeats (a dead worker's trial becomes failed instead of running forever); an
    SQLite file waits up to a minute for a lock another process holds instead of failing, and serializes its
    transactions (`_serialize_sqlite`)."""
    optuna = _optuna()
    sqlite = url.startswith("sqlite")
    # isolation_level None: pysqlite emits no BEGIN of its own, the one `_serialize_sqlite` adds is the only one
    kwargs = {"connect_args": {"timeout": 60, "isolation_level": None}} if sqlite else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                                 grace_period=GRACE_S, **{_stale_callback_name(): requeue_dead})
    except Exception as e:         # a bad URL, an unreachable server, a missing driver
        hint = f" (a file is named as a URL: sqlite:///{url})" if "://" not in url else ""
        raise TuneError(f"cannot open the study storage {shown_storage(url)}: {str(e).splitlines()[0]}{hint}") from None
    if sqlite:
        _serialize_sqlite(storage.engine)
    return storage


def _serialize_sqlite(engine: Any) -> None:
    """Every transaction on `engine` starts with BEGIN IMMEDIATE (SQLAlchemy's recipe for SQLite isolation).
    Optuna reads a trial "for update" before it changes it, which SQLite ignores: two workers asking for a
    trial at once both read the queued untuned trial as WAITING, both set it RUNNING, and both trained it (the
    second to finish crashed on "Trial#0 has already finished"). Holding the write lock from the read on makes
    each read-then-write whole; a worker waits (up to the connection timeout) instead."""
    import sqlalchemy  # lazy: comes with Optuna, which tune imports only when it runs

    sqlalchemy.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))


def make_sampler(seed: int) -> "optuna.samplers.BaseSampler":
    optuna = _optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=STARTUP_TRIALS, constant_liar=True)


def resume_sampling(study: "optuna.Study", seed: int) -> None:
    """A continued study's sampler seeded past the trials it has: seeded as a new one, it drew the same random
    start-up points again (trial 2 of a rerun repeated trial 1). The seed mixes (seed, trials so far) through
    numpy's SeedSequence, not seed + trials: worker --sampler-seed 1 joining after one trial would otherwise draw
    what worker --sampler-seed 2 draws. A new study's sampling is unchanged (seeded with seed itself)."""
    import numpy as np
    from optuna.trial import TrialState

    started = sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))
    if started:
        study.sampler = make_sampler(int(np.random.SeedSequence([seed, started]).generate_state(1)[0]))


def make_pruner(name: str) -> "optuna.pruners.BasePruner":
    optuna = _optuna()
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        # steps are 1-based epochs; Optuna prunes only at steps >= n_warmup_steps
        return optuna.pruners.MedianPruner(n_startup_trials=PRUNE_AFTER_TRIALS, n_warmup_steps=PRUNE_FROM_EPOCH)
    raise TuneError(f"--pruner must be one of {', '.join(PRUNERS)}, got {name!r}")


def settings_of(base: TrainConfig, mode: str) -> dict:
    """What every trial of a study shares; a study continued with other settings would mix experiments."""
    return {"mode": mode, **{k: v for k, v in sorted(base.to_dict().items()) if k not in IGNORED}}


def open_study(storage: str, name: str, sampler: Any, pruner: Any, settings: dict, lock: Path,
               untuned: dict) -> "optuna.Study":
    """Create the study, or load it to continue; refuse one made with other settings. A new study's first trial
    (in the queue) is the untuned defaults, `untuned` (untuned_params). Under `lock`: two workers starting
    together on a new database would both create its tables (and one would fail), or both enqueue the defaults."""
    optuna = _optuna()

    with exclusive(lock):
        study = optuna.create_study(storage=make_storage(storage), study_name=name, direction="maximize",
                                    sampler=sampler, pruner=pruner, load_if_exists=True)
        have = study.user_attrs.get("settings")
        if have is None:
            study.set_user_attr("settings", settings)
            study.enqueue_trial({k: v for k, v in untuned.items() if v is not None}, user_attrs={UNTUNED: True})
            have = settings
    if have != settings:
        diff = [f"{k}: {have.get(k)!r} there, {settings.get(k)!r} asked for" for k in sorted(set(have) | set(settings))
                if have.get(k) != settings.get(k)]
        raise TuneError(f"study {name!r} in {shown_storage(storage)} was made with other settings "
                        f"({'; '.join(diff)}); use another --out")
    return study


def requeue_dead(study: "optuna.Study", trial: Any) -> None:
    """Optuna's heartbeat check failed `trial`: its worker died (killed, lost), which says nothing of its
    parameters. It runs again once, as a trial a signal stopped does: the same parameters, continued from its
    folder's last.pt when it has one, and it is not counted (`continued_later`). A rerun that dies too counts as
    failed: a configuration that kills its worker (out of memory) is not retried for ever."""
    if trial.user_attrs.get(RETRY_OF) is not None:
        return
    keep = {k: v for k, v in trial.user_attrs.items() if k == UNTUNED}
    folder = trial.user_attrs.get("run")
    if folder and RunDir(folder).state() == "interrupted":
        keep[RESUME_FROM] = folder
    study.enqueue_trial(trial.params, user_attrs={**keep, RETRY_OF: trial.number})


def continued_later(study: "optuna.Study") -> set[int]:
    """Numbers of the trials a later trial continues or reruns: stopped by a signal or abandoned (INTERRUPTED),
    or failed by a dead worker and re-queued (`requeue_dead`). They do not count, nor stand for their role."""
    trials = study.get_trials(deepcopy=False)
    return {t.number for t in trials if t.user_attrs.get(INTERRUPTED)} | \
        {t.user_attrs[RETRY_OF] for t in trials if t.user_attrs.get(RETRY_OF) is not None}


def ended(study: "optuna.Study") -> list:
    """Trials that count toward --trials: finished one way or another (complete, pruned or failed), but not
    those a later trial continues (continued_later)."""
    from optuna.trial import TrialState

    later = continued_later(study)
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                 TrialState.FAIL))
            if t.number not in later]


def counted(study: "optuna.Study") -> int:
    return len(ended(study))


def claim_trials(out: Path, study_name: str, storage: str) -> None:
    """OUT/trials/ holds the trial folders of one study (trial<N> is its trial number): TuneError for another
    study, whose trial 0 would train into this one's trial0000."""
    owner, me = out / OWNER_FILE, {"study": study_name, "storage": shown_storage(storage)}
    if owner.is_file():
        have = json.loads(owner.read_text())
        if have != me:
            raise TuneError(f"{out} holds the trials of study {have['study']!r} in {have['storage']}; one folder "
                            f"holds one study: give another --out (or the same --study-name and --storage to "
                            f"continue that one)")
        return
    atomic_write_text(owner, json.dumps(me))


class _QuietInterrupt(logging.Filter):
    """Optuna logs a trial that raised, with its traceback, in two warnings; a signal's stop is not a failure and
    is said once, by tune, in one line. Attached to the logger of optuna.study._optimize while tune runs."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        words = record.getMessage().split()
        trial = words[1] if len(words) > 1 and words[0] == "Trial" else None
        if record.exc_info and isinstance(record.exc_info[1], Interrupted):
            self.stopped.add(trial)
        return trial is None or trial not in self.stopped


# --- the command ---------------------------------------------------------------------------------

@dataclass
class TuneResult:
    study: Any
    best: Any                      # the chosen FrozenTrial (`chosen`: the best, or the untuned defaults)
    report: dict                   # its run's report.json (val and test of its chosen epoch)
    recipe: Path
    tested: int                    # trials whose test split was ever evaluated
    versus_untuned: str            # the chosen trial against the untuned defaults, in words
    mode: str                      # MODES key


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tune(base: TrainConfig, trials: int = DEFAULT_TRIALS, mode: str = DEFAULT_MODE, out: PathLike = DEFAULT_OUT,
         storage: Optional[str] = None, study_name: str = DEFAULT_STUDY, sampler_seed: int = DEFAULT_SAMPLER_SEED,
         pruner: Union[str, Any] = "median", log: Callable[[str], Any] = _stderr) -> TuneResult:
    """Run trials until the study has `trials` finished ones, test the best trial once, write the outputs.

    `pruner` is a name of PRUNERS or an Optuna pruner object."""
    _optuna()                        # a missing install is one line before anything starts
    check_request(base, trials, study_name, out, storage)
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = resolve_config(base, {"data": str(Path(base.data).expanduser().resolve()),
                                 **mode_fields(mode, out, base.cache_dir, base.cache_features, base.freeze_backbone)})
    storage = storage or default_storage(out)
    claim_trials(out, study_name, storage)
    # the whole command, not only a trial's training: a signal between trials used to kill the process (143)
    with StopControl(parse_signals(base.stop_signals)) as stop, rerun_resumes("tune"):
        study = open_study(storage, study_name, make_sampler(sampler_seed),
                           make_pruner(pruner) if isinstance(pruner, str) else pruner, settings_of(base, mode),
                           out / ".study.lock", untuned_params(base))
        resume_sampling(study, sampler_seed)
        fail_abandoned(study, out, log)
        flying = len(in_flight(study))
        log(f"study {study_name!r} in {shown_storage(storage)}: {counted(study)} trial(s) finished, "
            + (f"{flying} running in other workers, " if flying else "") + f"{max(0, to_go(study, trials))} to go")
        try:
            while True:   # again when a trial waited for turned out abandoned (not counted: its slot is free)
                if to_go(study, trials) > 0:
                    run_trials(study, make_objective(base, out, stop), trials, out, stop)
                wait_for_running(study, out, log, stop)
                if to_go(study, trials) <= 0:
                    break
        except Interrupted:
            with exclusive(out / ".tune.lock"):     # a stopped tune says what ran, the stopped attempt included
                write_files(out, {OUTPUT_FILES[1]: trials_csv(study)})
            raise
        return finish_study(study, out, storage, log)


def check_request(base: TrainConfig, trials: int, study_name: str, out: PathLike,
                  storage: Optional[str] = None) -> None:
    """Everything that would make the study fail or mislead, said in one line before anything is written (OUT's
    study.db too, which holds the study when no `storage` is given)."""
    refuse_torchrun("tune")
    if trials < 1:
        raise TuneError(f"--trials must be >= 1, got {trials}")
    if not study_name.strip():
        raise TuneError("--study-name must not be empty")
    if not base.data:
        raise TuneError("--data DIR is required (or a --recipe that sets data)")
    train.check_data(base)           # one line before a study (and its first failed trial) exists
    check_out(out, base.data, "tune")
    refuse_others(out, OUTPUT_FILES + (() if storage else (STORAGE_FILE,)), TRIAL_COLUMNS)
    check_backbone(base.backbone, base.weights)
    if base.stages:
        raise TuneError("tune samples one lr and one length per trial; --stages (a recipe's multi-stage schedule) "
                        "would train something else than a trial records: remove it")
    if base.select_on != "val":
        raise TuneError("tune selects on val only; a recipe with select_on: test would select on test (remove it)")


def in_flight(study: "optuna.Study") -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def to_go(study: "optuna.Study", trials: int) -> int:
    """Trials still to start: `trials` less those ended and those other workers are running (counting only the
    ended ones, a worker started one more while another ran the last, and the study overshot --trials)."""
    return trials - counted(study) - len(in_flight(study))


def run_trials(study: "optuna.Study", objective: Callable, trials: int, out: Path,
               control: Optional[StopControl] = None) -> None:
    """This worker's share of the trials, until the study (all workers together) has `trials` ended or running
    ones. A signal stops the trial in flight, which the next tune continues (make_objective): Optuna's traceback
    for it is filtered, and tune says so in one line. A signal after a trial's end (`control`, the command's)
    starts no other trial and stops the command."""
    def stop(st: "optuna.Study", _: Any) -> None:
        if to_go(st, trials) <= 0 or (control is not None and control.received):    # the running ones are others'
            st.stop()

    quiet, optimize_log = _QuietInterrupt(), logging.getLogger("optuna.study._optimize")
    optimize_log.addFilter(quiet)
    try:
        with rerun_resumes("tune"):
            study.optimize(objective, n_trials=to_go(study, trials),
                           callbacks=[stop, lambda st, _: drop_checkpoints(st, out)],
                           catch=(NonFiniteLoss, ConfigError))
            if control is not None:
                control.raise_if_stopped("between trials")
    finally:
        optimize_log.removeFilter(quiet)


def wait_for_running(study: "optuna.Study", out: Path, log: Callable[[str], Any],
                     control: Optional[StopControl] = None, poll_s: float = 1.0) -> None:
    """Wait for the trials other workers are running now, so that the best trial is chosen, and tested, once
    they have ended rather than once per worker. Trials of a worker that died end as failed when their
    heartbeat is older than the grace period; a trial with no heartbeat at all ends as abandoned
    (`fail_abandoned`): Optuna's check skips those, and a worker waited for it forever. A signal stops the wait."""
    import time

    from optuna.storages import fail_stale_trials

    running = {t.number for t in in_flight(study)}
    if running:
        log(f"waiting for {len(running)} trial(s) that other workers are running (a worker killed without a word "
            f"is known by its silence: its trial ends as failed {GRACE_S} s after its last heartbeat)")
    while running:
        if control is not None:
            control.raise_if_stopped("while waiting for other workers' trials")
        time.sleep(poll_s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", _optuna().exceptions.ExperimentalWarning)
            fail_stale_trials(study)
        fail_abandoned(study, out, log)
        running &= {t.number for t in in_flight(study)}


def _heartbeats(study: "optuna.Study") -> set[int]:
    """Storage ids of the trials that ever recorded a heartbeat (Optuna's RDB table; it has no public query)."""
    import sqlalchemy  # lazy: comes with Optuna, which tune imports only when it runs

    storage = getattr(study._storage, "_backend", study._storage)
    with storage.engine.connect() as db:
        return {row[0] for row in db.execute(sqlalchemy.text("SELECT trial_id FROM trial_heartbeats"))}


def fail_abandoned(study: "optuna.Study", out: Path, log: Callable[[str], Any]) -> None:
    """A RUNNING trial older than ABANDONED_S that never recorded a heartbeat was left by a process that died
    before it trained (a live worker beats as soon as its trial starts): it ends as failed and not counted, like
    a trial a signal stopped, and its enqueued parameters (the untuned defaults, a trial to continue) go back in
    the queue. Under the study lock, so two waiting workers do not both enqueue them."""
    import datetime

    from optuna.trial import TrialState

    with exclusive(out / ".study.lock"):
        beating, now = _heartbeats(study), datetime.datetime.now()
        for t in in_flight(study):
            if t._trial_id in beating or (now - t.datetime_start).total_seconds() < ABANDONED_S:
                continue
            log(f"trial {t.number} is running in no worker (no heartbeat since {t.datetime_start:%H:%M:%S}): "
                f"abandoned, not counted")
            keep = {k: v for k, v in t.user_attrs.items() if k in (UNTUNED, RESUME_FROM)}
            study._storage.set_trial_user_attr(t._trial_id, INTERRUPTED, True)
            fixed = t.system_attrs.get("fixed_params", {})
            if fixed or keep:
                study.enqueue_trial(fixed, user_attrs=keep)
            study.tell(t.number, state=TrialState.FAIL)


def drop_checkpoints(study: "optuna.Study", out: Path) -> None:
    """Delete the checkpoints of every ended trial but the best so far: each holds the whole model (backbone
    included), and only the best trial's are ever used (to test it). Configs, metrics and logs stay. Under the
    lock that `finish_study` holds while it tests the best trial."""
    import shutil

    from optuna.trial import TrialState

    with exclusive(out / ".tune.lock"):
        finished = ended(study)           # a trial a signal stopped is left whole: its successor continues it
        done = [t.number for t in finished if t.state == TrialState.COMPLETE]
        best = chosen(study).number if done else None
        for t in finished:
            if t.number != best and "run" in t.user_attrs:
                shutil.rmtree(RunDir(t.user_attrs["run"]).checkpoints, ignore_errors=True)


def untuned_trial(study: "optuna.Study") -> Optional[Any]:
    """The trial that trained the untuned defaults (None in a study begun before tune enqueued them)."""
    later = continued_later(study)
    return next((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(UNTUNED) and t.number not in later),
                None)


def chosen(study: "optuna.Study") -> Any:
    """The trial that becomes the recipe: the best on val, unless it does not beat the untuned defaults (a tie
    too): then the defaults, since the search found nothing better than not tuning. ValueError: none complete."""
    from optuna.trial import TrialState

    best, untuned = study.best_trial, untuned_trial(study)
    if untuned is not None and untuned.state == TrialState.COMPLETE and untuned.value >= best.value:
        return untuned
    return best


def versus_untuned(study: "optuna.Study", best: Any) -> str:
    """The chosen trial against the untuned defaults on val, in a sentence for the log, the JSON and the page."""
    from optuna.trial import TrialState

    untuned = untuned_trial(study)
    if untuned is None:
        return ("no trial of this study trained the untuned defaults (it began before tune ran them), so the "
                "recipe was not checked against them")
    outside = untuned.user_attrs.get(OUTSIDE)
    note = f"; the defaults' {', '.join(outside)} lie outside the search space" if outside else ""
    if untuned.state != TrialState.COMPLETE:
        how = {"FAIL": "failed", "PRUNED": "were pruned"}.get(untuned.state.name, "did not finish")
        why = untuned.user_attrs.get("error", "")
        return (f"the untuned defaults (trial {untuned.number}) {how}{f' ({why})' if why else ''}, so the recipe, "
                f"the best other trial, was not checked against them{note}")
    if best.number == untuned.number:
        return (f"no trial beat the untuned defaults (trial {untuned.number}, val top-1 {untuned.value:.4f}); the "
                f"written recipe is the defaults{note}")
    return (f"the tuned recipe beats the untuned defaults by +{best.value - untuned.value:.4f} val top-1 (trial "
            f"{best.number}: {best.value:.4f}; the defaults, trial {untuned.number}: {untuned.value:.4f}){note}")


def study_mode(study: "optuna.Study") -> str:
    """The mode the study was made with (in its settings), so a continuing command names the right one."""
    return study.user_attrs.get("settings", {}).get("mode", DEFAULT_MODE)


def finish_study(study: "optuna.Study", out: Path, storage: str, log: Callable[[str], Any]) -> TuneResult:
    """Test the chosen trial (once: resuming its stopped run runs train.finish), then write best.yaml, trials.csv
    and tune.html. Under a lock: two workers ending together test it once and write in turn."""
    with exclusive(out / ".tune.lock"):
        try:
            best = chosen(study)
        except ValueError:
            reasons = sorted({t.user_attrs.get("error", "") for t in study.trials} - {""})
            raise TuneError("no trial finished, so there is no best configuration"
                            + (f"; failures: {'; '.join(reasons[:3])}" if reasons else "")) from None
        report = test_once(RunDir(best.user_attrs["run"]), log)
        recipe = out / OUTPUT_FILES[0]
        tested = sum(RunDir(t.user_attrs["run"]).is_finished() for t in study.trials if "run" in t.user_attrs)
        verdict = versus_untuned(study, best)
        write_files(out, {OUTPUT_FILES[0]: recipe_text(study, best, report),
                          OUTPUT_FILES[1]: trials_csv(study),
                          OUTPUT_FILES[2]: tune_html(study, best, report, storage, tested, verdict)})
    mode = study_mode(study)
    log(f"mode: {MODE_NAMES[mode]}; chosen trial {best.number}: val top-1 {report['val']['top1']:.4f}, test top-1 "
        f"{report['test']['top1']:.4f} (test evaluated once, for this trial); recipe {recipe}")
    log(verdict)
    return TuneResult(study, best, report, recipe, tested, verdict, mode)


def test_once(run: RunDir, log: Callable[[str], Any]) -> dict:
    """The report of a trial's run, finishing it first if it stopped before its test evaluation."""
    if not run.is_finished():
        log(f"testing the best trial once: resuming {run.path} to its end")
        return train.run(resume=run.path)
    return run.read_report()


# --- outputs -------------------------------------------------------------------------------------

def recipe_text(study: "optuna.Study", best: Any, report: dict) -> str:
    """The chosen trial's config as a recipe `train --recipe` takes unchanged (no run folder in it)."""
    cfg = TrainConfig.from_dict({**best.user_attrs["config"], "out": ""}, saved=True)
    what = "the untuned defaults" if best.user_attrs.get(UNTUNED) else "the best on val"
    return (f"# trial {best.number} ({what}) of study {study.study_name!r}, mode {MODE_NAMES[study_mode(study)]}: "
            f"val top-1 {report['val']['top1']:.4f}, test top-1 {report['test']['top1']:.4f} (evaluated once)\n"
            f"# spinal-transfer train --recipe best.yaml --out runs/best\n" + yaml_generator() + cfg.to_yaml())


PARAMS = tuple(name for name, _, _ in SPACE)
TRIAL_COLUMNS = ("number", "state", "val_top1", "best_epoch", "epochs_reported", "seconds", *PARAMS, "role", "run",
                 "error")


def _trial_row(t: Any, later: set[int]) -> dict:
    """trials.csv's row of trial `t`; `later`: the trials continued by a later one (continued_later)."""
    seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
        else ""
    state = "INTERRUPTED" if t.number in later else t.state.name
    return {"number": t.number, "state": state, "val_top1": "" if t.value is None else t.value,
            "best_epoch": t.user_attrs.get("best_epoch", ""), "epochs_reported": len(t.intermediate_values),
            "seconds": seconds, **{p: t.params.get(p, "") for p in PARAMS},
            "role": "untuned defaults" if t.user_attrs.get(UNTUNED) else "sampled", "run": t.user_attrs.get("run", ""),
            "error": t.user_attrs.get("error", "") or _died(t, later)}


def _died(t: Any, later: set[int]) -> str:
    """The error of a trial failed by Optuna's heartbeat check (no error of its own, not stopped by a signal): its
    worker died; whether it runs again (requeue_dead) or died a second time."""
    if t.state.name != "FAIL" or t.user_attrs.get(INTERRUPTED):
        return ""
    retry_of = t.user_attrs.get(RETRY_OF)
    return (f"no heartbeat for {GRACE_S} s: its worker died (killed or lost)" +
            ("; run again once" if t.number in later else f", as trial {retry_of}'s did: not run again"
             if retry_of is not None else ""))


def trials_csv(study: "optuna.Study") -> str:
    """Every trial of the study, one row each (a pruned trial's val_top1 is its last reported value)."""
    later = continued_later(study)
    return to_csv(TRIAL_COLUMNS, ([_trial_row(t, later)[c] for c in TRIAL_COLUMNS] for t in study.trials))


@contextlib.contextmanager
def _pyplot_figure() -> Iterator[list]:
    """Optuna's matplotlib plots draw with pyplot; every figure they open is closed again here."""
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    figs: list = []
    try:
        yield figs
    finally:
        for n in set(plt.get_fignums()) - before:
            plt.close(n)


def plots(study: "optuna.Study", seed: int = 0) -> list[tuple[str, Optional[bytes], str]]:
    """(title, PNG or None, why not) of Optuna's history, importance and intermediate-value plots."""
    optuna = _optuna()
    from optuna.visualization import matplotlib as vm

    makers = (("optimization history (val top-1 per trial, best so far)", vm.plot_optimization_history, {}),
              ("parameter importances (fANOVA on the finished trials' val top-1)", vm.plot_param_importances,
               {"evaluator": optuna.importance.FanovaImportanceEvaluator(seed=seed)}),
              ("val top-1 per epoch of every trial (pruned trials end early)", vm.plot_intermediate_values, {}))
    out = []
    for title, make, kw in makers:
        with warnings.catch_warnings(), _pyplot_figure():
            warnings.simplefilter("ignore")
            try:
                ax = make(study, **kw)
                ax = ax.flat[0] if hasattr(ax, "flat") else ax
                out.append((title, figure_png(ax.figure), ""))
            except Exception as e:        # too few finished trials, or a parameter that never varied
                out.append((title, None, f"not drawn: {str(e).splitlines()[0] if str(e) else type(e).__name__}"))
    return out


def tune_html(study: "optuna.Study", best: Any, report: dict, storage: str, tested: int, verdict: str) -> str:
    """One self-contained page: summary, the recipe, the search space, the plots (embedded PNGs), all trials."""
    e = html.escape
    states: dict[str, int] = {}
    later = continued_later(study)
    rows = [_trial_row(t, later) for t in study.trials]
    for row in rows:
        state = row["state"].lower()
        states[state] = states.get(state, 0) + 1
    val, test = report["val"], report["test"]
    summary = (f"Mode: {MODE_NAMES[study_mode(study)]}. Study {study.study_name!r} in {shown_storage(storage)}: "
               f"{len(study.trials)} trials (" + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
               + f"). Chosen trial {best.number}: val "
               f"top-1 {100 * val['top1']:.2f}% (the trials' score); test top-1 {100 * test['top1']:.2f}%, "
               f"balanced accuracy {100 * test['balanced_accuracy']:.2f}%, macro F1 {100 * test['macro_f1']:.2f}%. "
               f"The test split was evaluated for {tested} trial(s) in all: the chosen one at the end of each tune "
               f"command. Against the untuned defaults: {verdict}.")
    space = Table("", (("parameter", "p"), ("values", "v"), ("when", "w")),
                  [{"p": p, "v": v, "w": w} for p, v, w in SPACE])
    trials = Table("", [(c, c) for c in TRIAL_COLUMNS if c not in ("run", "error")] + [("error", "error")],
                   [{k: _fmt(v) for k, v in row.items()} for row in rows],
                   muted=[i for i, t in enumerate(study.trials) if t.state.name != "COMPLETE"])
    figures = "".join(f"<h3>{e(title)}</h3>" + (png_img(png, title) if png else f"<p>{e(why)}</p>")
                      for title, png, why in plots(study))
    body = (f"<p>{e(summary)}</p>\n<h2>best configuration (best.yaml)</h2>\n"
            f"<pre>{e(recipe_text(study, best, report))}</pre>\n<h2>plots</h2>\n{figures}\n"
            f"<h2>search space</h2>\n{table_html(space)}\n<h2>trials</h2>\n{table_html(trials)}\n"
            f"<p>Shaded: pruned, failed or unfinished trials. val_top1 is a trial's score: val top-1 of the epoch "
            f"its run kept (best.pt); "
            f"a pruned trial's is its last reported value. The trial whose role is 'untuned defaults' trains the "
            f"options as given and train's defaults for the rest; a parameter left to train's rules (e.g. the "
            f"spinal layer width from the class count) has no value in its row.</p>")
    return page("Head and hyper-parameter search", body)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)
