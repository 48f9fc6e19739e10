"""Cached-feature mode: run the frozen backbone once, store what reaches the head, train the head on it.

The cache is a memory-mapped .npy per split in RUN/features/, named by a fingerprint of everything
that determines the features (backbone, weights and their file contents, head placement,
preprocessing, file list, precision). A change to any of them gives a new name, so a stale cache is
never read.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler
from tqdm.auto import tqdm

from .checkpoint import atomic_write_text
from .config import TrainConfig
from .surgery import get_head
from .transforms import DataConfig, transform_signature
from .utils import use_channels_last, world_size


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(cfg: TrainConfig, dc: DataConfig, model: nn.Module, samples: Sequence[tuple[str, int]],
                dtype: Optional[torch.dtype], channels_last: bool = False) -> str:
    weights = cfg.weights
    if weights and Path(weights).is_file():
        weights = f"file:{_file_digest(Path(weights))}"
    files = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p, _ in samples]
    info = model.spinal_info
    key = {"backbone": cfg.backbone, "weights": weights, "head_path": info.head_modules[0],
           "replace": info.replace, "feature_width": info.feature_width,
           "preprocessing": transform_signature(cfg, dc, train=False), "files": files,
           "dtype": str(dtype), "channels_last": channels_last, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


@torch.no_grad()
def compute_features(model: nn.Module, loader: DataLoader, device: torch.device, dtype: Optional[torch.dtype],
                     channels_last: bool = False) -> tuple[np.ndarray, list[int], list]:
    """Head inputs of every sample (eval mode), the indices that loaded, and the skipped files."""
    head = get_head(model)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda m, inp: captured.append(inp[0].flatten(1).float().cpu()))
    model.eval()
    kept, skipped, start = [], [], 0
    try:
        for x, _, bad in tqdm(loader, desc="features", leave=False):
            skipped += bad
            n = len(x) + len(bad)
            bad_set = {p for p, _ in bad}
            kept += [i for i in range(start, start + n) if loader.dataset.samples[i][0] not in bad_set]
            start += n
            if len(x):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    x = x.to(device)
                    model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    finally:
        hook.remove()
    feats = torch.cat(captured).numpy() if captured else np.zeros((0, model.spinal_info.feature_width), np.float32)
    return feats, kept, skipped


class FeatureDataset(Dataset):
    """Rows of a (memory-mapped) feature matrix with their labels; fetched a batch at a time."""

    def __init__(self, features: np.ndarray, labels: Sequence[int]):
        self.features, self.labels = features, torch.as_tensor(list(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices)
        return torch.from_numpy(np.ascontiguousarray(self.features[idx])), self.labels[idx]

    def __getitem__(self, i: int):
        return self.__getitems__([i])


def _collate(batch: Any) -> tuple[torch.Tensor, torch.Tensor, list]:
    x, y = batch
    return x, y, []


def cached_split(model: nn.Module, split: str, samples: list, transform: Any, cfg: TrainConfig, dc: DataConfig,
                 run_dir: Path, device: torch.device, dtype: Optional[torch.dtype],
                 make_loader: Any) -> tuple[FeatureDataset, list, list]:
    """(features, the samples they belong to, skipped files) of one split; computed and stored
    first when the cache is missing or stale."""
    channels_last = use_channels_last(cfg.channels_last, device)      # the format the uncached run uses
    fp = fingerprint(cfg, dc, model, samples, dtype, channels_last)
    folder = run_dir / "features"
    path, meta_path = folder / f"{split}-{fp}.npy", folder / f"{split}-{fp}.json"
    skipped: list = []
    if not (path.exists() and meta_path.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{split}-*"):
            stale.unlink()
        loader = make_loader(samples, transform, cfg, False, device, SequentialSampler(samples))
        feats, kept, skipped = compute_features(model, loader, device, dtype, channels_last)
        tmp = folder / f".{split}-{fp}.tmp.npy"
        np.save(tmp, feats)
        os.replace(tmp, path)
        atomic_write_text(meta_path, json.dumps({"kept": kept, "skipped": skipped, "fingerprint": fp}))
    meta = json.loads(meta_path.read_text())
    feats = np.load(path, mmap_mode="r")
    kept = [samples[i] for i in meta["kept"]]
    return FeatureDataset(feats, [label for _, label in kept]), kept, [tuple(s) for s in meta["skipped"]]


def feature_loader(ds: FeatureDataset, cfg: TrainConfig, sampler: Any, train: bool) -> DataLoader:
    return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=0, collate_fn=_collate,
                      drop_last=train and len(ds) >= 2 * cfg.batch_size * world_size())
