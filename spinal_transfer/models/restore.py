"""Rebuild a model from a checkpoint: the architecture offline (weights=None), then the checkpoint's weights."""
from __future__ import annotations

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
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, cfg, DataConfig(**ckpt["data_config"]), classes
