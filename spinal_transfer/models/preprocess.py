"""The backbone's input settings (DataConfig): resolution, normalization, resize and interpolation.

Pretrained backbones expect the preprocessing they were trained with, so these come from the backbone's own
pretrained configuration (timm `pretrained_cfg`, a Hub repo's config.json, torchvision weight enum presets)
unless the run's config overrides them. Reads metadata only, so it works offline.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..data.transforms import CV2_INTERPOLATION, DataConfig, _hw
from ..errors import ConfigError
from .convert import BUNDLED
from .hub import Unreachable, hub_model_config, is_hub_name
from .weights import WeightSource

# Used when nothing is known about the backbone: the ImageNet convention of torchvision's ResNets.
_FALLBACK = dict(img_size=224, resize_size=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 interpolation="bilinear", crop_pct=224 / 256)


_WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def _from_timm(d: dict) -> dict:
    """A timm data config (`input_size`, `crop_pct`, ...) in DataConfig terms."""
    img = int(d["input_size"][1])
    crop_pct = float(d.get("crop_pct") or _FALLBACK["crop_pct"])
    interp = d.get("interpolation")
    return dict(img_size=img, resize_size=round(img / crop_pct), mean=tuple(d["mean"]), std=tuple(d["std"]),
                interpolation=interp if interp in CV2_INTERPOLATION else "bilinear", crop_pct=crop_pct)


def _is_named_weights(weights: str) -> bool:
    """True for a timm tag / torchvision enum name; False for default, none, bundled (the architecture's own
    ImageNet preprocessing) and file paths."""
    path_like = "/" in weights or "\\" in weights or Path(weights).suffix in _WEIGHT_FILE_SUFFIXES
    return weights.lower() not in ("default", "none", BUNDLED) and not path_like and not Path(weights).exists()


def _timm_defaults(name: str, weights: str) -> Optional[dict]:
    """The pretrained cfg of `name` (which may carry a `.tag`) or of `name.<weights tag>`."""
    import timm.data
    import timm.models

    if is_hub_name(name):        # the repo's config.json (from the HF cache when offline)
        return _from_timm(timm.data.resolve_data_config(pretrained_cfg=hub_pretrained_cfg(name)))
    tagged = "." not in name and _is_named_weights(weights)
    pcfg = timm.models.get_pretrained_cfg(f"{name}.{weights}" if tagged else name)
    return _from_timm(timm.data.resolve_data_config(pretrained_cfg=pcfg.to_dict())) if pcfg else None


def _torchvision_defaults(name: str, weights: str) -> Optional[dict]:
    """Read the weight enum's transforms() preset; for no/local weights, the architecture's DEFAULT one."""
    from torchvision.models import get_model_weights, get_weight

    try:
        enum = get_model_weights(name)
    except (ValueError, KeyError):
        return None
    if not _is_named_weights(weights):
        w = enum.DEFAULT
    elif "." in weights:
        w = get_weight(weights)
    elif weights in enum.__members__:
        w = enum[weights]
    else:
        raise ConfigError(f"unknown weights {weights!r} for torchvision/{name}; "
                         f"choose one of {list(enum.__members__)}, default, none or a file path")
    t = w.transforms()
    if not hasattr(t, "crop_size"):
        return None
    img, resize = int(t.crop_size[0]), int(t.resize_size[0])
    interp = t.interpolation.value
    return dict(img_size=img, resize_size=resize, mean=tuple(t.mean), std=tuple(t.std),
                interpolation=interp if interp in CV2_INTERPOLATION else "bilinear", crop_pct=img / resize)


def resolve_data_config(backbone: str, weights: Optional[str], model: Optional[torch.nn.Module] = None, *,
                        img_size: Optional[int] = None, resize_size: Optional[Union[int, Sequence[int]]] = None,
                        mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                        interpolation: Optional[str] = None, eval_resize: str = "center_crop") -> DataConfig:
    """Backbone defaults (from `model.pretrained_cfg` when present, else from the backbone id and weights),
    then every override that is not None wins. Works offline: only registry/enum metadata is read."""
    weights = weights or "none"
    base: Optional[dict] = None
    if model is not None and getattr(model, "pretrained_cfg", None):
        import timm.data

        base = _from_timm(timm.data.resolve_model_data_config(model))
    else:
        source, _, name = backbone.partition("/")
        if source == "timm":
            base = _timm_defaults(name, weights)
        elif source == "torchvision":
            base = _torchvision_defaults(name, weights)
    base = dict(base or _FALLBACK)

    img = img_size or base["img_size"]
    if resize_size:
        resize = tuple(int(r) for r in resize_size) if isinstance(resize_size, (list, tuple)) else int(resize_size)
        if min(_hw(resize)) < img:          # the crop would not fit: albumentations fails mid-epoch
            raise ConfigError(f"--resize-size {resize_size} is smaller than the {img} px crop (--img-size"
                              f"{'' if img_size else ', the backbone default'}); give a --resize-size of at least "
                              f"{img}", key="resize_size")
        crop_pct = img / min(_hw(resize))
    elif img_size:
        resize, crop_pct = round(img / base["crop_pct"]), base["crop_pct"]
    else:
        resize, crop_pct = base["resize_size"], base["crop_pct"]
    return DataConfig(
        img_size=int(img), resize_size=resize if isinstance(resize, tuple) else int(resize),
        mean=tuple(float(m) for m in (mean or base["mean"])),
        std=tuple(float(s) for s in (std or base["std"])),
        interpolation=interpolation or base["interpolation"], crop_pct=float(crop_pct), eval_resize=eval_resize,
    )


def hub_pretrained_cfg(name: str) -> dict:
    """The pretrained config (mean, std, input_size, crop_pct, interpolation...) of a `hf-hub:` name, for
    preprocessing without building the model; WeightsUnavailable naming config.json when it cannot be had."""
    try:
        return hub_model_config(name)[0]
    except Unreachable as e:
        WeightSource("timm", name).raise_unavailable(e)
