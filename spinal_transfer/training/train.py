"""Fine-tune on an image folder. `run` reads top to bottom: open the run folder, set up, train each stage
epoch by epoch, select, test once.

Stages follow the paper's scripts: each stage builds a fresh optimizer and scheduler and starts from the
previous stage's best weights. The CheckpointSaver chooses the best epoch on `select_on` (val by default) by
`select_metric` (val loss by default); the test split is evaluated once, at the end, with the chosen weights.
Epochs are numbered from 1 wherever a person reads them (log, metrics.jsonl, report.json, plots, model card).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import METRIC_NAMES, Stage, TrainConfig, resume_changes, resume_config
from ..data.augment import values_in_force
from ..data.leakage import describe as describe_leakage
from ..data.leakage import leakage
from ..data.loaders import EpochSampler, ShardSampler, class_weights, train_drop_last
from ..data.skiplog import SkipLog
from ..data.splits import (SPLIT_NAMES, Splits, check_outside, config_splits, fingerprints, load_recorded,
                           record)
from ..data.transforms import DataConfig
from ..errors import (CheckpointError, ConfigError, DataError, Interrupted, NonFiniteLoss, ResourceError,
                      RunFolderError, UserError, option_value)
from ..evaluation.calibration import NO_VAL_NOTE, calibrate
from ..evaluation.evaluate import TTA, Outputs, predict_logits, predict_logits_tta, write_predictions
from ..evaluation.interpret import read_predictions, top_losses
from ..evaluation.metrics import classification_metrics, summary
from ..evaluation.plots import plot_calibration, plot_confusion, plot_curves, plot_top_losses
from ..evaluation.report_page import write_report_html
from ..models.heads import head_options
from ..models.restore import recorded_transform_input, set_transform_input
from ..models.surgery import build_model, check_backbone, get_head
from ..runs.checkpoint import checkpoint_meta, load_checkpoint
from ..runs.rundir import RunDir, check_new_run, default_run_name
from ..utils.atomic import system_error
from ..utils.distributed import (
    any_rank,
    barrier,
    broadcast_buffers,
    broadcast_object,
    init_distributed,
    is_main,
    rank,
    sum_over_ranks,
    world_size,
)
from ..utils.preemption import StopControl, parse_signals
from ..utils.runtime import (
    amp_dtype,
    attach_log_file,
    configure_process,
    pick_device,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_logging,
    use_channels_last,
)
from ..utils.tracking import Tracker, record_destination, recorded_destination
from . import bn_stats
from .features import cached_split, default_cache_dir, feature_loader
from .inputs import RunInputs, data_config, train_sampler
from .lr_find import find_lr_as_run, plot_lr_find
from .optim import FreezePolicy, make_optimizer, make_scheduler
from .preview import write_batch_preview
from .selection import CheckpointSaver, EarlyStopping, selection_score
from .step import StepSettings, train_step

log = logging.getLogger("spinal_transfer")
# where a last.pt written before EarlyStopping kept its own state has that state (Progress kept it)
LEGACY_EARLY = {"early_best": "best", "early_best_epoch": "best_epoch", "early_bad": "bad"}
LR_FIND_STEPS = 100     # --lr auto: enough for a smooth curve, a minute on a CPU (the lr-find command: 200)


@dataclass
class Progress:
    """How far the schedule is: epochs finished (the next is epoch + 1), optimizer steps taken in all and in
    the current stage, and within an interrupted epoch the batches done (per rank), the training loss summed
    so far over every rank's images and the seconds spent training them, so that the resumed epoch's metrics
    row covers the whole epoch (None: a last.pt written before the seconds were kept). Saved in last.pt."""

    epoch: int = 0
    step: int = 0
    stage_step: int = 0
    batch: int = 0
    epoch_loss: float = 0.0
    epoch_seen: int = 0
    epoch_seconds: Optional[float] = 0.0
    lr: Optional[float] = None      # the head's lr of the last optimizer step (`step_lr`)
    stopped: dict = field(default_factory=dict)      # stage index -> {ran, epoch, reason} when it stopped early

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "Progress":
        """last.pt's progress; one written before EarlyStopping kept its own state carried that state here
        (early_best, early_best_epoch, early_bad), which `early_stopping_state` reads instead. One written inside
        an epoch before epoch_seconds was kept has no record of that epoch's time so far (None)."""
        saved = ckpt["progress"]
        known = {"epoch_seconds": None} if saved.get("batch") and "epoch_seconds" not in saved else {}
        return cls(**{**{k: v for k, v in saved.items() if k not in LEGACY_EARLY}, **known})

    def step_lr(self, opt: torch.optim.Optimizer) -> float:
        """The head's lr of the last optimizer step (what metrics.jsonl and the progress bar show: a per-step
        schedule has already moved the optimizer's lr on to the next step's); before the first step, the first's."""
        return self.lr if self.lr is not None else opt.param_groups[0]["lr"]

    def locate(self, stages: list[Stage]) -> tuple[int, int]:
        """(stage index, epochs finished in it) of the next epoch; (len(stages), 0) when the schedule is done.
        A stage that stopped early counts with the epochs it ran."""
        start = 0
        for i, s in enumerate(stages):
            length = self.stopped[i]["ran"] if i in self.stopped else s.epochs
            if self.epoch < start + length:
                return i, self.epoch - start
            start += length
        return len(stages), 0


@dataclass
class Session:
    """Everything a run needs once set up; built by `setup`, used by the stage and epoch functions."""

    cfg: TrainConfig
    run: RunDir
    settings: StepSettings                # how each batch is stepped: device, precision, loss, accumulation, ...
    model: nn.Module                      # the raw model (the loop may call a DDP/compiled wrapper of it)
    ema: Any
    classes: list[str]
    samples: dict[str, list]              # per split, the samples its loader reads (in cache mode: what loaded)
    loaders: dict[str, Any]
    sampler: EpochSampler
    scaler: torch.amp.GradScaler
    skips: SkipLog
    saver: CheckpointSaver
    freeze: FreezePolicy
    early: EarlyStopping
    progress: Progress
    control: StopControl
    tracker: Tracker
    resume: Optional[dict] = None         # last.pt while it still has state to restore
    resumes: list = field(default_factory=list)   # per resume: where it continued, what it changed (report.json)
    on_epoch: Optional[Callable[[dict], None]] = None
    leakage: Optional[dict] = None        # held-out images that are copies of train images (None: not checked)
    _wrapped: dict = field(default_factory=dict)

    def forward_module(self, frozen: bool) -> nn.Module:
        """What the loop calls: the head alone on cached features, else the whole model; under torchrun a DDP
        wrapper, rebuilt whenever the set of trainable parameters changes (DDP fixes it at wrapping)."""
        self.freeze.apply(self.model, frozen)
        if frozen not in self._wrapped:
            self._wrapped.clear()
            m = get_head(self.model) if self.cfg.cache_features else self.model
            if world_size() > 1:
                device = self.settings.device
                ids = [device.index] if device.type == "cuda" else None
                m = nn.parallel.DistributedDataParallel(m, device_ids=ids)
            self._wrapped[frozen] = torch.compile(m) if self.cfg.compile else m
        return self._wrapped[frozen]

    def eval_module(self) -> nn.Module:
        m = CheckpointSaver.eval_module(self.model, self.ema)
        return get_head(m) if self.cfg.cache_features else m


# --- the run -------------------------------------------------------------------------------------

def run(cfg: Optional[TrainConfig] = None, resume: Optional[str | Path] = None, overwrite: bool = False,
        on_epoch: Optional[Callable[[dict], None]] = None, track_as: Optional[tuple[Path, str]] = None) -> dict:
    """Fine-tune according to `cfg` into its run folder (README, "What lands in RUN/"); return the report.

    `resume`: continue the run in that folder from its last.pt, with its own config; `cfg` (optional) may
    change what a resumed run may change (config.RESUME_SAFE: more epochs, workers, ...) and nothing else.
    A new run refuses a folder that holds a run unless `overwrite`. `on_epoch(row)` is called on every rank
    with each epoch's metrics row once last.pt is written (a search prunes a trial by raising from it).
    `track_as`: (the folder of the default MLflow store, the run's name in the trackers) for a command that
    drives many runs and keeps them in one store (default: beside the run folder, named after it)."""
    if cfg is None:
        if resume is None:
            raise RunFolderError("train.run needs a TrainConfig, or a run folder to resume")
        cfg = RunDir(resume).read_config()
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"train.run takes a TrainConfig, not a {type(cfg).__name__} (TrainConfig.from_dict makes "
                          f"one from a dict)")
    cfg = TrainConfig.from_dict(cfg.to_dict())   # one built by hand is checked as a loaded one, before any work
    init_distributed(cfg.device)
    device = pick_device(cfg.device)
    configure_process(device)
    setup_logging()
    run_dir = RunDir(resume if resume is not None else cfg.out or
                     broadcast_object(default_run_name(cfg.backbone, cfg.head)))
    if resume is None:
        _check_data_folder(cfg.data, run_dir, cfg.cache_dir if cfg.cache_features else None)
        check_backbone(cfg.backbone, cfg.weights)  # a typo, or offline and not cached: refuse before the data is read
        data_config(cfg)                           # a resize the crop does not fit: before --overwrite clears a run
    if resume is None and overwrite and run_dir.holds_run():
        _on_main(lambda: check_data(cfg))   # the data folder's own errors, too, before it is cleared
    if resume is None and not overwrite:         # refuse before touching anything (checked again under the lock)
        _on_main(lambda: check_new_run(run_dir, overwrite, log.info))
    with _exclusive(run_dir):
        ckpt = _open(run_dir, resume is not None, overwrite)
        if ckpt is not None:           # its own config, with the changes a resumed run may take
            if cfg.lr == "auto" and run_dir.lr_find.is_file():     # the requeued command of an --lr auto run
                cfg = dataclasses.replace(cfg, lr=ckpt["config"]["lr"])  # means the lr the run found
            cfg = resume_config(TrainConfig.from_dict(ckpt["config"], saved=True), cfg,
                                ckpt["progress"]["epoch"])
            if run_dir.is_finished() and Progress.from_checkpoint(ckpt).locate(cfg.resolved_stages())[0] == \
                    len(cfg.resolved_stages()):
                log.info(f"{run_dir.path} is finished ({ckpt['progress']['epoch']} epochs); nothing to add. To "
                         f"train more, resume with a larger --epochs")
                return run_dir.read_report()
        with StopControl(parse_signals(cfg.stop_signals), cfg.checkpoint_every, cfg.checkpoint_every_steps) as stop:
            s = setup(cfg, run_dir, device, ckpt, stop, track_as)
            s.on_epoch = on_epoch
            try:
                return _train(s)
            except BaseException as e:
                s.tracker.close("KILLED" if isinstance(e, (Interrupted, KeyboardInterrupt)) else "FAILED")
                raise _explain(e, cfg, device, run_dir) from None


def _explain(e: BaseException, cfg: TrainConfig, device: torch.device, run: RunDir) -> BaseException:
    """The error a failed run ends with, in plain words and in train.log: a diverged loss, a full disk or lost
    permission, memory running out. Anything else is returned as it is (a bug keeps its traceback)."""
    if isinstance(e, NonFiniteLoss):
        e = NonFiniteLoss(f"{e}; stopped. {_last_good(run)} Try a lower --lr, --amp none, or --clip-grad 1.0")
    elif isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
            isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e))):
        e = _out_of_memory(e, cfg, device, run)
    elif isinstance(e, OSError) and not isinstance(e, UserError) and e.errno in (
            errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        e = system_error(e, Path(e.filename or run.path))      # writing plots, logs, predictions
    if isinstance(e, UserError):
        log.error(f"{e.prefix}: {e}", extra={"file_only": True})   # into train.log; cli.main prints it
    return e


def _check_data_folder(data: str, run: RunDir, cache_dir: Optional[str]) -> None:
    """A data folder is given, and neither the run folder nor a --cache-dir of cached features is inside it
    (what is written there would be read as a class by the next train on it)."""
    if not data:
        raise DataError(f"no data folder given ({option_value('data', 'DIR')})")
    check_outside(run.path, data)
    if cache_dir:
        check_outside(cache_dir, data, "the feature cache (--cache-dir)")


def _resume_point(progress: dict) -> str:
    """Where a checkpoint's progress continues: inside an epoch, or after one."""
    if progress.get("batch"):
        return f"in epoch {progress['epoch'] + 1} at batch {progress['batch']}"
    return f"after epoch {progress['epoch']}"


def _last_good(run: RunDir) -> str:
    """Where the run can be continued from, named only if it exists."""
    if not run.last.is_file():
        return "No checkpoint was saved yet."
    return f"The last good checkpoint is {run.last} ({_resume_point(load_checkpoint(run.last)['progress'])}; not " \
           f"overwritten)."


def _out_of_memory(e: BaseException, cfg: TrainConfig, device: torch.device, run: RunDir) -> ResourceError:
    half = cfg.batch_size // 2
    smaller = (f"try --batch-size {half} --accum-steps {cfg.accum_steps * 2} (the same global batch; a resumed run "
               f"accepts it)" if half >= 2 else "try a smaller --img-size")      # a batch is at least 2 images
    return ResourceError(f"out of memory on {device} with --batch-size {cfg.batch_size}"
                         f"{f' at --img-size {cfg.img_size}' if cfg.img_size else ''}: {smaller}"
                         + (" or --amp bf16" if cfg.amp in ("auto", "none") else "") + f". {_last_good(run)}")


def _train(s: Session) -> dict:
    stages = s.cfg.resolved_stages()
    si, _ = s.progress.locate(stages)
    if s.run.is_finished() and is_main():
        log.info(f"extending the finished run: its report moves to {s.run.set_aside_report().name}")
    barrier()
    for i in range(si, len(stages)):
        run_stage(s, i, stages[i])
    s.control.finishing = True          # a signal from here on lets the report be written: it is the last step
    return finish(s)


def _on_main(step: Callable[[], Any]) -> None:
    """Run `step` on rank 0; a UserError it raises is raised on every rank (never one rank alone)."""
    refused: Optional[UserError] = None
    if is_main():
        try:
            step()
        except UserError as e:
            refused = e
    refused = broadcast_object(refused)
    if refused is not None:
        raise refused


@contextlib.contextmanager
def _exclusive(run: RunDir):
    """Rank 0 holds the run folder's lock for the whole run; every rank learns whether it got it."""
    with contextlib.ExitStack() as stack:
        _on_main(lambda: stack.enter_context(run.lock()))
        yield


def _open(run: RunDir, resume: bool, overwrite: bool) -> Optional[dict]:
    """The run folder made ready (rank 0 writes): a new run checked and cleared when asked to, a resumed one
    rid of an interrupted write's leftovers. Returns last.pt when resuming."""
    def ready() -> None:
        for p in run.remove_stray_temps():
            log.info(f"removed {p}, left by an interrupted write")
        if not resume:
            check_new_run(run, overwrite, log.info)

    _on_main(ready)
    if not resume:
        return None
    if not run.last.is_file() and run.is_finished():
        raise RunFolderError(f"cannot resume {run.path}: {run.last} is missing (removed since the run finished); its "
                             f"best.pt still serves evaluate and export; to train more, start over with --overwrite")
    if not run.last.is_file():
        raise RunFolderError(f"cannot resume {run.path}: it has no checkpoint yet ({run.last} is missing; the run "
                             f"stopped before finishing an epoch); start it over with --overwrite")
    return _load_last(run)


def _load_last(run: RunDir) -> dict:
    """last.pt, refused in one line when the run cannot continue from it: damaged, weights only (best.pt copied
    over it: no optimizer, no progress), or another run's (RunDir.check_own: a last.pt copied from another run
    would train on from that run's weights and place in its epoch)."""
    instead = ("a run continues only from the last.pt it wrote: " + (
        f"{run.best} still serves evaluate and export, and `train --data DIR --weights {run.best} --out NEW` starts "
        f"a new run from its weights; " if run.best.is_file() else "") + "--overwrite starts this run over")
    ckpt = load_checkpoint(run.last, advice=instead)
    if "progress" not in ckpt:
        raise CheckpointError(f"cannot resume {run.path}: {run.last} holds a model's weights only (a copy of "
                              f"best.pt?), not a training state; {instead}")
    run.check_own(ckpt, run.last, instead)
    return ckpt


# --- set-up --------------------------------------------------------------------------------------

def setup(cfg: TrainConfig, run: RunDir, device: torch.device, ckpt: Optional[dict] = None,
          control: Optional[StopControl] = None, track_as: Optional[tuple[Path, str]] = None) -> Session:
    """Everything the loop needs: data, model, input pipeline, loaders, loss, checkpoint saver, restored state."""
    seed_everything(cfg.seed, cfg.deterministic)
    log.info(f"run folder {run.path}" + (f" (resuming {_resume_point(ckpt['progress'])})" if ckpt else ""))
    skips = SkipLog(run.skipped)
    splits = load_data(cfg, run, skips)
    model = build_model(cfg.backbone, len(splits.classes), head=cfg.head,
                        weights="none" if ckpt else cfg.weights, replace=cfg.replace, classes=splits.classes,
                        weights_partial=cfg.weights_partial, img_size=cfg.img_size, **head_options(cfg))
    if ckpt is not None:
        _carry_weights_record(model, ckpt)
    inputs = RunInputs.from_config(cfg, model, splits)   # refuses an input size the model cannot run on
    attach_log_file(run.log)                          # data and model are fine: the run folder is written from here
    if is_main() and not run.splits.is_file():
        run.write_json(run.splits, record(splits))
        run.write_json(run.classes, splits.classes)
    leak = check_leakage(cfg, splits)
    for note in model.spinal_info.notes:
        log.info(note)
    dc = inputs.data_config
    dtype, channels_last = amp_dtype(cfg.amp, device), use_channels_last(cfg.channels_last, device)
    model = _place(model, cfg, device, channels_last)
    if ckpt is None:                                  # a resumed run has the choice it made (config.yaml)
        cfg = dataclasses.replace(cfg, bn_stats=bn_stats.resolve(cfg, model, inputs, device, dtype, channels_last))
    samples, loaders, sampler = build_loaders(cfg, model, inputs, device, dtype, channels_last, run, skips)
    if is_main() and not cfg.cache_features and ckpt is None:
        _write_batch_preview(cfg, inputs, run)
    criterion, mixup = _loss(cfg, samples["train"], len(splits.classes), device)
    settings = StepSettings.from_config(cfg, device, criterion, mixup)
    lr = cfg.lr
    if cfg.lr == "auto":                              # a new run only: a resumed one has the lr it found
        hard = criterion if mixup is None else nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        lr = _auto_lr(cfg, model, loaders["train"], dataclasses.replace(settings, criterion=hard, mixup=None), run,
                      skips, control)
    cfg = finish_config(cfg, str(run.path), model, dc, lr, new_run=ckpt is None,
                        steps_per_epoch=epoch_steps(cfg, sampler.per_rank, loaders["train"].drop_last))
    resumes = resumes_so_far(ckpt, cfg) if ckpt else []
    if is_main():
        run.write_text(run.config, config_text(cfg, resumes))
    tracker = _tracker(cfg, run, track_as)
    tracker.log_params(cfg.to_dict())
    ema = _make_ema(model, cfg.ema_decay)
    saver = CheckpointSaver(run, checkpoint_meta(cfg.to_dict(), splits.classes, dc, model.spinal_info,
                                                 fingerprints(splits)),
                            multi_stage=len(cfg.resolved_stages()) > 1, state=ckpt.get("saver") if ckpt else None)
    s = Session(cfg, run, settings, model, ema, splits.classes, samples, loaders, sampler,
                torch.amp.GradScaler(device.type, enabled=settings.dtype == torch.float16), skips, saver,
                FreezePolicy(cfg.freeze_epochs, cfg.freeze_backbone, cfg.frozen_bn_stats()),
                EarlyStopping(cfg.early_stop_patience, cfg.early_stop_min_delta, cfg.select_metric), Progress(),
                control or StopControl([]), tracker, ckpt, resumes=resumes, leakage=leak)
    if ckpt is not None:
        _restore(s, ckpt)
    _log_start(s, splits)
    return s


def _tracker(cfg: TrainConfig, run: RunDir, track_as: Optional[tuple[Path, str]]) -> Tracker:
    """The run's trackers, in the store and under the name the command that drives it gave it. compare and
    reproduce pass `track_as`, kept in RUN/tracking.json; a `train --resume` of one of their runs by hand passes
    none and reads it back, so its epochs continue the same MLflow run in the command's store (not a new MLflow
    run in a store beside the run folder). A --tracking-uri given to the resume still names the store, as the
    tracking settings a resume may change always do (config.RESUME_SAFE)."""
    if is_main() and track_as is not None:
        record_destination(run.path, *track_as)
    elif is_main() and cfg.log_to:       # untracked, the record is not read (a damaged one is left as it is)
        track_as = recorded_destination(run.path)
        if track_as is not None:
            log.info(f"tracking as {track_as[1]} with the runs of {track_as[0]} (RUN/tracking.json: where the "
                     f"command that started this run keeps them)" +
                     (f"; --tracking-uri {cfg.tracking_uri} names the MLflow store" if cfg.tracking_uri else ""))
    store, name = track_as or (None, None)
    return Tracker.create(cfg.log_to, run.path, run_name=name, tracking_uri=cfg.tracking_uri,
                          experiment=cfg.experiment, enabled=is_main(), store_root=store)


def finish_config(cfg: TrainConfig, out: str, model: nn.Module, dc: DataConfig, lr: Any,
                  new_run: bool = True, steps_per_epoch: Optional[int] = None) -> TrainConfig:
    """The run's config as it runs and as config.yaml records it, made once, before the first epoch: the values
    the set-up resolved written in (the run folder; the data folder as an absolute path; the spinal width the
    head rule chose; the input size, resize, normalization and interpolation of the backbone; the selection
    split of the protocol; the lr `--lr auto` found; the policy's random erasing and crop scale, so a later
    change of a policy's default does not change a saved run (config.UNSET_BEFORE); no frozen epoch for a new
    run's random backbone; the optimizer steps per epoch that decide the epochs of a run without --epochs), so a
    resume, `evaluate` and `export` read what the run did. Nothing changes it after."""
    width = cfg.layer_width
    if cfg.head == "spinal" and width is None:         # the rule's width
        head = get_head(model)
        width = head.layer_width
        log.info(f"spinal layer width {width}: 2 x {head.num_classes} classes, at least 32, at most features/4 "
                 f"(heads.default_layer_width)")
    if new_run and cfg.epochs is None and not cfg.stages:
        cfg = dataclasses.replace(cfg, steps_per_epoch=steps_per_epoch)
        epochs = cfg.epochs_by_data()
        log.info(f"{epochs} epochs of {steps_per_epoch} optimizer steps" + (
            f": raised from --min-epochs {cfg.min_epochs} to reach --min-steps {cfg.min_steps} on this folder "
            "(--epochs N: exactly N)" if epochs > cfg.min_epochs
            else f" (--min-steps {cfg.min_steps} is reached; --epochs N: exactly N)"))
    return dataclasses.replace(
        cfg, out=out, data=str(Path(cfg.data).expanduser().resolve()),     # a resume from another directory reads it
        layer_width=width, freeze_epochs=_frozen_epochs(cfg, new_run), bn_stats=_bn_stats(cfg, new_run),
        img_size=dc.img_size,
        mean=list(dc.mean), std=list(dc.std), interpolation=dc.interpolation, select_on=selection_split(cfg), lr=lr,
        **values_in_force(cfg),
        resize_size=list(dc.resize_size) if isinstance(dc.resize_size, tuple) else dc.resize_size)


def resumes_so_far(ckpt: dict, cfg: TrainConfig) -> list[dict]:
    """Every resume of the run, this one last: where it continued and each setting it changed (config.
    resume_changes, from -> to) from the config the run had until then. config.yaml holds only the settings in
    force now, and a resume may change some that change the training (a batch size: BatchNorm's statistics)."""
    p = ckpt["progress"]
    changed = resume_changes(TrainConfig.from_dict(ckpt["config"], saved=True), cfg)
    if changed:
        log.info("resumed with " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return [*ckpt.get("resumes", []), {"at": _resume_point(p), "epochs_done": p["epoch"], "batch": p.get("batch", 0),
                                       "step": p["step"], "changed": {k: {"from": a, "to": b}
                                                                      for k, (a, b) in changed.items()}}]


def config_text(cfg: TrainConfig, resumes: list[dict]) -> str:
    """config.yaml: the settings in force, below one comment line per resume that changed any (YAML skips
    comments; report.json["resumes"] lists them all), so the file never passes for the whole run's settings."""
    notes = [f"# resumed {r['at']} with " + ", ".join(f"{k} {c['from']!r} -> {c['to']!r}"
                                                     for k, c in r["changed"].items()) + "; below: the settings now"
             for r in resumes if r["changed"]]
    return "".join(n + "\n" for n in notes) + cfg.to_yaml()


def _frozen_epochs(cfg: TrainConfig, new_run: bool) -> int:
    """A new run from --weights none trains its backbone from the first epoch: freezing a random backbone would
    only teach the head noise. Said in the log; config.yaml records the freeze_epochs used (0)."""
    if not new_run or cfg.new_run_freeze_epochs() == cfg.freeze_epochs:
        return cfg.freeze_epochs
    log.info(f"freeze_epochs {cfg.freeze_epochs} -> 0: with --weights none the backbone is random, and a frozen "
             f"random backbone would only teach the head noise")
    return cfg.new_run_freeze_epochs()


def _bn_stats(cfg: TrainConfig, new_run: bool) -> str:
    """--bn-stats as the run trains: a new run's random backbone (--weights none) has no statistics to keep, so
    they update and config.yaml says so (a resume, compare or tune rerun then sees what the run did)."""
    if new_run and cfg.bn_stats == "frozen" and not cfg.frozen_bn_stats():
        log.info("bn_stats frozen -> update: with --weights none the backbone is random and has no BatchNorm "
                 "statistics to keep")
        return "update"
    if cfg.frozen_bn_stats():
        log.info("the backbone's BatchNorm statistics stay as loaded (--bn-stats frozen); its scale and shift train")
    return cfg.bn_stats


def selection_split(cfg: TrainConfig) -> str:
    """The split that picks the best epoch: the config's, or under the paper protocol the authors' (a recipe's
    paper_select_on: test means there is no val split at all, as in their scripts)."""
    return "test" if cfg.protocol == "paper" and cfg.paper_select_on == "test" else cfg.select_on


def check_leakage(cfg: TrainConfig, splits: Splits) -> Optional[dict]:
    """{test_in_train, val_in_train, test_in_val}: held-out images byte-identical to train (or test to val)
    images (data/leakage.py, on rank 0, every rank takes the counts), with one warning line when there are any;
    None with --no-leak-check."""
    if not cfg.leak_check:
        return None
    counts = broadcast_object(leakage({n: splits.get(n) for n in SPLIT_NAMES}) if is_main() else None)
    if describe_leakage(counts) and is_main():
        log.warning(describe_leakage(counts))
    return counts


def load_data(cfg: TrainConfig, run: RunDir, skips: SkipLog) -> Splits:
    """The run's file lists: scanned at its start (and recorded in splits.json by `setup`), read back on resume,
    so images added, removed or changed later never change what it trains and tests on. Rank 0 reads, every
    rank takes them."""
    splits = None
    if is_main():
        splits = load_recorded(run.read_json(run.splits), cfg.data) if run.splits.is_file() else config_splits(cfg)
    splits = broadcast_object(splits)
    # resumed from the data folder's new place: the skip log read back lists its files where they were
    skips.moved_to(splits.root, [p for name in SPLIT_NAMES for p, _ in splits.get(name)] +
                   [p for p, _ in splits.skipped])
    skips.add(splits.skipped)
    _check_splits_usable(splits, selection_split(cfg))
    return splits


def check_data(cfg: TrainConfig) -> None:
    """The folder scanned as load_data will scan it (split names, class links, classes per split, empty splits),
    its warnings held back (load_data gives them): --overwrite removes an earlier run, and tune opens a study,
    only for data that can start a run."""
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        _check_splits_usable(config_splits(cfg), selection_split(cfg))
    finally:
        log.setLevel(level)


def _check_splits_usable(splits: Splits, select_on: str) -> None:
    """Refuse, before the run folder is written, splits that leave nothing to choose the best epoch on or to
    test (e.g. one image per class: such classes stay in train, so val and test are empty)."""
    empty = [n for n in dict.fromkeys((select_on, "test")) if not splits.get(n)]
    if empty:      # the warnings just above (splits.scan's notes) name the classes too small to hold one out
        raise DataError(f"{splits.root}: the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty "
                        f"(train {len(splits.train)}, val {len(splits.val)}, test {len(splits.test)} images): the "
                        f"best epoch is chosen on {select_on} and the model is tested on test; add images (at least 3 "
                        f"per class to carve both), or give val/ and test/ folders")


def _place(model: nn.Module, cfg: TrainConfig, device: torch.device, channels_last: bool) -> nn.Module:
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and world_size() > 1:
        if device.type == "cuda":
            info = model.spinal_info
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model.spinal_info = info
        else:      # torch's SyncBatchNorm raises on CPU input in training
            log.warning("--sync-bn needs CUDA (torch's SyncBatchNorm); on CPU each process keeps its own BN statistics")
    return model


def _make_ema(model: nn.Module, decay: Optional[float]) -> Any:
    if not decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay)


def build_loaders(cfg: TrainConfig, model: nn.Module, inputs: RunInputs, device: torch.device,
                  dtype: Optional[torch.dtype], channels_last: bool, run: RunDir,
                  skips: SkipLog) -> tuple[dict, dict, EpochSampler]:
    """(samples, loaders, training sampler) per split: images through the input pipeline (RunInputs), or in
    cached-feature mode the stored features of the frozen backbone (computed once by rank 0, then read by every
    rank)."""
    splits = inputs.splits
    samples = {n: splits.get(n) for n in ("train", "val", "test")}
    if not cfg.cache_features:
        sampler = train_sampler(cfg, samples["train"], len(splits.classes))
        return samples, inputs.loaders(cfg, device, sampler), sampler
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(run.path)
    log.info(f"cached-feature mode: the backbone runs once without augmentation (features in {cache}); "
             f"training sees the stored features")
    FreezePolicy().apply(model, frozen=True)
    feats = {}
    for turn in ("compute", "load"):
        if turn == "load" or is_main():
            for n in samples:
                feats[n] = cached_split(model, splits.get(n), inputs.eval_transform, cache, n, weights=cfg.weights,
                                        device=device, dtype=dtype, channels_last=channels_last,
                                        batch_size=cfg.batch_size, workers=cfg.workers, skips=skips)
        barrier()
    samples = {n: kept for n, (_, kept) in feats.items()}
    sampler = train_sampler(cfg, samples["train"], len(splits.classes))
    drop = train_drop_last(len(samples["train"]), cfg.batch_size, world_size())
    loaders = {n: feature_loader(ds, cfg.batch_size, sampler if n == "train" else
                                 ShardSampler(len(ds), world_size(), rank()), drop and n == "train")
               for n, (ds, _) in feats.items()}
    return samples, loaders, sampler


def _auto_lr(cfg: TrainConfig, model: nn.Module, train_loader: Any, settings: StepSettings, run: RunDir,
             skips: SkipLog, control: Optional[StopControl]) -> float:
    """--lr auto: the range test (lr_find.py) on a copy of the model, with the run's data, loss, optimizer and
    first-epoch freezing, on rank 0; every rank takes its suggestion. Its curve goes to plots/lr_find.png, its
    numbers to lr_find.json (and report.json). A signal stops the sweep at its next step, on every rank: nothing
    was trained, so nothing is checkpointed, and the same command starts the run over."""
    suggestion = None
    if is_main():
        result = find_lr_as_run(cfg, get_head(model) if cfg.cache_features else model, skips.watched(train_loader),
                                settings, num_steps=LR_FIND_STEPS,
                                should_stop=lambda: control is not None and control.received is not None)
        if result is not None:
            plot_lr_find(result, run.plot("lr_find.png"))
            run.write_json(run.lr_find, result.to_dict())
            log.info(f"lr auto: {result.describe()}; the curve is in {run.plot('lr_find.png')}")
            suggestion = result.suggestion
    suggestion = broadcast_object(suggestion)
    if suggestion is None:
        name = control.received if control is not None and control.received else "a signal (on rank 0)"
        raise Interrupted(f"{name} received: stopped in --lr auto's range test, before training began; nothing to "
                          f"resume: the same command starts the run over", in_flight=False)
    return float(suggestion)


def _write_batch_preview(cfg: TrainConfig, inputs: RunInputs, run: RunDir) -> None:
    """plots/batch.png: the start of epoch 1's first batch through the training pipeline, pixel for pixel."""
    dc = inputs.data_config
    preview = write_batch_preview(inputs.splits.train, inputs.train_transform, inputs.classes, dc.mean, dc.std,
                                  run.plot("batch.png"), n=min(32, cfg.batch_size), seed=cfg.seed)
    log.info(f"first training batch as the model sees it: {run.plot('batch.png')}"
             + (" (with --class-balance sampler the run draws its batches differently)"
                if cfg.class_balance == "sampler" else "") + (f"; {len(preview.skipped)} unreadable file(s) left out"
                                                               if preview.skipped else ""))


def _loss(cfg: TrainConfig, train_samples: list, num_classes: int, device: torch.device) -> tuple[nn.Module, Any]:
    """(criterion, mixup): cross-entropy (class-weighted, label-smoothed as asked), or timm's soft-target loss
    under mixup/cutmix."""
    weight = class_weights(train_samples, num_classes).to(device) if cfg.class_balance == "loss" else None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy(), Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                                               label_smoothing=cfg.label_smoothing, num_classes=num_classes)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing), None


def _carry_weights_record(model: nn.Module, ckpt: dict) -> None:
    """A resumed model is built without its starting weights (last.pt has them): keep the record of the file they
    came from (source, sha256), so the feature cache finds the entries the run started with (features.fingerprint)
    and the checkpoints and report.json written from here still say what the run started from. A GoogLeNet or
    Inception v3 keeps the input remap it trained with (restore.recorded_transform_input; runs before it was
    recorded had it off unless torchvision loaded its weights)."""
    info = ckpt.get("head_info") or {}
    recorded = info.get("weights_file")
    if recorded and model.spinal_info.weights_file is None:
        model.spinal_info.weights_file = dict(recorded)
    remap = recorded_transform_input(info)
    if remap is not None:
        set_transform_input(model, remap)
        model.spinal_info.transform_input = remap


def _restore(s: Session, ckpt: dict) -> None:
    """Weights and progress from last.pt; the optimizer and RNG states are restored when training continues."""
    s.model.load_state_dict(ckpt["model"])
    if s.ema is not None and ckpt.get("ema") is not None:
        s.ema.module.load_state_dict(ckpt["ema"])
    s.progress = Progress.from_checkpoint(ckpt)
    saved_batch = ckpt["config"]["batch_size"]
    if s.progress.batch and saved_batch != s.cfg.batch_size:    # mid-epoch, another batch size (same global batch)
        s.progress.batch = s.progress.batch * saved_batch // s.cfg.batch_size      # the epoch goes on at its image
        log.info(f"the interrupted epoch goes on at image {s.progress.batch * s.cfg.batch_size} ("
                 f"{s.progress.batch} batches of {s.cfg.batch_size} done; it had batch size {saved_batch})")
    if s.progress.epoch_seconds is None:
        log.info(f"{s.run.last} predates the record of an epoch's seconds so far: epoch {s.progress.epoch + 1}'s "
                 f"seconds and images/s in metrics.jsonl cover only the part trained after this resume")
    s.early.load_state_dict(early_stopping_state(ckpt))
    if is_main():          # epochs a killed run logged after its last checkpoint are dropped
        s.run.keep_metrics_until(s.progress.epoch)


def early_stopping_state(ckpt: dict) -> dict:
    """EarlyStopping's state in last.pt: its own entry, or in a last.pt written before it had one, the three
    values Progress kept for it."""
    if "early_stopping" in ckpt:
        return ckpt["early_stopping"]
    old = ckpt["progress"]
    return {new: old.get(k, EarlyStopping().state_dict()[new]) for k, new in LEGACY_EARLY.items()}


def _log_start(s: Session, splits: Splits) -> None:
    cfg = s.cfg
    s.skips.sync()                      # skipped_files.txt exists from here on, empty or not: the log points to it
    log.info(f"{len(s.classes)} classes; train {len(splits.train)}, val {len(splits.val)}, test {len(splits.test)} "
             f"images; {len(s.skips)} file(s) skipped (see {s.run.skipped})")
    lrs = ", ".join(f"{st.lr:g}" for st in cfg.resolved_stages())
    log.info(f"world size {world_size()}; batch {cfg.batch_size} per device, global batch "
             f"{cfg.batch_size * world_size()}" + (f" x {cfg.accum_steps} accumulation steps" if cfg.accum_steps > 1
                                                   else "") + f"; lr {lrs} (not scaled with the global batch)")


# --- one stage, one epoch ------------------------------------------------------------------------

def run_stage(s: Session, si: int, stage: Stage) -> None:
    """A fresh optimizer and scheduler for the stage; the stage starts from the previous stage's best weights,
    or, resumed, continues where last.pt left it (the scheduler fast-forwarded to its step)."""
    cfg = s.cfg
    _, done = s.progress.locate(cfg.resolved_stages())
    fresh = done == 0 and s.progress.batch == 0             # the stage starts now (not resumed inside it)
    opt = stage_optimizer(cfg, s.model, stage.lr)
    steps_per_epoch = epoch_steps(cfg, s.sampler.per_rank, s.loaders["train"].drop_last)
    if s.resume is not None and not fresh:
        base = [g["lr"] for g in opt.param_groups]
        opt.load_state_dict(s.resume["optimizer"])
        s.scaler.load_state_dict(s.resume["scaler"])
        for g, lr in zip(opt.param_groups, base):       # the schedule is replayed from the stage's own lr
            g["lr"] = lr
    sched, unit = make_scheduler(opt, cfg.scheduler, stage.epochs, steps_per_epoch, step_size=cfg.step_size,
                                 gamma=cfg.gamma, warmup_epochs=cfg.warmup_epochs)
    with warnings.catch_warnings():       # replaying a schedule steps it before any optimizer step
        warnings.simplefilter("ignore", UserWarning)
        # a fresh stage replays nothing: progress.stage_step still counts the previous stage's steps here
        for _ in range(0 if fresh else s.progress.stage_step if unit == "step" else done):
            sched.step()
    if si > 0 and fresh:
        weights = s.saver.stage_start_weights()        # the paper: the next stage starts from this one's best
        if weights is not None:
            s.model.load_state_dict(weights)
    if s.resume is not None:
        set_rng_state(s.resume["rng"])
    if fresh:
        s.saver.start_stage()
        s.progress.stage_step = 0
        s.early.start_stage()
    s.resume = None
    for e in range(done, stage.epochs):
        stop = run_epoch(s, opt, sched if unit == "step" else None, si)
        if unit == "epoch":
            sched.step()
        if stop and e + 1 < stage.epochs:
            s.progress.stopped[si] = {"ran": e + 1, "epoch": s.progress.epoch, "reason": stop}
            log.info(f"stage {si + 1} stopped early after epoch {s.progress.epoch}: {stop}")
            if is_main():       # last.pt must know the stage ended, or a resume would continue it
                s.saver.save_last(s.model, s.ema, _train_state(s, opt))
            barrier()
            break


def stage_optimizer(cfg: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """A stage's fresh optimizer, as the config asks (the benchmarks build theirs here too)."""
    return make_optimizer(model, cfg.optimizer, lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                          backbone_lr_mult=cfg.backbone_lr_mult)


def train_epoch(s: Session, opt: torch.optim.Optimizer, epoch: int, frozen: bool, desc: str, **hooks: Any):
    """One epoch of `train_one_epoch` as `run_epoch` calls it (the benchmarks time this very call)."""
    s.sampler.set_epoch(epoch, start=s.progress.batch * s.cfg.batch_size)
    return train_one_epoch(s.forward_module(frozen), s.model, s.skips.watch(s.loaders["train"]), opt, s.scaler,
                           s.settings, progress=s.progress, ema=s.ema, total=_batches_per_epoch(s),
                           start=s.progress.batch, desc=desc, **hooks)


def _batches_per_epoch(s: Session) -> int:
    return epoch_batches(s.cfg, s.sampler.per_rank, s.loaders["train"].drop_last)


def epoch_batches(cfg: TrainConfig, per_rank: int, drop_last: bool) -> int:
    """Batches per rank in a whole epoch of `per_rank` images (the loader's length before any resumed start is
    skipped)."""
    n = per_rank // cfg.batch_size if drop_last else math.ceil(per_rank / cfg.batch_size)
    return min(n, cfg.limit_train_batches) if cfg.limit_train_batches else n


def epoch_steps(cfg: TrainConfig, per_rank: int, drop_last: bool) -> int:
    """Optimizer steps per epoch (at least 1): what --min-steps counts in and the schedule spans (bench_defaults
    resolves the length rule with it too)."""
    return max(1, epoch_batches(cfg, per_rank, drop_last) // cfg.accum_steps)


def run_epoch(s: Session, opt: torch.optim.Optimizer, step_sched: Any, si: int) -> Optional[str]:
    """Train one epoch (or the rest of an interrupted one), evaluate, let the saver select, write last.pt and
    the epoch's metrics row. Returns why the stage should stop early, if it should."""
    cfg, epoch = s.cfg, s.progress.epoch + 1
    frozen = s.freeze.frozen(epoch)
    t0 = time.perf_counter() - (s.progress.epoch_seconds or 0.0)     # a resumed epoch's seconds before its checkpoint
    loss, images, seconds = train_epoch(s, opt, epoch, frozen, f"epoch {epoch}/{cfg.total_epochs()}"
                                        + (" (backbone frozen)" if frozen else ""),
                                        sched=step_sched, on_log=s.tracker.log_step,
                                        after_step=lambda *partial: _between_steps(s, opt, *partial))
    val_m, select_m = evaluate_epoch(s)
    overflow = [name for name, m in (("val", val_m), ("test", select_m)) if m and m["num_samples"]
                and not math.isfinite(m["loss"])]
    if overflow:         # inf/NaN logits: a broken model is no candidate for best.pt; last.pt keeps the epoch before
        raise NonFiniteLoss(f"the {overflow[0]} loss became NaN/inf after epoch {epoch}/{cfg.total_epochs()} (the "
                            f"model's outputs overflow)")
    s.progress.epoch, s.progress.batch, s.progress.epoch_loss, s.progress.epoch_seen = epoch, 0, 0.0, 0
    s.progress.epoch_seconds = 0.0
    s.skips.sync()
    row = {"epoch": epoch, "stage": si + 1, "lr": s.progress.step_lr(opt), "train_loss": loss,
           "train_images_per_s": images / max(seconds, 1e-9), "frozen": frozen,
           "seconds": time.perf_counter() - t0}
    row.update({"val": summary(val_m)} if val_m else {})
    row.update({"test": summary(select_m)} if cfg.select_on == "test" else {})
    score = selection_score(select_m, cfg.select_metric)
    stop = s.early.update(epoch, score, cfg.select_on)
    if is_main():
        best = s.saver.update(epoch, score, s.model, s.ema)
        s.saver.save_last(s.model, s.ema, _train_state(s, opt))
        s.run.append_metrics(row)
        s.tracker.log_epoch(epoch, row)
        log.info(f"epoch {epoch}: " + ("backbone frozen, " if frozen else "") + f"train loss {loss:.4f}, "
                 f"{cfg.select_on} top1 {select_m['top1']:.4f} loss {select_m['loss']:.4f}, "
                 f"{row['train_images_per_s']:.1f} img/s" + (" (best)" if best else ""))
    barrier()
    if s.control.decide(s.progress.step, due_ok=False) == "stop":     # a signal during evaluation
        raise _interrupted(s)
    if s.on_epoch is not None:
        s.on_epoch(row)
    return stop


def _train_state(s: Session, opt: torch.optim.Optimizer) -> dict:
    """What last.pt holds besides the weights: enough to continue at the next batch."""
    return {"optimizer": opt.state_dict(), "scaler": s.scaler.state_dict(), "rng": rng_state(),
            "progress": dataclasses.asdict(s.progress), "early_stopping": s.early.state_dict(),
            "resumes": s.resumes}


def _between_steps(s: Session, opt: torch.optim.Optimizer, batches: int, loss_sum: torch.Tensor, seen: int,
                   seconds: Optional[float]) -> None:
    """After an optimizer step inside an epoch: write a mid-epoch last.pt when a signal or the checkpoint clock
    asks for one (every rank agrees first), with the epoch's sums and seconds so far, and stop after it on a
    signal."""
    decision = s.control.decide(s.progress.step)
    if not decision:
        return
    totals = sum_over_ranks(torch.stack([loss_sum.detach().float(),
                                         torch.tensor(float(seen), device=s.settings.device)]))
    p = s.progress          # updated in place: the epoch loop holds this object
    p.batch, p.epoch_loss, p.epoch_seen, p.epoch_seconds = batches, totals[0].item(), int(totals[1].item()), seconds
    if is_main():
        s.saver.save_last(s.model, s.ema, _train_state(s, opt))
        log.info(f"checkpoint written inside epoch {s.progress.epoch + 1} after batch {batches} "
                 f"(optimizer step {s.progress.step})")
    barrier()
    if decision == "stop":
        raise _interrupted(s)


def _interrupted(s: Session) -> Interrupted:
    p = s.progress
    where = f"epoch {p.epoch + 1}, batch {p.batch}" if p.batch else f"the end of epoch {p.epoch}"
    return Interrupted(f"{s.control.received} received: stopped at {where} (optimizer step {p.step}); {s.run.last} "
                       f"holds everything to continue: spinal-transfer train --resume {s.run.path}")


def evaluate_epoch(s: Session) -> tuple[Optional[dict], dict]:
    """(val metrics or None when there is no val split, metrics of the selection split) of the weights the saver
    selects on: rank 0's, buffers included, on every rank's shard."""
    broadcast_buffers(s.eval_module())
    val = evaluate_split(s, "val")[0] if s.samples["val"] else None
    return val, (evaluate_split(s, "test")[0] if s.cfg.select_on == "test" else val)


def evaluate_split(s: Session, name: str, model: Optional[nn.Module] = None) -> tuple[dict, Outputs]:
    st = s.settings
    out = predict_logits(model or s.eval_module(), s.skips.watch(s.loaders[name]), st.device, st.dtype,
                         st.channels_last, desc=name, total=len(s.loaders[name]))
    return classification_metrics(out.logits, out.targets, s.classes), out


def train_one_epoch(fwd: nn.Module, raw: nn.Module, batches: Iterable, opt: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, settings: StepSettings, *, progress: Optional[Progress] = None,
                    sched: Any = None, ema: Any = None, total: Optional[int] = None, start: int = 0,
                    desc: str = "train", on_step: Optional[Callable[[], None]] = None,
                    on_log: Optional[Callable[[int, dict], None]] = None,
                    after_step: Optional[Callable[[int, torch.Tensor, int, Optional[float]], None]] = None
                    ) -> tuple[float, int, float]:
    """One pass over `(images, labels, indices)` batches: `train_step` on each through `fwd` (an optimizer step
    every `settings.accum_steps` batches, then the EMA of `raw` and a per-step `sched`), for `total` batches of
    the epoch of which `start` were done before (a resumed epoch, whose seconds so far `progress` carries).
    Returns (mean loss over every rank's images of the whole epoch, images of every rank, seconds): images and
    seconds of the whole epoch, or of this call alone when the resumed epoch's earlier seconds are unknown. The
    loss is read back only every `log_interval` steps (non-finite check, all ranks together) and about once a
    second for the progress bar and `on_log(step, values)`: no per-step host-device sync. `after_step(batches
    done, loss sum, images, the epoch's seconds)` runs after every optimizer step (mid-epoch checkpoints);
    `on_step()` after every batch (benchmarks time it)."""
    progress = progress or Progress()
    device, resumed = settings.device, bool(start and is_main())    # rank 0 carries the epoch's sums so far
    earlier = progress.epoch_seconds if start else 0.0              # None: unknown (an older last.pt)
    t0 = last_shown = time.perf_counter()
    # the resumed epoch's images so far, read once: a mid-epoch checkpoint (after_step) updates progress in place
    seen, before = 0, (progress.epoch_seen if resumed else 0)
    loss_sum = torch.full((), progress.epoch_loss if resumed else 0.0, device=device)
    bad_loss = torch.zeros((), dtype=torch.bool, device=device)
    bar = tqdm(batches, desc=desc, total=total, initial=start, leave=False, disable=not is_main())
    opt.zero_grad(set_to_none=True)
    for i, (x, y, _) in enumerate(bar, start):
        closes = (i + 1) % settings.accum_steps == 0 or i + 1 == total
        trained = train_step(fwd, x, y, opt, scaler, settings, closes)
        if trained is not None:
            loss, n = trained
            bad_loss |= ~torch.isfinite(loss)
            loss_sum += loss.float() * n
            seen += n
            if closes:
                progress.lr = opt.param_groups[0]["lr"]         # what this step used, before the schedule moves
                _count_step(progress, raw, ema, sched)
        if i % settings.log_interval == 0 and any_rank(bad_loss, device):      # every rank stops together
            break
        if is_main() and time.perf_counter() - last_shown >= 1.0 and seen:
            last_shown = time.perf_counter()
            _show(bar, loss.item(), progress.step_lr(opt), seen * world_size() / (last_shown - t0),
                  progress.step, on_log)
        if on_step is not None:
            on_step()
        if closes and after_step is not None and i + 1 != total:
            after_step(i + 1, loss_sum, before + seen, None if earlier is None else
                       earlier + time.perf_counter() - t0)
        if i + 1 == total:
            break
    if any_rank(bad_loss, device):
        raise NonFiniteLoss(f"the training loss became NaN/inf in {desc}")
    seconds = time.perf_counter() - t0
    totals = sum_over_ranks(torch.stack([loss_sum.float(), torch.tensor(float(before + seen), device=device),
                                         torch.tensor(float(seen), device=device)]))
    mean = (totals[0] / totals[1].clamp(min=1)).item()
    if earlier is None:          # the rate of the part this call trained
        return mean, int(totals[2].item()), seconds
    return mean, int(totals[1].item()), earlier + seconds


def _count_step(progress: Progress, raw: nn.Module, ema: Any, sched: Any) -> None:
    """After an optimizer step: count it, update the EMA of the raw weights, step a per-step schedule."""
    progress.step += 1
    progress.stage_step += 1
    if ema is not None:
        ema.update(raw, step=progress.step)
    if sched is not None:
        sched.step()


def _show(bar: Any, loss: float, lr: float, images_per_s: float, step: int,
          on_log: Optional[Callable[[int, dict], None]]) -> None:
    """The progress bar's numbers, and the tracker's step row."""
    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.1f}", lr=f"{lr:.2e}", refresh=False)
    if on_log is not None:
        on_log(step, {"train_loss": loss, "lr": lr})


# --- the end: the chosen weights, tested once ----------------------------------------------------

def finish(s: Session) -> dict:
    """Load the best epoch's weights, evaluate val and test once, write the per-image predictions, plots, the
    report page and, last of all, report.json (the finished marker)."""
    best = load_checkpoint(s.run.best)
    s.model.load_state_dict(best["model"])
    model = get_head(s.model) if s.cfg.cache_features else s.model
    val_m, val_out = evaluate_split(s, "val", model) if s.samples["val"] else (None, None)
    extra: dict = {}
    if s.cfg.tta:        # the test metrics with TTA; the plain ones kept beside them (one pass over the data)
        tta = TTA(flip=True, crops=s.cfg.tta_crops).as_trained(s.cfg.hflip)
        st = s.settings
        plain, test_out = predict_logits_tta(model, s.skips.watch(s.loaders["test"]), st.device, tta, st.dtype,
                                             st.channels_last, desc="test (TTA)", total=len(s.loaders["test"]))
        test_m = {**classification_metrics(test_out.logits, test_out.targets, s.classes), "tta": tta.to_dict()}
        extra["test_without_tta"] = summary(classification_metrics(plain.logits, plain.targets, s.classes))
    else:
        test_m, test_out = evaluate_split(s, "test", model)
        plain = test_out
    calib, no_fit = calibrate((val_out.logits, val_out.targets), {"test": (plain.logits, plain.targets)}) \
        if val_out is not None else (None, NO_VAL_NOTE)
    extra["calibration"] = calib.to_dict() if calib else {"temperature": None, "note": no_fit}
    if s.leakage is not None:
        extra["leakage"] = s.leakage
    if s.run.lr_find.is_file():
        extra["lr_find"] = {k: v for k, v in s.run.read_json(s.run.lr_find).items()
                            if k in ("suggestion", "rule", "stopped", "start_lr", "end_lr", "num_steps")}
    emptied = _classes_without_images(s)       # may decode (and skip) more files: before the counts
    if emptied:
        extra["classes_without_readable_images"] = emptied
    s.skips.sync()
    skipped = s.skips.per_split(s.samples)
    stops = [{"stage": i + 1, **v} for i, v in sorted(s.progress.stopped.items())]
    report = {"best_epoch": best["epoch"], "selected_on": s.cfg.select_on, "selected_by": s.cfg.select_metric,
              "protocol": s.cfg.protocol,
              "epochs_trained": s.progress.epoch, **({"early_stops": stops, "stopped": stops[-1]} if stops else {}),
              **({"resumes": s.resumes} if s.resumes else {}),
              "val": val_m, "test": test_m, **extra, "classes": s.classes, "num_skipped_files": len(s.skips),
              "num_images": {n: len(v) - skipped[n] for n, v in s.samples.items()}, "num_skipped": skipped,
              "head": model_summary(s.model),
              "weights": best.get("head_info", {}).get("weights_file") or {"source": s.cfg.weights}}
    if is_main():
        # the temperature, or why none, goes with the weights it was fitted on (README, "calibration")
        s.saver.record_calibration(calib.temperature if calib else None, no_fit)
        if calib is not None:
            plot_calibration(calib, s.run.plot("calibration.png"))
            (log.warning if calib.bound_note() else log.info)(f"calibration: {calib.describe()}")
        else:
            log.info(f"calibration: {no_fit}")
        write_outputs(s.run, report, s.samples["test"], test_out)
        s.tracker.log_summary(report)
        s.tracker.log_artifacts([s.run.report, s.run.report_html, s.run.predictions, *sorted(s.run.plots.glob("*.png"))])
        s.tracker.close()
        log.info(_counts_line(report, s.run.skipped))
        log.info(f"best epoch {best['epoch']} (selected on {s.cfg.select_on} {METRIC_NAMES[s.cfg.select_metric]}); "
                 f"test top1 {test_m['top1']:.4f}"
                 + (f" with TTA ({extra['test_without_tta']['top1']:.4f} without)" if s.cfg.tta else "") + ", "
                 f"top5 {test_m['top5']:.4f}, macro F1 {test_m['macro_f1']:.4f}; see {s.run.report_html}")
    barrier()
    return report


def _classes_without_images(s: Session) -> dict[str, list[str]]:
    """Per split, the classes with no readable image (SkipLog.emptied), each split said in a warning."""
    emptied = s.skips.emptied(s.samples, s.classes)
    for split, names in emptied.items() if is_main() else ():
        log.warning(f"no readable {split} image of class(es) {', '.join(names)}: every one was skipped (listed in "
                    f"{s.run.skipped}), so " + ("the model never learned them; fix or replace those files and train "
                                                "again" if split == "train" else f"the {split} metrics do not cover them"))
    return emptied


def _counts_line(report: dict, skipped_file: Path) -> str:
    """Images used and skipped per split, the numbers report.json, report.html and skipped_files.txt give."""
    used, skipped = report["num_images"], report["num_skipped"]
    return ("images used: " + ", ".join(f"{n} {used[n]}" for n in used) + "; skipped (unreadable): "
            + ", ".join(f"{n} {skipped[n]}" for n in skipped) + f"; {report['num_skipped_files']} in all, listed in "
            f"{skipped_file}")


def write_outputs(run: RunDir, report: dict, test_samples: list, test_out: Outputs) -> None:
    """What a finished run leaves for people to read: per-image test predictions, the plots, report.html; then
    report.json, the finished marker, last."""
    write_predictions(run.predictions, test_samples, test_out, report["classes"])
    plot_curves(run.read_metrics(), run.plots, best_epoch=report["best_epoch"])
    plot_confusion(report["test"]["confusion_matrix"], report["classes"], run.plot("confusion_test.png"),
                   f"test confusion matrix (top-1 {report['test']['top1']:.3f})")
    plot_top_losses(top_losses(read_predictions(run.predictions)), run.plot("top_losses.png"))
    write_report_html(run.path, report=report)
    run.write_json(run.report, report)


def model_summary(model: nn.Module) -> dict:
    info, head = model.spinal_info, get_head(model)
    return {"backbone": info.backbone, "head": info.head, "feature_width": info.feature_width,
            "head_params": head.num_params(), "head_macs": head.macs(),
            "default_head_params": info.default_head_params, "default_head_macs": info.default_head_macs}
