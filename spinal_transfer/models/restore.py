"""Rebuild a model from a checkpoint: the architecture offline (weights=None), then the checkpoint's weights."""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..config import TrainConfig
from ..data.transforms import DataConfig
from .heads import head_options
from .surgery import build_model


def model_from_checkpoint(ckpt: dict):
    """(model in eval mode, TrainConfig, DataConfig, classes): the architecture rebuilt offline (weights=None),
    then the checkpoint's weights loaded."""
    cfg = TrainConfig.from_dict(ckpt["config"])
    classes, info = ckpt["classes"], ckpt["head_info"]
    model = build_model(cfg.backbone, len(classes), head=cfg.head, weights=None, replace=info["replace"],
                        img_size=info.get("input_size"), **head_options(cfg))
    set_transform_input(model, recorded_transform_input(info))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, cfg, DataConfig(**ckpt["data_config"]), classes


def recorded_transform_input(info: dict) -> Optional[bool]:
    """The input remap a torchvision GoogLeNet/Inception v3 of this head_info trained with (None: a model without
    one). Checkpoints before it was recorded had it on exactly when torchvision loaded its own weights (a weights
    name, not none, a file or bundled)."""
    if "transform_input" in info:
        return info["transform_input"]
    if info.get("backbone") not in ("torchvision/googlenet", "torchvision/inception_v3"):
        return None
    return info.get("weights") is not None and info.get("weights_file") is None


def set_transform_input(model: nn.Module, value: Optional[bool]) -> None:
    """Give a rebuilt model the input remap it trained with (a model without the flag is left as it is)."""
    if value is not None and hasattr(model, "transform_input"):
        model.transform_input = bool(value)
