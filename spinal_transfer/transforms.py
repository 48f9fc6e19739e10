"""Input pipelines (albumentations on HxWx3 uint8 RGB arrays) and the backbone's input settings.

Pretrained backbones expect the resolution, normalization and resize interpolation they were trained
with, so those come from the backbone's own pretrained configuration (timm `pretrained_cfg`,
torchvision weight enum presets) unless the TrainConfig overrides them.

The paper recipe rotates with nearest-neighbour sampling and a black fill, as the scripts'
`transforms.RandomRotation(15)` did (torchvision's defaults); it is also 4x cheaper than bilinear.

Downscaling always uses cv2.INTER_AREA (`area_for_downscale="image"`): cv2's bilinear/bicubic do not
antialias, unlike the PIL resizing the backbones were pretrained with, and aliasing costs accuracy.
The configured interpolation applies when upscaling.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from .config import TrainConfig

CV2_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}

# Used when nothing is known about the backbone: the ImageNet convention of torchvision's ResNets.
_FALLBACK = dict(img_size=224, resize_size=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 interpolation="bilinear", crop_pct=224 / 256)
_WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


@dataclass
class DataConfig:
    """What the model expects as input; `resize_size` is the eval shorter side / paper resize square."""

    img_size: int
    resize_size: int
    mean: tuple
    std: tuple
    interpolation: str
    crop_pct: float


def _from_timm(d: dict) -> dict:
    """A timm data config (`input_size`, `crop_pct`, ...) in DataConfig terms."""
    img = int(d["input_size"][1])
    crop_pct = float(d.get("crop_pct") or _FALLBACK["crop_pct"])
    interp = d.get("interpolation")
    return dict(img_size=img, resize_size=round(img / crop_pct), mean=tuple(d["mean"]), std=tuple(d["std"]),
                interpolation=interp if interp in CV2_INTERPOLATION else "bilinear", crop_pct=crop_pct)


def _is_named_weights(weights: str) -> bool:
    """True for a timm tag / torchvision enum name; False for default, none and file paths."""
    path_like = "/" in weights or "\\" in weights or Path(weights).suffix in _WEIGHT_FILE_SUFFIXES
    return weights not in ("default", "none") and not path_like and not Path(weights).exists()


def _timm_defaults(name: str, weights: str) -> Optional[dict]:
    """The pretrained cfg of `name` (which may carry a `.tag`) or of `name.<weights tag>`."""
    import timm.data
    import timm.models

    from .hub import hub_pretrained_cfg, is_hub_name

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
        raise ValueError(f"unknown weights {weights!r} for torchvision/{name}; "
                         f"choose one of {list(enum.__members__)}, default, none or a file path")
    t = w.transforms()
    if not hasattr(t, "crop_size"):
        return None
    img, resize = int(t.crop_size[0]), int(t.resize_size[0])
    interp = t.interpolation.value
    return dict(img_size=img, resize_size=resize, mean=tuple(t.mean), std=tuple(t.std),
                interpolation=interp if interp in CV2_INTERPOLATION else "bilinear", crop_pct=img / resize)


def resolve_data_config(cfg: TrainConfig, model: Optional[torch.nn.Module] = None,
                        backbone: Optional[str] = None, weights: Optional[str] = None) -> DataConfig:
    """Backbone defaults (from `model.pretrained_cfg` when present, else from the backbone id), then
    every cfg field that is not None wins. Works offline: only registry/enum metadata is read."""
    backbone = backbone or cfg.backbone
    weights = weights or cfg.weights
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

    img = cfg.img_size or base["img_size"]
    if cfg.resize_size:
        resize, crop_pct = cfg.resize_size, img / cfg.resize_size
    elif cfg.img_size:
        resize, crop_pct = round(img / base["crop_pct"]), base["crop_pct"]
    else:
        resize, crop_pct = base["resize_size"], base["crop_pct"]
    return DataConfig(
        img_size=int(img), resize_size=int(resize),
        mean=tuple(float(m) for m in (cfg.mean or base["mean"])),
        std=tuple(float(s) for s in (cfg.std or base["std"])),
        interpolation=cfg.interpolation or base["interpolation"], crop_pct=float(crop_pct),
    )


class NormalizeToTensor(ToTensorV2):
    """`A.Normalize` then `ToTensorV2` (same numbers, to float32 rounding) in one table lookup per pixel.

    albucore normalizes uint8 one channel at a time and merges them, and ToTensorV2 returns a strided
    HWC->CHW view that the batch collate then reads pixel by pixel; one 3-channel `cv2.LUT` and a
    contiguous CHW copy cost less than half of that, in every DataLoader worker."""

    def __init__(self, mean: tuple, std: tuple, p: float = 1.0):
        super().__init__(p=p)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        levels = np.arange(256, dtype=np.float64)[:, None] / 255.0
        self._lut = ((levels - np.array(self.mean)) / np.array(self.std)).astype(np.float32)[None]   # 1x256x3

    def apply(self, img: np.ndarray, **params: Any) -> torch.Tensor:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"NormalizeToTensor takes HxWx3 uint8 images, got {img.dtype} {img.shape}")
        return torch.from_numpy(np.ascontiguousarray(cv2.LUT(img, self._lut).transpose(2, 0, 1)))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("mean", "std")


def build_transforms(cfg: TrainConfig, dc: DataConfig, train: bool) -> A.Compose:
    """uint8 HxWx3 RGB -> normalized CHW float tensor. `augment="none"` and eval share one pipeline.

    The result carries `decode_min_size`: the shorter side its first step needs of the decoded image
    (None when a random-resized crop may take a small region of it), so that ImageDataset can decode
    large JPEGs at a reduced size without changing what the pipeline sees."""
    interp = CV2_INTERPOLATION[dc.interpolation]
    size = dc.img_size
    steps: list[Any]
    if train and cfg.augment in ("paper", "paper_rrc"):
        crop = (A.RandomCrop(size, size) if cfg.augment == "paper" else
                A.RandomResizedCrop(size=(size, size), scale=tuple(cfg.rrc_scale), interpolation=interp,
                                    area_for_downscale="image"))
        steps = [A.Resize(dc.resize_size, dc.resize_size, interpolation=interp, area_for_downscale="image"),
                 A.Rotate(limit=cfg.rotation, interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT,
                          fill=0, p=1.0),
                 crop]
        need: Optional[int] = dc.resize_size
    elif train and cfg.augment == "modern":
        steps = [A.RandomResizedCrop(size=(size, size), scale=tuple(cfg.rrc_scale), interpolation=interp,
                                     area_for_downscale="image")]
        need = None
    elif cfg.eval_resize == "center_crop":
        steps = [A.SmallestMaxSize(max_size=dc.resize_size, interpolation=interp, area_for_downscale="image"),
                 A.CenterCrop(size, size)]
        need = dc.resize_size
    else:
        steps = [A.Resize(size, size, interpolation=interp, area_for_downscale="image")]
        need = size
    if train and cfg.augment != "none":
        if cfg.hflip > 0:
            steps.append(A.HorizontalFlip(p=cfg.hflip))
        if cfg.vflip > 0:
            steps.append(A.VerticalFlip(p=cfg.vflip))
    steps.append(NormalizeToTensor(dc.mean, dc.std))
    compose = A.Compose(steps)
    compose.decode_min_size = need
    return compose


def transform_signature(cfg: TrainConfig, dc: DataConfig, train: bool) -> str:
    """A short stable hash of the pipeline (albumentations' own serialization, including its version,
    and the decode size), so a feature cache is reused only with identical preprocessing."""
    tf = build_transforms(cfg, dc, train)
    spec = json.dumps({"pipeline": A.to_dict(tf), "decode_min_size": tf.decode_min_size}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:16]
