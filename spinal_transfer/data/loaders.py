"""Batches from file lists: the dataset, its samplers and the DataLoader, and class balance.

Augmentation randomness is a function of (seed, epoch, image): the training sampler hands each index with
its own seed, and the dataset reseeds the transform from it. So an image is augmented the same way whatever
the worker, the number of workers or processes, and wherever a run was resumed, with no worker state to
carry (persistent workers stay valid across epochs).

A batch is `(images, labels, indices, bad)`: `indices` are positions in the sample list (so every output maps
back to its exact file), `bad` the (path, reason) of files that failed to decode, which `SkipLog.watch`
takes out before any loop sees the batch.
"""
from __future__ import annotations

import math
import os
import random
import signal
import threading
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ..utils.preemption import SIGNALS
from .images import BadImage, load_image

Sample = tuple[str, int]


class BadSample(NamedTuple):
    """Returned by ImageDataset in place of (tensor, label, index), so the batch, not the epoch, absorbs it."""

    path: str
    reason: str
    index: int


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one image in one epoch (any fixed mixing of the three will do)."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729 + 17) % 2**32


class ImageDataset(Dataset):
    """(path, label) list -> (CHW float tensor, label, index) via an albumentations pipeline ending in a tensor.
    A key may be an index or (index, seed): with a seed the transform is reseeded first. An undecodable file
    yields a BadSample. Large JPEGs are decoded no larger than the transform's `decode_min_size`."""

    def __init__(self, samples: Sequence[Sample], transform: Any) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.min_size: Optional[int] = getattr(transform, "decode_min_size", None)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Union[int, tuple[int, int]]):
        i, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[i]
        try:
            image = load_image(path, self.min_size)
        except BadImage as e:
            return BadSample(path, str(e), i)
        if seed is not None:      # one generator for every step of the pipeline: cheaper than set_random_seed
            self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return self.transform(image=image)["image"], label, i


def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """(images, labels, indices, bad): BadSamples moved to `bad` as (path, reason), so they travel back from
    worker processes. With no good sample, images is an empty (0,) float tensor."""
    bad = [(b.path, b.reason) for b in batch if isinstance(b, BadSample)]
    good = [b for b in batch if not isinstance(b, BadSample)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), bad
    images, labels, index = default_collate(good)
    return images, labels, index, bad


class EpochSampler(Sampler):
    """Training order of epoch e, a function of (seed, e) only, so a resumed run sees the same batches:
    a shuffle, or with `weights` a draw with replacement (class balance). Yields (index, augmentation seed).
    Under torchrun rank r takes positions r, r+W, ... (padded so every rank gets as many), so step k on W
    processes with batch B uses the images of step k of one process with batch W*B. `start` skips this
    rank's first positions (a run resumed in the middle of an epoch)."""

    def __init__(self, n: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 weights: Optional[torch.Tensor] = None):
        self.n, self.seed, self.num_replicas, self.rank, self.weights = n, seed, num_replicas, rank, weights
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(n / num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()
        else:
            order = torch.randperm(self.n, generator=g).tolist()
        return order + order[: self.per_rank * self.num_replicas - self.n]     # pad so ranks stay in step

    def __iter__(self):
        mine = self.order()[self.rank::self.num_replicas][self.start:]
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in mine])

    def __len__(self) -> int:
        return self.per_rank - self.start


class ShardSampler(Sampler[int]):
    """Evaluation under torchrun: rank r takes indices r, r+W, ...; no padding, so every sample is counted
    exactly once when the shards are gathered (by index)."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, n, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A DataLoader worker leaves the stop signals to the main process, which finishes the step and writes last.pt.
    Slurm signals every process of a job step, `timeout` and a terminal the whole process group, so the workers get
    the SIGTERM too; PyTorch's worker handler dies of a SIGTERM that its parent did not send, and the main process
    then raised "DataLoader worker ... is killed by signal: Terminated" mid-step instead of checkpointing. The
    worker blocks them and a thread takes them: a SIGTERM from its parent (shutdown, multiprocessing's terminate at
    exit) still ends it at once, as PyTorch's handler does; any other is dropped. Ignoring them (SIG_IGN) made the
    parent's terminate at exit wait forever. A worker whose parent is gone ends by PyTorch's watchdog."""
    stops = set(SIGNALS.values())
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)          # threads started later in the worker inherit it
    threading.Thread(target=_end_on_the_parents_sigterm, args=(stops,), daemon=True, name="stop-signals").start()


def _end_on_the_parents_sigterm(stops: set) -> None:
    while True:
        got = signal.sigwaitinfo(stops)
        if got.si_signo == signal.SIGTERM and got.si_pid == os.getppid():
            os._exit(0)


def default_workers(workers: Optional[int]) -> int:
    return workers if workers is not None else min(8, os.cpu_count() or 1)


def make_loader(samples: Sequence[Sample], transform: Any, batch_size: int, workers: Optional[int],
                device: torch.device, sampler: Sampler, drop_last: bool = False,
                dataset_class: type = None) -> DataLoader:
    """A DataLoader over image files: decoding in `workers` processes (persistent), pinned memory on CUDA.
    `dataset_class` (default ImageDataset) takes (samples, transform) and yields what ImageDataset does."""
    n_workers = default_workers(workers)
    # A generator of its own: starting an iteration draws a seed from it, which must not move the global RNG
    # (dropout's), or a run resumed inside an epoch would draw other dropout masks than an uninterrupted one.
    return DataLoader((dataset_class or ImageDataset)(samples, transform), batch_size=batch_size, sampler=sampler,
                      num_workers=n_workers, collate_fn=collate, pin_memory=device.type == "cuda",
                      drop_last=drop_last, persistent_workers=n_workers > 0,
                      prefetch_factor=4 if n_workers > 0 else None, generator=torch.Generator().manual_seed(0),
                      worker_init_fn=leave_stop_signals_to_the_main_process if n_workers > 0 else None)


def train_drop_last(n: int, batch_size: int, world: int) -> bool:
    """Drop a last partial training batch when there are at least two full ones: BatchNorm in a head cannot
    train on a batch of one."""
    return n >= 2 * batch_size * world


def class_counts(samples: Sequence[Sample], num_classes: int) -> np.ndarray:
    return np.bincount(np.array([y for _, y in samples], dtype=np.int64), minlength=num_classes)


def balanced_sample_weights(samples: Sequence[Sample], num_classes: int) -> torch.Tensor:
    """Per-sample weight 1/count(class) for drawing every class equally often."""
    labels = np.array([y for _, y in samples], dtype=np.int64)
    return torch.from_numpy(1.0 / np.bincount(labels, minlength=num_classes)[labels])


def class_weights(samples: Sequence[Sample], num_classes: int) -> torch.Tensor:
    """sklearn's 'balanced' loss weights n / (k * count); a class absent from `samples` gets 1.0
    (it never is a target, and 1.0 leaves label-smoothing terms unscaled)."""
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([y for _, y in samples], dtype=np.int64)
    present = np.unique(labels)
    w = np.ones(num_classes)
    w[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.tensor(w, dtype=torch.float32)
