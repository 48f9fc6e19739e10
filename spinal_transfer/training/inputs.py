"""What a run reads, built one way for `train`, `lr-find` and `show-batch` (and `compare` and `tune`, which
call train): the splits of the config's data folder under its protocol, the input pipeline's settings, the
training and evaluation transforms, and the loaders over them.

Why one builder: each command used to build these itself, and only `train` applied the protocol, so under
`--protocol paper` the others could see other training images than the run. `evaluate` sits below training;
it reads a run's recorded splits.json, or without one the same `data.splits.config_splits`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import TrainConfig
from ..data.augment import Augmentation
from ..data.loaders import EpochSampler, ShardSampler, balanced_sample_weights, make_loader, train_drop_last
from ..data.splits import Sample, Splits, config_splits
from ..data.transforms import DataConfig, build_transforms
from ..models.preprocess import resolve_data_config
from ..models.surgery import check_input_size
from ..utils.distributed import rank, world_size


def data_config(cfg: TrainConfig, model: Optional[nn.Module] = None) -> DataConfig:
    """The input size, resize and normalization of `cfg` on its backbone (the built `model`'s pretrained config,
    else the registry's: nothing is built or downloaded); ConfigError for a resize the crop does not fit."""
    return resolve_data_config(cfg.backbone, cfg.weights, model, img_size=cfg.img_size, resize_size=cfg.resize_size,
                               mean=cfg.mean, std=cfg.std, interpolation=cfg.interpolation, eval_resize=cfg.eval_resize)


@dataclass(frozen=True)
class RunInputs:
    """A run's splits, input settings (size, resize, normalization) and transforms."""

    splits: Splits
    data_config: DataConfig
    train_transform: Any
    eval_transform: Any

    @classmethod
    def from_config(cls, cfg: TrainConfig, model: Optional[nn.Module] = None,
                    splits: Optional[Splits] = None) -> "RunInputs":
        """`splits`: the run's recorded ones (a resumed run's splits.json); else `config_splits(cfg)`, protocol
        applied. `model`: the built model, whose pretrained config gives the input size and normalization;
        without one, the backbone's registry metadata does (offline: nothing is built or downloaded)."""
        splits = splits if splits is not None else config_splits(cfg)
        dc = data_config(cfg, model)
        if model is not None:
            check_input_size(model, dc.img_size)
        plain = build_transforms(dc, train=False)
        # cached features are of each image once, unaugmented: what training sees, and what show-batch shows
        return cls(splits, dc, plain if cfg.cache_features else
                   build_transforms(dc, train=True, aug=Augmentation.from_config(cfg)), plain)

    @property
    def classes(self) -> list[str]:
        return self.splits.classes

    def loaders(self, cfg: TrainConfig, device: torch.device, sampler: EpochSampler) -> dict[str, DataLoader]:
        """Image loaders per split: train in `sampler`'s order through the training transform, val and test each
        rank's shard through the evaluation transform."""
        train = self.splits.train
        out = {"train": make_loader(train, self.train_transform, cfg.batch_size, cfg.workers, device, sampler,
                                    train_drop_last(len(train), cfg.batch_size, world_size()))}
        for n in ("val", "test"):
            samples = self.splits.get(n)
            out[n] = make_loader(samples, self.eval_transform, cfg.batch_size, cfg.workers, device,
                                 ShardSampler(len(samples), world_size(), rank()))
        return out


def train_sampler(cfg: TrainConfig, samples: list[Sample], num_classes: int) -> EpochSampler:
    """The training order of every epoch: seeded, this rank's shard, class-balanced with --class-balance sampler."""
    weights = balanced_sample_weights(samples, num_classes) if cfg.class_balance == "sampler" else None
    return EpochSampler(len(samples), cfg.seed, world_size(), rank(), weights)
