"""`--bn-stats auto` (the default): keep a pretrained backbone's BatchNorm statistics when the folder's images are
close to the data they were estimated on, re-estimate them when they are not.

Why a rule and not one setting: kept (Keras' advice for fine-tuning), ImageNet's statistics serve photographs better
than a re-estimate from a few hundred augmented images (EfficientNet-Lite0, 16 photos a class at 128 px: test top-1
0.885 kept vs 0.840 re-estimated), but on 15 grey handwritten digits a class two of three seeds never learned with
them kept (0.283 vs 0.946; RESULTS.md, defaults section). What separates the two is how far the images' activations
are from the statistics: `bn_shift` measures it before training, on the training images the model would see at
evaluation, and the run records the choice (config.yaml) so a resume, evaluate and compare read what it did.

A head with dropout re-estimates them whatever the distance (`head_dropout`): dropout's noise grows with the size of
the features it drops, and with the statistics kept nothing re-normalizes what the backbone emits, so the backbone
learns to switch its features off. Measured (EfficientNet-Lite0, fewshot12, head dropout 0.5, statistics kept): 96%
of the pooled features constant across images after 8 epochs, the loss at ln C throughout, test top-1 0.11-0.15 on
three seeds (0.80 re-estimated); freezing BatchNorm's scale and shift as well did not prevent it (99% constant).
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig
from ..data.images import BadImage, load_image
from ..evaluation.evaluate import autocast
from .inputs import RunInputs

log = logging.getLogger("spinal_transfer")

SAMPLE = 64          # training images measured, spread over the class-sorted list (64 and 256 agree within 0.01)
# bn_shift on EfficientNet-Lite0 (ImageNet) at 64 px (RESULTS.md, defaults): the photographs of fewshot12 0.162
# (0.120 at 128 px), textures8's grey patches 0.400, the digits 0.638 and 0.645; `prepare photos` 0.17, its digits
# 0.66-0.97 (tests/training/test_bn_stats.py). Kept below this: the photos (where keeping helps) are kept, the digits
# (where it collapses) and the textures (7 points lower kept) update. Four folders decided it; each run logs its value.
KEEP_BELOW = 0.25


def batchnorms(model: nn.Module) -> list[nn.Module]:
    """The backbone's BatchNorm layers (a new head's, e.g. the VGG spinal preset's, are not pretrained)."""
    heads = tuple(model.spinal_info.head_paths)
    inside = tuple(h + "." for h in heads)
    return [m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and name not in heads and not name.startswith(inside)]


def layer_kl(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float) -> float:
    """Mean over channels of KL(N(m, v) || N(running mean, running var + eps)), m and v the channel's mean and
    variance in the batch `x` (N, C, ...): how far the batch is from the statistics the layer normalizes with."""
    dims = [d for d in range(x.dim()) if d != 1]
    x = x.double()
    m, v = x.mean(dims), x.var(dims).clamp_min(1e-12)
    rm, rv = running_mean.double(), running_var.double() + eps
    return float((0.5 * (v / rv + (m - rm) ** 2 / rv - 1 - torch.log(v / rv))).mean())


@torch.no_grad()
def bn_shift(model: nn.Module, images: torch.Tensor) -> Optional[float]:
    """The median over the backbone's BatchNorm layers of `layer_kl` of each layer's input, `images` run through
    `model` in eval mode (each layer sees what the frozen statistics would give it); None without BatchNorm."""
    layers = batchnorms(model)
    if not layers:
        return None
    kls: list[float] = []
    hooks = [m.register_forward_hook(lambda m, args, _: kls.append(layer_kl(args[0], m.running_mean,
                                                                            m.running_var, m.eps)))
             for m in layers]
    was_training = model.training
    try:
        model.eval()
        model(images)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return float(np.median(kls))


def sample_images(paths: Sequence[str], transform, n: int = SAMPLE) -> torch.Tensor:
    """Up to `n` of `paths`, evenly spread (a folder's list is sorted by class: its first 64 are a few classes, which
    looks far from any statistics), through `transform`; undecodable files are passed over."""
    picks = sorted(set(np.linspace(0, len(paths) - 1, min(n, len(paths))).astype(int).tolist()))
    images = []
    for i in picks:
        try:
            images.append(transform(image=load_image(paths[i]))["image"])
        except BadImage:
            continue
    return torch.stack(images)


def head_dropout(model: nn.Module) -> float:
    """The largest dropout probability among the modules of the model's head (0.0 without dropout)."""
    heads = [model.get_submodule(path) for path in model.spinal_info.head_paths]
    return max((float(m.p) for head in heads for m in head.modules()
                if isinstance(m, nn.modules.dropout._DropoutNd)), default=0.0)


DROPOUT_COLLAPSE = ("with the backbone's BatchNorm statistics kept, the head's dropout drives the backbone to switch "
                    "its features off (README: the --bn-stats row and the bullet after the defaults table)")


def unmeasured(cfg: TrainConfig, drop: float) -> Optional[str]:
    """--bn-stats auto's choice where the folder need not be measured, None where it must be: a backbone kept
    frozen never updates its statistics, a random one (--weights none) has none worth keeping, and a head with
    dropout (`drop`, head_dropout) collapses with them kept: update. bench_defaults keys its records by this too."""
    if cfg.freeze_backbone or str(cfg.weights).lower() == "none" or drop > 0:
        return "update"
    return None


def resolve(cfg: TrainConfig, model: nn.Module, inputs: RunInputs, device: torch.device,
            dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> str:
    """The config's --bn-stats as a new run trains (train, and lr-find's sweep of its first epoch): auto as
    `unmeasured` decides it, else measured on its training images (`choose`)."""
    drop = head_dropout(model)
    if cfg.frozen_bn_stats() and drop > 0 and not cfg.freeze_backbone:
        log.warning(f"--bn-stats frozen with head dropout {drop:g}: {DROPOUT_COLLAPSE}; if the val loss stays near "
                    f"ln(classes), use --bn-stats auto or update")
    if cfg.bn_stats != "auto":
        return cfg.bn_stats
    chosen = unmeasured(cfg, drop)
    if chosen is None:
        return choose(model, [p for p, _ in inputs.splits.train], inputs.eval_transform, device, dtype, channels_last)
    if unmeasured(cfg, 0.0) is None:                  # without the head's dropout it would have been measured
        log.info(f"--bn-stats auto -> update: the head has dropout {drop:g}; {DROPOUT_COLLAPSE}")
    return chosen


def measure(model: nn.Module, paths: Sequence[str], transform, device: torch.device,
            dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> Optional[float]:
    """`bn_shift` of a sample of `paths` (sample_images) as the run would feed them; None without BatchNorm."""
    if not batchnorms(model):
        return None
    x = sample_images(paths, transform).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, dtype):
        return bn_shift(model, x)


def decision(shift: Optional[float]) -> str:
    """"frozen" for a measured shift below KEEP_BELOW, else "update" (also None: no BatchNorm, nothing to keep)."""
    return "frozen" if shift is not None and shift < KEEP_BELOW else "update"


def choose(model: nn.Module, paths: Sequence[str], transform, device: torch.device,
           dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> str:
    """--bn-stats auto as this run trains (`measure`, then `decision`), logged with the measured value."""
    shift = measure(model, paths, transform, device, dtype, channels_last)
    chosen = decision(shift)
    if shift is not None:
        keep = chosen == "frozen"
        log.info(f"--bn-stats auto -> {chosen}: the training images are {shift:.3f} from the backbone's BatchNorm "
                 f"statistics (median KL over its layers, {min(SAMPLE, len(paths))} images at most; kept below "
                 f"{KEEP_BELOW}: {'close' if keep else 'far'} enough to {'keep' if keep else 're-estimate'} them)")
    return chosen
