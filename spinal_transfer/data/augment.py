"""The training augmentation as a policy: its name and knobs, checked, with no image library imported.

`config` validates a run's augmentation through `Augmentation` before anything heavy is imported (the
command line's `--help` and argument checks stay fast); `transforms.build_transforms` turns it into an
albumentations pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..errors import ConfigError

#: Training policies. `none` is the evaluation pipeline; `paper`/`paper_rrc` are the SpinalNet scripts'.
POLICIES = ("none", "light", "modern", "trivial", "randaugment", "paper", "paper_rrc")
#: The random-resized-crop scale each cropping policy uses unless told otherwise. `modern` and `randaugment` (the
#: default policy) keep timm's and torchvision's ImageNet-training range, down to 8% of the area: fine-tuning the
#: real ImageNet EfficientNet-Lite0, it beat 35-100% on three of bench_defaults' four folders and on their mean
#: (0.942 against 0.927 over 5 seeds; fewshot12 +5.0 points; benchmarks/RESULTS.md, "defaults"). `light` and
#: `trivial` start at 35%, the lower end of fastai's fine-tuning examples (min_scale 0.3-0.75): the crop's sides
#: stay at least sqrt(0.35 * 3/4) = 51% of the image's. Those two were not re-measured on real weights.
DEFAULT_CROP_SCALE = {"light": (0.35, 1.0), "modern": (0.08, 1.0), "trivial": (0.35, 1.0),
                      "randaugment": (0.08, 1.0), "paper_rrc": (0.08, 1.0)}
#: Horizontal flip probability each policy uses unless told otherwise (`none` never flips).
DEFAULT_HFLIP = {p: (0.0 if p == "none" else 0.5) for p in POLICIES}
RRC_RATIO = (3 / 4, 4 / 3)
RANDAUGMENT_LEVELS = 30          # torchvision's scale: magnitude M of 0..30 (num_magnitude_bins=31)
DEFAULT_ERASE = {"randaugment": 0.25}   # a policy's random-erasing probability when none is given (timm's recipe)


def erase_probability(policy: str, asked: Optional[float]) -> float:
    """The random-erasing probability in force: the one asked for, else the policy's (DEFAULT_ERASE)."""
    return DEFAULT_ERASE.get(policy, 0.0) if asked is None else float(asked)


def values_in_force(cfg: Any) -> dict:
    """The random-erasing probability and crop scale a TrainConfig trains with, written in (a saved config that
    leaves them unset predates a change of the policy's default: config.UNSET_BEFORE reads it as the old one)."""
    aug = Augmentation.from_config(cfg)
    return {"random_erase": aug.random_erase,
            "rrc_scale": list(aug.crop_scale()) if cfg.applies("rrc_scale") else cfg.rrc_scale}


@dataclass(frozen=True)
class Augmentation:
    """The training-time augmentation, explicit: the policy and its knobs (README, "Augmentation").

    `hflip` and `rrc_scale` left as None take the policy's own (DEFAULT_HFLIP, DEFAULT_CROP_SCALE); an explicit
    `hflip=0` turns flipping off under every policy. `random_erase` (probability) and `color_jitter` (strength)
    add to any policy but `none`, which is the evaluation pipeline and takes no knob."""

    policy: str = "none"
    hflip: Optional[float] = None
    vflip: float = 0.0
    rrc_scale: Optional[tuple] = None
    rotation: float = 15.0
    center_crop: Optional[int] = None     # paper policy: a center crop between the rotation and the random crop
    randaugment_n: int = 2
    randaugment_m: float = 9.0
    random_erase: float = 0.0
    color_jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"augment: {self.policy!r} is not one of {list(POLICIES)}", key="augment")
        for name, lo, hi in (("hflip", 0, 1), ("vflip", 0, 1), ("random_erase", 0, 1), ("color_jitter", 0, 1),
                             ("randaugment_m", 0, RANDAUGMENT_LEVELS)):
            v = getattr(self, name)
            if v is not None and not lo <= v <= hi:
                raise ConfigError(f"{name}: {v!r} is out of range (expected {lo} to {hi})", key=name)
        if self.randaugment_n < 1:
            raise ConfigError(f"randaugment_n: {self.randaugment_n!r} must be >= 1", key="randaugment_n")
        if self.rrc_scale is not None and not 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1:
            raise ConfigError(f"rrc_scale: {list(self.rrc_scale)} must be 0 < low <= high <= 1", key="rrc_scale")
        if self.policy == "none" and (self.random_erase or self.color_jitter):
            knob = "random_erase" if self.random_erase else "color_jitter"
            raise ConfigError(f"{knob} needs an augmentation policy: --augment none is the evaluation pipeline "
                              f"(choose light, modern, trivial or randaugment)", key=knob)

    @classmethod
    def from_config(cls, cfg: Any) -> "Augmentation":
        """The training augmentation a TrainConfig asks for (train, show-batch and lr-find all build it here)."""
        return cls(policy=cfg.augment, hflip=cfg.hflip, vflip=cfg.vflip,
                   rrc_scale=tuple(cfg.rrc_scale) if cfg.rrc_scale else None, rotation=cfg.rotation,
                   center_crop=cfg.train_center_crop, randaugment_n=cfg.randaugment_n,
                   randaugment_m=cfg.randaugment_m, color_jitter=cfg.color_jitter,
                   random_erase=erase_probability(cfg.augment, cfg.random_erase))

    def flip_p(self) -> float:
        """The horizontal flip probability in force: the explicit one, else the policy's."""
        return DEFAULT_HFLIP[self.policy] if self.hflip is None else float(self.hflip)

    def crop_scale(self) -> tuple[float, float]:
        """The random-resized-crop scale range in force: the explicit one, else the policy's."""
        scale = self.rrc_scale if self.rrc_scale is not None else DEFAULT_CROP_SCALE.get(self.policy, (0.08, 1.0))
        return (float(scale[0]), float(scale[1]))
