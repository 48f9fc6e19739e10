"""Which epoch is best, and when to stop: the one owner of both.

`CheckpointSaver` decides the best epoch (and writes best.pt, stage_best.pt and last.pt); `EarlyStopping`
decides when a stage has stopped improving. Both keep their own state, saved in last.pt, so a resumed run
chooses exactly as an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..config import METRIC_NAMES
from ..runs.checkpoint import atomic_save, load_checkpoint, state_dict_cpu

SELECT_METRICS = tuple(METRIC_NAMES)


def selection_score(metrics: dict, metric: str) -> float:
    """The score that picks the best epoch and drives early stopping, higher is better: top-1, or the negated
    cross-entropy for "loss" (which also moves when top-1 ties, as on a small val split at its ceiling)."""
    if metric not in SELECT_METRICS:
        raise ValueError(f"select metric {metric!r}: one of {', '.join(SELECT_METRICS)}")
    return float(metrics["top1"]) if metric == "top1" else -float(metrics["loss"])


def describe_score(score: float, metric: str) -> str:
    """A score as the metric it came from (a loss score is the negated loss)."""
    return f"{METRIC_NAMES[metric]} {score if metric == 'top1' else -score:.4f}"


class CheckpointSaver:
    """The one place that decides which weights are "best", and that writes best.pt, stage_best.pt and last.pt.

    - Selection: an epoch is best when its score (`selection_score` of the selection split: the negated loss by
      default, or top-1) beats every earlier epoch's; ties keep the earlier epoch. The score is that of the
      weights evaluation ran on, which `eval_module` chooses: the EMA weights when there is an EMA (they are what
      is evaluated, as in timm), else the raw ones. So best.pt holds exactly the weights whose score made them
      best.
    - stage_best.pt (multi-stage schedules) holds the raw weights of the stage's best epoch: the next stage
      starts from them, as in the paper's scripts (training continues from raw weights, not the EMA).
    - last.pt holds everything needed to continue: raw and EMA weights, optimizer, scheduler, scaler, RNG
      states, progress and this saver's own state.
    Only rank 0 calls the writing methods.
    """

    def __init__(self, run: Any, meta: dict, multi_stage: bool, state: Optional[dict] = None):
        self.run, self.meta, self.multi_stage = run, meta, multi_stage
        state = state or {}
        self.best = state.get("best", float("-inf"))
        self.best_epoch = state.get("best_epoch", 0)           # 1-based; 0 = none yet
        self.stage_best = state.get("stage_best", float("-inf"))

    @staticmethod
    def eval_module(model: torch.nn.Module, ema: Any) -> torch.nn.Module:
        """The weights that are evaluated, selected and saved as best."""
        return ema.module if ema is not None else model

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "stage_best": self.stage_best}

    def start_stage(self) -> None:
        self.stage_best = float("-inf")

    def update(self, epoch: int, score: float, model: torch.nn.Module, ema: Any) -> bool:
        """Record epoch `epoch` (1-based) with `score`; write best.pt / stage_best.pt when it beats them.
        Returns whether it is the best epoch so far. last.pt is written separately (`save_last`)."""
        if score > self.stage_best:
            self.stage_best = score
            if self.multi_stage:
                atomic_save({"model": state_dict_cpu(model), "epoch": epoch}, self.run.stage_best)
        if not score > self.best:          # ties keep the earlier epoch; a NaN score is never best
            return False
        self.best, self.best_epoch = score, epoch
        atomic_save({"model": state_dict_cpu(self.eval_module(model, ema)), "epoch": epoch, **self.meta},
                    self.run.best)
        return True

    def save_last(self, model: torch.nn.Module, ema: Any, train_state: dict) -> None:
        """last.pt: the weights, the EMA, this saver's state and `train_state` (optimizer, scheduler, scaler,
        rng, progress)."""
        atomic_save({"model": state_dict_cpu(model), "ema": None if ema is None else state_dict_cpu(ema.module),
                     "saver": self.state_dict(), **train_state, **self.meta}, self.run.last)

    def record_calibration(self, temperature: Optional[float], note: Optional[str] = None) -> None:
        """Write into best.pt the calibration temperature fitted on its weights, so that every model made from it
        (evaluate, predict, export) applies softmax(logits / T); or, with none fitted, `note`, why not (the val
        split all right, none right, or absent), so that they say that reason, not the one for last.pt or a run
        still training. A later best epoch writes a best.pt without either until the run finishes again."""
        ckpt = {k: v for k, v in load_checkpoint(self.run.best).items()
                if k not in ("temperature", "calibration_note")}
        atomic_save({**ckpt, **({"temperature": float(temperature)} if temperature is not None
                                else {"calibration_note": note})}, self.run.best)

    def stage_start_weights(self) -> Optional[dict]:
        """The weights the next stage starts from (the finished stage's best), if saved."""
        return load_checkpoint(self.run.stage_best)["model"] if self.run.stage_best.is_file() else None


@dataclass
class EarlyStopping:
    """Ends a stage when the selection metric has not improved by more than `min_delta` for `patience` epochs
    (as fastai's EarlyStoppingCallback, per stage: a multi-stage schedule then starts its next stage from the
    stage's best weights). `min_delta` is in the metric's units (a fraction of top-1, or loss). It keeps its own
    state (the stage's best score, its epoch, the epochs since), saved in last.pt through `state_dict`, so it
    survives a resume; every rank sees the same gathered metric, so every rank stops at the same epoch."""

    patience: Optional[int] = None
    min_delta: float = 0.0
    metric: str = "top1"          # what the score is (selection_score), for the reason to stop
    best: float = float("-inf")
    best_epoch: int = 0           # 1-based; 0 = none yet in this stage
    bad: int = 0                  # epochs since the stage's best

    def start_stage(self) -> None:
        self.best, self.best_epoch, self.bad = float("-inf"), 0, 0

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad = float(state["best"]), int(state["best_epoch"]), int(state["bad"])

    def update(self, epoch: int, score: float, split: str) -> Optional[str]:
        """Record `score` of `epoch`; the reason to stop the stage now, or None."""
        if score > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad = score, epoch, 0
            return None
        self.bad += 1
        if self.patience is None or self.bad < self.patience:
            return None
        return (f"{split} {METRIC_NAMES[self.metric]} did not improve by more than {self.min_delta:g} for "
                f"{self.patience} epoch(s) (stage best {describe_score(self.best, self.metric)} at epoch "
                f"{self.best_epoch})")
