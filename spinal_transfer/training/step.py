"""One training step, the one the epoch loop (train.train_one_epoch) and the lr range test (lr_find) both take,
and the settings it runs under.

Why one: the range test is meant to measure the run's own training, so it steps batches exactly as the run
does: the same precision, memory format, loss (auxiliary heads included) and the same rule for batches that
cannot train.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..config import TrainConfig
from ..evaluation.evaluate import autocast
from ..utils.runtime import amp_dtype, use_channels_last
from .optim import compute_loss


@dataclass(frozen=True)
class StepSettings:
    """How every batch of a run is stepped, fixed for the run (`from_config`, once at set-up)."""

    device: torch.device
    dtype: Optional[torch.dtype] = None       # autocast to this (bf16/fp16); None: full precision
    channels_last: bool = False               # batches in NHWC (the model was placed so)
    accum_steps: int = 1                      # batches per optimizer step
    clip_grad: Optional[float] = None         # max gradient norm
    criterion: nn.Module = field(default_factory=nn.CrossEntropyLoss)
    mixup: Any = None                         # timm Mixup/CutMix, with a soft-target criterion
    log_interval: int = 20                    # optimizer steps between non-finite-loss checks

    @classmethod
    def from_config(cls, cfg: TrainConfig, device: torch.device, criterion: nn.Module,
                    mixup: Any = None) -> "StepSettings":
        """The run's settings; cached-feature mode feeds feature vectors, so never channels_last there."""
        return cls(device, amp_dtype(cfg.amp, device),
                   use_channels_last(cfg.channels_last, device) and not cfg.cache_features, cfg.accum_steps,
                   cfg.clip_grad, criterion, mixup, cfg.log_interval)


def train_step(fwd: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, s: StepSettings, closes: bool) -> Optional[tuple[torch.Tensor, int]]:
    """Forward and backward of one batch; when `closes` ends an accumulation window, the optimizer step
    (gradients unscaled and clipped first, through the scaler) and zeroed gradients. Returns (the batch's
    loss, detached; images it trained on), or None for a batch that cannot train (then nothing is stepped):
    fewer than 2 images, which BatchNorm cannot train on (timm's Mixup pairs images, so under mixup an odd
    last image is dropped first)."""
    if s.mixup is not None and len(x) % 2:
        x, y = x[:-1], y[:-1]
    if len(x) < 2:
        return None
    x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
    if s.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if s.mixup is not None:
        x, y = s.mixup(x, y)
    with autocast(s.device, s.dtype):
        loss = compute_loss(fwd(x), y, s.criterion)
    scaler.scale(loss / s.accum_steps).backward()
    if closes:
        if s.clip_grad is not None:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(fwd.parameters(), s.clip_grad)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return loss.detach(), len(x)
