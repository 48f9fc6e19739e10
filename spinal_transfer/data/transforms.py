"""Input pipelines (albumentations on HxWx3 uint8 RGB arrays) and the backbone's input settings.

Pretrained backbones expect the resolution, normalization and resize interpolation they were trained
with, so those come from the backbone's own pretrained configuration (timm `pretrained_cfg`,
torchvision weight enum presets) unless the run's config overrides them.

The paper recipe rotates with nearest-neighbour sampling and a black fill, as the scripts'
`transforms.RandomRotation(15)` did (torchvision's defaults); it is also 4x cheaper than bilinear.

Downscaling always uses cv2.INTER_AREA (`area_for_downscale="image"`): cv2's bilinear/bicubic do not
antialias, unlike the PIL resizing the backbones were pretrained with, and aliasing costs accuracy.
The configured interpolation applies when upscaling.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from .augment import RANDAUGMENT_LEVELS, RRC_RATIO, Augmentation

CV2_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


@dataclass
class DataConfig:
    """What the model expects as input: crop size, the eval resize (`resize_size`: shorter side before the
    centre crop, or the square of the paper recipe's resize), normalization, interpolation, and the eval
    crop policy. It travels with every checkpoint and bundle, so evaluation and predict preprocess alike."""

    img_size: int
    resize_size: Union[int, tuple]        # one size, or (height, width) for a non-square resize
    mean: tuple
    std: tuple
    interpolation: str
    crop_pct: float
    eval_resize: str = "center_crop"


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


def _hw(resize: Union[int, Sequence[int]]) -> tuple[int, int]:
    """(height, width) of a resize given as one size or as [height, width]."""
    return (int(resize[0]), int(resize[1])) if isinstance(resize, (list, tuple)) else (int(resize), int(resize))


class Sharpness(A.ImageOnlyTransform):
    """PIL's `ImageEnhance.Sharpness` (the op TrivialAugment and RandAugment use): blend of the image with its
    3x3 smoothed version by `factor`, > 1 sharpens and < 1 blurs; the one-pixel border is kept, as PIL does.
    albumentations' Sharpen only sharpens, so it cannot express the blur half of the range."""

    _KERNEL = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0

    def __init__(self, factor_range: tuple = (0.01, 1.99), p: float = 1.0):
        super().__init__(p=p)
        self.factor_range = (float(factor_range[0]), float(factor_range[1]))

    def get_params(self) -> dict[str, Any]:
        return {"factor": self.py_random.uniform(*self.factor_range)}

    def apply(self, img: np.ndarray, factor: float = 1.0, **params: Any) -> np.ndarray:
        x = img.astype(np.float32)
        smooth = x.copy()
        smooth[1:-1, 1:-1] = cv2.filter2D(x, -1, self._KERNEL, borderType=cv2.BORDER_REPLICATE)[1:-1, 1:-1]
        return np.clip(np.rint(smooth + factor * (x - smooth)), 0, 255).astype(np.uint8)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("factor_range",)


# The op set of TrivialAugmentWide and RandAugment (Müller & Hutter 2021; Cubuk et al. 2020), as torchvision
# defines them: name -> the largest magnitude (TrivialAugmentWide's, RandAugment's). Shear is a shear factor
# (degrees = atan), translation a fraction of the side (torchvision: 32 px of 224 resp. 150/331 of the width),
# rotation degrees, the enhancements a factor change 1 +- m, posterize the bits removed, solarize the threshold
# fraction removed.
_OP_MAX = {"shear_x": (0.99, 0.3), "shear_y": (0.99, 0.3), "translate_x": (32 / 224, 150 / 331),
           "translate_y": (32 / 224, 150 / 331), "rotate": (135.0, 30.0), "brightness": (0.99, 0.9),
           "color": (0.99, 0.9), "contrast": (0.99, 0.9), "sharpness": (0.99, 0.9), "posterize": (6, 4),
           "solarize": (1.0, 1.0)}
_FREE_OPS = ("identity", "autocontrast", "equalize")


def _signed_op(name: str, lo: float, hi: float) -> A.BasicTransform:
    """One geometric or enhancement op whose signed magnitude is drawn from [lo, hi] (lo == hi: fixed)."""
    affine = dict(interpolation=cv2.INTER_LINEAR, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0)
    if name in ("shear_x", "shear_y"):
        deg = (math.degrees(math.atan(lo)), math.degrees(math.atan(hi)))
        return A.Affine(shear={"x": deg, "y": (0, 0)} if name == "shear_x" else {"x": (0, 0), "y": deg}, **affine)
    if name in ("translate_x", "translate_y"):
        t = {"x": (lo, hi), "y": (0, 0)} if name == "translate_x" else {"x": (0, 0), "y": (lo, hi)}
        return A.Affine(translate_percent=t, **affine)
    if name == "rotate":
        return A.Affine(rotate=(lo, hi), **affine)
    if name == "sharpness":
        return Sharpness((1 + lo, 1 + hi))
    jitter = {"brightness": (1, 1), "contrast": (1, 1), "saturation": (1, 1), "hue": (0, 0)}
    jitter["saturation" if name == "color" else name] = (1 + lo, 1 + hi)
    return A.ColorJitter(**jitter, p=1.0)


def _free_op(name: str) -> A.BasicTransform:
    return {"identity": lambda: A.NoOp(p=1.0), "autocontrast": lambda: A.AutoContrast(p=1.0),
            "equalize": lambda: A.Equalize(p=1.0)}[name]()


def trivial_augment_ops() -> A.OneOf:
    """TrivialAugmentWide: per image one op, drawn uniformly, at a magnitude drawn uniformly from its whole
    (wide) range with a random sign. Built from albumentations ops, so it is seeded with the rest of the pipeline."""
    ops: list[A.BasicTransform] = [_free_op(n) for n in _FREE_OPS]
    for name, (wide, _) in _OP_MAX.items():
        if name == "posterize":
            ops.append(A.Posterize(num_bits=(8 - wide, 8), p=1.0))
        elif name == "solarize":
            ops.append(A.Solarize(threshold_range=(0.0, 1.0), p=1.0))
        else:
            ops.append(_signed_op(name, -wide, wide))
    return A.OneOf(ops, p=1.0)


def randaugment_ops(n: int, m: float) -> A.SomeOf:
    """RandAugment: per image `n` ops drawn uniformly with replacement (as torchvision), each at the fixed
    magnitude `m` of 0..30 (torchvision's scale; timm's m9 of 0..10 is about our 27) with a random sign."""
    level = m / RANDAUGMENT_LEVELS
    ops: list[A.BasicTransform] = [_free_op(n_) for n_ in _FREE_OPS]
    for name, (_, ra) in _OP_MAX.items():
        v = level * ra
        if name == "posterize":
            bits = 8 - int(round(v))
            ops.append(A.Posterize(num_bits=(bits, bits), p=1.0))
        elif name == "solarize":
            ops.append(A.Solarize(threshold_range=(1.0 - v, 1.0 - v), p=1.0))
        else:
            ops.append(A.OneOf([_signed_op(name, v, v), _signed_op(name, -v, -v)], p=1.0))
    return A.SomeOf(ops, n=n, replace=True, p=1.0)


def crop_decode_size(size: int, scale: tuple[float, float], ratio: tuple[float, float] = RRC_RATIO) -> int:
    """The shorter side a decoded image needs so that a random-resized crop of `size` never upsamples: a crop
    of area share s and aspect r has both sides >= sqrt(s * min(r, 1/r)) times the image's shorter side."""
    shortest = math.sqrt(scale[0] * min(min(ratio), 1 / max(ratio)))
    return math.ceil(size / shortest)


def build_transforms(dc: DataConfig, train: bool = False, aug: Augmentation = Augmentation()) -> A.Compose:
    """uint8 HxWx3 RGB -> normalized CHW float tensor: the training pipeline of `aug` (train=True), else the
    evaluation pipeline of `dc` (which `aug.policy == "none"` also uses for training).

    Training order (torchvision's and timm's): crop, flips, colour jitter, the TrivialAugment/RandAugment op(s),
    random erasing, normalization. The result carries `decode_min_size`: the shorter side its first step needs of
    the decoded image (for a random-resized crop, enough that the smallest crop is not upsampled; see
    `crop_decode_size`), so that ImageDataset can decode large JPEGs at a reduced size without changing what the
    pipeline sees."""
    interp = CV2_INTERPOLATION[dc.interpolation]
    size = dc.img_size
    steps: list[Any]
    policy = aug.policy if train else "none"
    h, w = _hw(dc.resize_size)
    if policy in ("paper", "paper_rrc"):
        crop = (A.RandomCrop(size, size) if policy == "paper" else
                A.RandomResizedCrop(size=(size, size), scale=aug.crop_scale(), ratio=RRC_RATIO, interpolation=interp,
                                    area_for_downscale="image"))
        steps = [A.Resize(h, w, interpolation=interp, area_for_downscale="image"),
                 A.Rotate(limit=aug.rotation, interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT,
                          fill=0, p=1.0)]
        steps += [A.CenterCrop(aug.center_crop, aug.center_crop)] if aug.center_crop else []
        steps.append(crop)
        need: Optional[int] = min(h, w)
    elif policy in ("light", "modern", "trivial", "randaugment"):
        steps = [A.RandomResizedCrop(size=(size, size), scale=aug.crop_scale(), ratio=RRC_RATIO, interpolation=interp,
                                     area_for_downscale="image")]
        need = crop_decode_size(size, aug.crop_scale())
    elif dc.eval_resize == "center_crop" and h != w:      # a non-square resize (the SVHN script), then the crop
        steps = [A.Resize(h, w, interpolation=interp, area_for_downscale="image"), A.CenterCrop(size, size)]
        need = min(h, w)
    elif dc.eval_resize == "center_crop":
        steps = [A.SmallestMaxSize(max_size=h, interpolation=interp, area_for_downscale="image"),
                 A.CenterCrop(size, size)]
        need = h
    else:
        steps = [A.Resize(size, size, interpolation=interp, area_for_downscale="image")]
        need = size
    if policy != "none":
        if aug.flip_p() > 0:
            steps.append(A.HorizontalFlip(p=aug.flip_p()))
        if aug.vflip > 0:
            steps.append(A.VerticalFlip(p=aug.vflip))
        if aug.color_jitter > 0:           # timm's --color-jitter S: brightness, contrast, saturation by 1 +- S
            s = aug.color_jitter
            steps.append(A.ColorJitter(brightness=(1 - s, 1 + s), contrast=(1 - s, 1 + s),
                                       saturation=(1 - s, 1 + s), hue=(0, 0), p=1.0))
        if policy == "trivial":
            steps.append(trivial_augment_ops())
        elif policy == "randaugment":
            steps.append(randaugment_ops(aug.randaugment_n, aug.randaugment_m))
        if aug.random_erase > 0:           # timm's --reprob with its 'pixel' mode: a box of random pixels
            steps.append(A.Erasing(scale=(0.02, 1 / 3), ratio=(0.3, 3.3), fill="random", p=aug.random_erase))
    steps.append(NormalizeToTensor(dc.mean, dc.std))
    compose = A.Compose(steps)
    compose.decode_min_size = need
    return compose


def transform_signature(transform: A.Compose) -> str:
    """A short stable hash of a pipeline (albumentations' own serialization, including its version, and the
    decode size), so a feature cache is reused only with identical preprocessing."""
    spec = json.dumps({"pipeline": A.to_dict(transform), "decode_min_size": transform.decode_min_size},
                      sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:16]
