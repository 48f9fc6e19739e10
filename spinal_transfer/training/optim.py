"""Optimizers and learning-rate schedules of one stage, and the policies of a fine-tune: freezing, early stopping.

Each stage of a schedule builds a fresh optimizer and scheduler (as the paper's scripts did). Parameters
fall in two groups, the new head and the backbone, so the backbone can learn more slowly
(`backbone_lr_mult`) or not at all (frozen).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models.surgery import head_param_names


def param_groups(model: nn.Module, lr: float, backbone_lr_mult: float) -> list[dict]:
    """The head's parameters at `lr`, the backbone's at `lr * backbone_lr_mult`; a head alone (cached-feature
    mode: `train --lr auto` sweeps the head on the cached features) is all head."""
    if not hasattr(model, "spinal_info"):
        return [{"params": list(model.parameters()), "lr": lr, "name": "head"}]
    head_keys = set(head_param_names(model))
    head, backbone = [], []
    for name, p in model.named_parameters():
        (head if name in head_keys else backbone).append(p)
    return [{"params": head, "lr": lr, "name": "head"},
            {"params": backbone, "lr": lr * backbone_lr_mult, "name": "backbone"}]


def make_optimizer(model: nn.Module, kind: str, lr: float, *, weight_decay: float = 0.0, momentum: float = 0.9,
                   backbone_lr_mult: float = 1.0) -> torch.optim.Optimizer:
    groups = param_groups(model, lr, backbone_lr_mult)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}")


def make_scheduler(opt: torch.optim.Optimizer, kind: str, epochs: int, steps_per_epoch: int, *,
                   step_size: int = 7, gamma: float = 0.1, warmup_epochs: float = 0.0) -> tuple[Any, str]:
    """(scheduler, "epoch" or "step"): StepLR steps once per epoch (the paper); cosine once per optimizer step."""
    sched = torch.optim.lr_scheduler
    if kind == "step":
        return sched.StepLR(opt, step_size=step_size, gamma=gamma), "epoch"
    if kind == "none":
        return sched.LambdaLR(opt, lambda _: 1.0), "epoch"
    total = max(1, epochs * steps_per_epoch)
    warm = min(int(warmup_epochs * steps_per_epoch), total - 1)
    cosine = sched.CosineAnnealingLR(opt, T_max=total - warm)
    if warm == 0:
        return cosine, "step"
    return sched.SequentialLR(opt, [sched.LinearLR(opt, 1e-3, 1.0, total_iters=warm), cosine], [warm]), "step"


@dataclass
class FreezePolicy:
    """What of the backbone trains in each epoch (as Lightning's BaseFinetuning: a policy with a hook, not a
    condition in the loop). `freeze_epochs` first epochs train only the head; `always` keeps the backbone frozen;
    `frozen_bn_stats` keeps its BatchNorm running statistics as loaded while the rest of it trains: re-estimated
    from a few hundred augmented images they drift from the pretrained ones the features were learnt with
    (EfficientNet-Lite0 on 16 photos a class at 128 px: test top-1 0.840 updated, 0.885 frozen), but images far
    from the pretraining data need their own (15 grey digits a class: 0.946 updated, 0.283 frozen; RESULTS.md)."""

    freeze_epochs: int = 0
    always: bool = False
    frozen_bn_stats: bool = False

    def frozen(self, epoch: int) -> bool:
        """Whether the backbone is frozen in `epoch` (1-based)."""
        return self.always or epoch <= self.freeze_epochs

    def apply(self, model: nn.Module, frozen: bool) -> None:
        """Frozen backbone: no gradients and eval-mode BN/dropout, so its features stay fixed; the head trains.
        Training backbone: all in train mode, but its BatchNorm layers in eval mode with `frozen_bn_stats`."""
        head_keys = set(head_param_names(model))
        for name, p in model.named_parameters():
            p.requires_grad_(name in head_keys or not frozen)
        model.train()
        if frozen:
            model.eval()
            for path in model.spinal_info.head_paths:
                model.get_submodule(path).train()
        elif self.frozen_bn_stats:
            heads = model.spinal_info.head_paths
            inside = tuple(h + "." for h in heads)
            for name, m in model.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and name not in heads and not name.startswith(inside):
                    m.eval()


AUX_LOSS_WEIGHT = 0.4   # Inception v3 / GoogLeNet auxiliary classifiers, as in their papers


def compute_loss(out: Any, target: torch.Tensor, criterion: nn.Module) -> torch.Tensor:
    """Main logits, plus auxiliary classifiers' losses (Inception/GoogLeNet in train mode)."""
    if isinstance(out, tuple):
        main, *aux = out
        return criterion(main, target) + AUX_LOSS_WEIGHT * sum(criterion(a, target) for a in aux if a is not None)
    return criterion(out, target)
