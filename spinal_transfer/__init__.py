"""spinal-transfer: fine-tune pretrained torchvision/timm classifiers with a SpinalNet head.

The top-level names are imported on first use, so `import spinal_transfer` (and the command line's
`--help`) does not import torch.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.3.0"

# albumentations asks the network for a newer release when imported; offline that is a warning on every command
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

_LAZY = {"TrainConfig": "config", "SpinalHead": "models.heads", "MLPHead": "models.heads",
         "LinearHead": "models.heads", "create_head": "models.heads", "build_model": "models.surgery",
         "get_head": "models.surgery", "list_backbones": "models.surgery", "load": "deploy.export",
         "Predictor": "deploy.predictor"}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'spinal_transfer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
