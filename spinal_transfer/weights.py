"""Where a backbone's starting weights come from, and what to do when they cannot be had offline."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, NoReturn, Optional

import torch
from torch import nn

from .checkpoint import load_state_dict_file
from .errors import CheckpointError, ConfigError, WeightsUnavailable


@dataclass
class WeightSource:
    lib: str
    name: str
    builtin: Any = None            # torchvision Weights enum, or True for timm's pretrained weights
    tag: Optional[str] = None      # timm pretrained tag ("a1_in1k")
    path: Optional[Path] = None    # local state-dict file

    def raise_unavailable(self, exc: BaseException) -> NoReturn:
        if self.lib == "torchvision":
            url = self.builtin.url
            cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
            msg = (f"cannot load torchvision/{self.name} weights {self.builtin}: the file is not cached and "
                   f"could not be downloaded ({exc}).\n  Put {os.path.basename(url)} (from {url}) at {cache},\n"
                   f"  or pass weights=/path/to/state_dict.pth (or .safetensors).")
        else:
            import timm

            cfg = timm.models.get_pretrained_cfg(f"{self.name}.{self.tag}" if self.tag else self.name)
            hub = getattr(cfg, "hf_hub_id", None) if cfg else None
            msg = (f"cannot load timm/{self.name} pretrained weights: not in the local cache and could not be "
                   f"downloaded ({type(exc).__name__}).\n"
                   + (f"  Download model.safetensors of the Hugging Face repo {hub} into the HF cache "
                      f"(HF_HOME, then run with HF_HUB_OFFLINE=1),\n" if hub else "")
                   + "  or pass weights=/path/to/model.safetensors (or a torch state_dict file).")
        raise WeightsUnavailable(msg) from None


def resolve_weights(lib: str, name: str, weights: Optional[str]) -> WeightSource:
    """Turn the user's `weights` value into a WeightSource (no loading yet)."""
    src = WeightSource(lib, name)
    if weights is None or str(weights).lower() == "none":
        return src
    weights = str(weights)
    if os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")) or Path(weights).is_file():
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"weights file {path} does not exist")
        src.path = path
        return src
    if lib == "torchvision":
        import torchvision.models as tvm

        enum = tvm.get_model_weights(name)
        key = weights.split(".")[-1]
        if key.lower() == "default":
            key = "DEFAULT"
        try:
            src.builtin = enum[key] if key != "DEFAULT" else enum.DEFAULT
        except KeyError:
            raise ConfigError(f"torchvision/{name} has no weights {weights!r}; choose from "
                             f"{['default'] + [w.name for w in enum]} or a file path") from None
        return src
    src.builtin = True
    if weights.lower() != "default":
        import timm

        tags = [m.partition(".")[2] for m in timm.list_pretrained(f"{name}.*")]
        if weights not in tags:
            raise ConfigError(f"timm/{name} has no pretrained tag {weights!r}; choose from {['default'] + tags} "
                             "or a file path")
        src.tag = weights
    return src


def load_backbone_weights(model: nn.Module, path: Path, head_keys: List[str]) -> str:
    """Load a local state dict into `model` (already carrying its new head).

    Backbone keys must all be present with matching shapes (else a clear error). Head keys are
    loaded only when the file holds a head of exactly the same shape (a fine-tuned model); an
    ImageNet classifier or a head for other classes is left out and the new head keeps its init.
    """
    sd = load_state_dict_file(path)
    own = model.state_dict()
    head_set = set(head_keys)
    backbone_keys = [k for k in own if k not in head_set]
    missing = [k for k in backbone_keys if k not in sd]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in backbone_keys if k in sd and sd[k].shape != own[k].shape]
    if missing or wrong:
        raise CheckpointError(f"{path} does not match this backbone: {len(missing)} missing keys "
                         f"{missing[:5]}, {len(wrong)} shape mismatches {wrong[:5]}")
    head_matches = bool(head_keys) and all(k in sd and sd[k].shape == own[k].shape for k in head_keys)
    keys = backbone_keys + (head_keys if head_matches else [])
    model.load_state_dict({k: sd[k] for k in keys}, strict=False)
    return (f"loaded {len(keys)} tensors from {path}"
            + ("" if head_matches else "; the head is new (the file's head, if any, does not match)"))
