"""The learning-rate range test (Smith 2015; fastai's `lr_find`): train a copy of the model for a few hundred
steps while the learning rate grows exponentially, watch the smoothed loss, suggest a learning rate.

Why a copy: the test trains, and a run that asks for `--lr auto` must start from exactly the weights, BatchNorm
statistics, `requires_grad` flags and random-number state it would have had without it. `find_lr` deep-copies the
model, forks the torch RNG, and leaves the model it was given untouched.

The sweep: step t of N sets the learning rate to start * (end / start) ** (t / (N - 1)) (every parameter group
keeps its ratio to the first, e.g. a backbone at `backbone_lr_mult`), records the loss of that step's batch, and
smooths it with a debiased exponential moving average (beta 0.98, as fastai). It stops early when the smoothed
loss exceeds 4x its minimum or is not finite: past that point the curve only says "too high".

The suggestion rule is fastai's **valley** (its default since 2.5): on the smoothed curve, less its first 10% and
last 5 points (warm-up noise and the divergence), take the longest run of points that each lie below an earlier
one (a longest decreasing subsequence: the longest stretch where a higher lr keeps lowering the loss), and suggest
the lr at the point half way along it (fastai: start + 1/3 + 1/6 of its length). Why not steepest descent: the
slope of a noisy curve is noisier than the curve, so the steepest point jumps between neighbouring runs; and
"minimum / 10" depends on where the loss happens to blow up. The valley lies inside the stretch where the loss
falls fastest and longest, which is what a learning rate should be. `rule="steepest"` is kept for comparison.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from ..data.loaders import class_weights
from ..data.skiplog import SkipLog
from ..data.splits import config_splits
from ..evaluation.plots import _figure, save_figure
from ..models.heads import head_options
from ..models.surgery import build_model, check_backbone
from ..utils.runtime import configure_process, pick_device, seed_everything
from . import bn_stats
from .inputs import RunInputs, train_sampler
from .optim import FreezePolicy, make_optimizer
from .step import StepSettings, train_step

PathLike = Union[str, Path]
DEFAULT_START, DEFAULT_END, DEFAULT_STEPS = 1e-7, 10.0, 200
SMOOTH_BETA, DIVERGE_FACTOR = 0.98, 4.0
MAX_PASSED = 100          # batches in a row a sweep step may pass over (fewer than 2 images) before giving up
RULES = ("valley", "steepest")


@dataclass
class LRFindResult:
    """The sweep: the lr of every step, its raw and smoothed loss, the suggested lr and how it was chosen."""

    lrs: list[float]
    losses: list[float]                 # smoothed (debiased EMA)
    raw_losses: list[float]
    suggestion: float
    rule: str = "valley"
    stopped: str = "end of sweep"       # or "loss diverged" / "loss not finite"
    start_lr: float = DEFAULT_START
    end_lr: float = DEFAULT_END
    num_steps: int = DEFAULT_STEPS
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain values, for report.json / a run's record of `--lr auto`."""
        return asdict(self)

    def describe(self) -> str:
        return (f"suggested lr {self.suggestion:.3g} ({self.rule} rule; swept {self.lrs[0]:.2g} to {self.lrs[-1]:.2g} "
                f"in {len(self.lrs)} steps, {self.stopped})")


def sweep_lrs(start: float, end: float, num_steps: int) -> list[float]:
    """The exponential schedule of the sweep, `num_steps` values from `start` to `end`."""
    if num_steps < 2:
        return [start]
    return [start * (end / start) ** (t / (num_steps - 1)) for t in range(num_steps)]


def _trimmed(n: int) -> tuple[int, int]:
    """The [lo, hi) range of points the rules look at: fastai drops the first 10% and the last 5."""
    lo = n // 10
    hi = n - 5 if n - 5 > lo + 2 else n
    return lo, hi


def valley(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """fastai's valley rule (see the module docstring): the middle of the longest decreasing run."""
    lo, hi = _trimmed(len(losses))
    ls, xs = list(losses[lo:hi]), list(lrs[lo:hi])
    n = len(ls)
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if ls[i] < ls[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return float(xs[max_start + int(sections) + int(sections / 2)])


def steepest(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The lr where the smoothed loss falls fastest per decade of lr (fastai's `steep`)."""
    lo, hi = _trimmed(len(losses))
    ls, xs = list(losses[lo:hi]), list(lrs[lo:hi])
    if len(ls) < 2:
        return float(xs[0])
    slopes = [(ls[i + 1] - ls[i]) / (math.log10(xs[i + 1]) - math.log10(xs[i])) for i in range(len(ls) - 1)]
    return float(xs[min(range(len(slopes)), key=slopes.__getitem__)])


def suggest(lrs: Sequence[float], losses: Sequence[float], rule: str = "valley") -> float:
    if rule not in RULES:
        raise ValueError(f"unknown lr-find rule {rule!r}; choose from {RULES}")
    return (valley if rule == "valley" else steepest)(lrs, losses)


def _batches_forever(batches: Iterable) -> Iterable:
    """Pass over `batches` again and again (a DataLoader is re-iterable); a short folder still gives N steps."""
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ValueError("lr-find got no training batches")


def _step_lr(work: nn.Module, it: Iterator, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             settings: StepSettings) -> torch.Tensor:
    """One sweep step: the training step on the next batch it can train on (MAX_PASSED batches in a row it
    cannot, e.g. --batch-size 1, end the test: BatchNorm cannot train on one image)."""
    for _ in range(MAX_PASSED):
        x, y = next(it)[:2]
        trained = train_step(work, x, y, opt, scaler, settings, closes=True)
        if trained is not None:
            return trained[0]
    raise ValueError(f"lr-find: {MAX_PASSED} batches in a row had fewer than 2 images to train on")


def find_lr(model: nn.Module, batches: Iterable, optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer],
            settings: StepSettings, *, start_lr: float = DEFAULT_START, end_lr: float = DEFAULT_END,
            num_steps: int = DEFAULT_STEPS, rule: str = "valley",
            prepare: Optional[Callable[[nn.Module], None]] = None,
            should_stop: Callable[[], bool] = lambda: False) -> Optional[LRFindResult]:
    """Run the range test on a deep copy of `model` (which, like the torch RNG, is left exactly as it was).

    `batches`: `(images, labels, ...)` batches, iterated again when exhausted. Each sweep step is the training
    step (step.train_step) under `settings` (device, precision, memory format, loss) on one batch, without
    accumulation or clipping: the test measures where the plain loss diverges. `optimizer_factory(copy)` builds
    the optimizer (its groups' lr ratios are kept, their absolute lr set by the sweep). `prepare(copy)` runs
    before that, e.g. `lambda m: FreezePolicy().apply(m, frozen=True)` to sweep the frozen first epoch.
    `should_stop()` True before a step (a signal came; a sweep outlasts a scheduler's grace) ends it with None."""
    if not 0 < start_lr < end_lr:
        raise ValueError(f"need 0 < start_lr < end_lr, got {start_lr}, {end_lr}")
    settings = dataclasses.replace(settings, accum_steps=1, clip_grad=None)
    scaler = torch.amp.GradScaler(settings.device.type, enabled=False)      # a plain backward and step
    lrs_planned = sweep_lrs(start_lr, end_lr, num_steps)
    device = settings.device
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        work = copy.deepcopy(model)
        work.train()
        if prepare is not None:
            prepare(work)
        opt = optimizer_factory(work)
        opt.zero_grad(set_to_none=True)
        base = opt.param_groups[0]["lr"] or 1.0
        ratios = [g["lr"] / base for g in opt.param_groups]
        lrs, raw, smooth = [], [], []
        avg, best, stopped = 0.0, math.inf, "end of sweep"
        it = iter(_batches_forever(batches))
        for t, lr in enumerate(lrs_planned):
            if should_stop():
                return None
            for g, r in zip(opt.param_groups, ratios):
                g["lr"] = lr * r
            value = float(_step_lr(work, it, opt, scaler, settings).float())
            if not math.isfinite(value):
                stopped = "loss not finite"
                break
            avg = SMOOTH_BETA * avg + (1 - SMOOTH_BETA) * value
            s = avg / (1 - SMOOTH_BETA ** (t + 1))
            lrs.append(lr)
            raw.append(value)
            smooth.append(s)
            best = min(best, s)
            if t > 0 and s > DIVERGE_FACTOR * best:
                stopped = "loss diverged"
                break
        del work, opt
    if len(lrs) < 2:
        raise ValueError(f"the loss was not finite from the first steps of the sweep (lr {start_lr:g}); "
                         f"lower --start-lr")
    notes = []
    if stopped == "end of sweep":
        notes.append(f"the loss never diverged up to {lrs[-1]:.2g}: the curve may not show where lr is too high")
    return LRFindResult(lrs, smooth, raw, suggest(lrs, smooth, rule), rule, stopped, start_lr, end_lr, num_steps,
                        notes)


def lr_find_figure(result: LRFindResult):
    """Smoothed loss against lr (log axis), the raw losses faint, the suggestion marked."""
    fig = _figure(7.0, 4.2)
    ax = fig.subplots()
    ax.plot(result.lrs, result.raw_losses, color="#1f77b4", alpha=0.25, lw=0.8, label="loss per step")
    ax.plot(result.lrs, result.losses, color="#1f77b4", lw=1.8, label="smoothed loss")
    i = min(range(len(result.lrs)), key=lambda k: abs(math.log(result.lrs[k] / result.suggestion)))
    ax.axvline(result.suggestion, color="#d62728", ls="--", lw=1)
    ax.plot([result.suggestion], [result.losses[i]], "o", color="#d62728", ms=8,
            label=f"suggested lr {result.suggestion:.2g} ({result.rule})")
    ax.set_xscale("log")
    top = max(result.losses[: max(2, len(result.losses) * 9 // 10)])
    bottom = min(result.losses + [v for v in result.raw_losses if math.isfinite(v)])   # every step's loss shows
    ax.set_ylim(bottom - 0.05 * (top - bottom + 1e-12), top + 0.15 * (top - bottom + 1e-12))
    ax.set_xlabel("learning rate (head; other groups keep their ratio)")
    ax.set_ylabel("training loss")
    ax.set_title(f"learning-rate range test: {len(result.lrs)} steps, {result.stopped}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return fig


def plot_lr_find(result: LRFindResult, path: PathLike) -> Path:
    return save_figure(lr_find_figure(result), path)


# --- the convenience for the CLI: everything built from a TrainConfig, as `train` builds it ----------------

def lr_find_for_config(cfg: Any, plot: Optional[PathLike] = None, *, start_lr: float = DEFAULT_START,
                       end_lr: float = DEFAULT_END, num_steps: int = DEFAULT_STEPS,
                       rule: str = "valley") -> LRFindResult:
    """The range test of the run `cfg` describes: its data (train split, RunInputs: as `train` reads it), model
    and weights, training augmentation, loss (label smoothing and class weights; no mixup), optimizer (its
    weight decay, momentum and backbone lr multiplier) and the freezing of its first epoch. Writes `plot` when
    given."""
    seed_everything(cfg.seed, cfg.deterministic)
    device = pick_device(cfg.device)
    configure_process(device)
    check_backbone(cfg.backbone, cfg.weights)        # a typo, or offline and not cached: refuse before the data is read
    splits = config_splits(cfg)
    model = build_model(cfg.backbone, len(splits.classes), head=cfg.head, weights=cfg.weights, replace=cfg.replace,
                        classes=splits.classes, weights_partial=cfg.weights_partial, img_size=cfg.img_size,
                        **head_options(cfg))
    inputs = RunInputs.from_config(cfg, model, splits)
    weight = class_weights(splits.train, len(splits.classes)).to(device) if cfg.class_balance == "loss" else None
    settings = StepSettings.from_config(cfg, device, nn.CrossEntropyLoss(weight=weight,
                                                                        label_smoothing=cfg.label_smoothing))
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    cfg = dataclasses.replace(cfg, bn_stats=bn_stats.resolve(cfg, model, inputs, device, settings.dtype,
                                                             settings.channels_last))
    skips = SkipLog()
    loader = inputs.loaders(cfg, device, train_sampler(cfg, splits.train, len(splits.classes)))["train"]
    result = find_lr_as_run(cfg, model, skips.watched(loader), settings, start_lr=start_lr, end_lr=end_lr,
                            num_steps=num_steps, rule=rule)
    assert result is not None                  # only a should_stop ends a sweep with no result
    if len(skips):
        result.notes.append(f"{len(skips)} unreadable file(s) left out, e.g. {next(iter(skips.entries))}")
    if len(splits.train) < cfg.batch_size:
        result.notes.append(f"the train split has {len(splits.train)} images, fewer than one batch (--batch-size "
                            f"{cfg.batch_size}): every sweep step trains on the same images, so the loss falls as "
                            "they are memorised and the suggestion is rough")
    if plot is not None:
        plot_lr_find(result, plot)
    return result


def find_lr_as_run(cfg: Any, model: nn.Module, batches: Iterable, settings: StepSettings,
                   **sweep: Any) -> Optional[LRFindResult]:
    """find_lr with the run's step settings, optimizer (its weight decay, momentum, backbone lr multiplier) and
    its first epoch's freezing (a new run's: none for a random backbone); `model` is the head alone in
    cached-feature mode (nothing to freeze then). `lr-find` and `train --lr auto` both sweep through here."""
    policy = FreezePolicy(cfg.new_run_freeze_epochs(), cfg.freeze_backbone, cfg.frozen_bn_stats())
    frozen = policy.frozen(1) and not cfg.cache_features
    result = find_lr(model, batches,
                     lambda m: make_optimizer(m, cfg.optimizer, 1.0, weight_decay=cfg.weight_decay,
                                              momentum=cfg.momentum, backbone_lr_mult=cfg.backbone_lr_mult),
                     settings, prepare=None if cfg.cache_features else (lambda m: policy.apply(m, frozen)),
                     **sweep)
    if frozen and result is not None:
        result.notes.append("swept with the backbone frozen, as the run's first epoch trains")
    return result
