"""Running a model over a split: logits in sample order on every rank, per-image predictions, `evaluate`.

Every batch carries the sample indices of its images, so outputs map back to their exact files: under
torchrun each rank evaluates its shard and the gathered outputs are sorted by index (each image once), and a
file that fails to decode simply has no row.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .distributed import gather_objects, is_main

@dataclass
class Outputs:
    """What a model said about a split: logits (N, C), targets (N,), and each row's index in the sample list."""

    logits: torch.Tensor
    targets: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Iterable, device: torch.device, dtype: Optional[torch.dtype] = None,
                   channels_last: bool = False, desc: str = "eval", total: Optional[int] = None) -> Outputs:
    """Logits of every `(images, labels, indices)` batch, gathered over ranks in sample order (a collective
    under torchrun: every rank calls it, each with its shard)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module      # per-rank evaluation: no collective inside forward (shards differ in length)
    model.eval()
    logits, targets, index = [], [], []
    for x, y, idx in tqdm(batches, desc=desc, leave=False, disable=not is_main(), total=total):
        if len(x) == 0:
            continue
        x = x.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            out = model(x)
        logits.append(out.float().cpu())
        targets.append(y)
        index.append(idx)
    mine = Outputs(torch.cat(logits) if logits else torch.zeros(0, 0),
                   torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long),
                   torch.cat(index) if index else torch.zeros(0, dtype=torch.long))
    parts = [p for p in gather_objects(mine) if len(p)]
    if not parts:
        return mine
    out = Outputs(*(torch.cat([getattr(p, k) for p in parts]) for k in ("logits", "targets", "index")))
    order = out.index.argsort()
    return Outputs(out.logits[order], out.targets[order], out.index[order])


def write_predictions(path: Path, samples: Sequence[tuple[str, int]], out: Outputs, classes: Sequence[str]) -> None:
    """The per-image predictions CSV (interpret.py's format): each row with its image's exact path."""
    from .interpret import write_predictions_csv

    write_predictions_csv(path, [samples[i][0] for i in out.index.tolist()], out.logits, out.targets, classes)


# --- `evaluate`: a trained run or checkpoint on one split -----------------------------------------

@dataclass
class Evaluation:
    metrics: dict
    outputs: Outputs
    samples: list
    classes: list[str]
    source: str             # which images were used, in words


def evaluate(source: str | Path, data: Optional[str | Path] = None, split: str = "test", device: str = "auto",
             batch_size: Optional[int] = None, workers: Optional[int] = None) -> Evaluation:
    """Metrics of a run's best checkpoint (or any checkpoint file) on one split.

    Without `data` (or with the run's own data folder) the run's recorded split is used, so the numbers match
    report.json exactly. Another folder is read as it is: its split folder when it has split folders, all its
    images when it is a flat class-folder tree; a split is never carved out of another folder's images."""
    from .checkpoint import load_run_checkpoint, model_from_checkpoint
    from .loaders import ShardSampler, make_loader
    from .rundir import SkipLog
    from .runtime import amp_dtype, configure_process, pick_device, use_channels_last
    from .transforms import build_transforms

    ckpt = load_run_checkpoint(source)
    model, cfg, dc, classes = model_from_checkpoint(ckpt)
    samples, used = _eval_samples(Path(source), cfg, data, split, classes)
    dev = pick_device(device)
    configure_process(dev)
    channels_last = use_channels_last(cfg.channels_last, dev)
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    loader = make_loader(samples, build_transforms(dc, train=False), batch_size or cfg.batch_size,
                         workers if workers is not None else cfg.workers, dev, ShardSampler(len(samples)))
    skips = SkipLog()
    out = predict_logits(model, skips.watch(loader), dev, amp_dtype(cfg.amp, dev), channels_last, desc=split)
    from .metrics import classification_metrics

    m = classification_metrics(out.logits, out.targets, classes)
    m["num_skipped_files"] = len(skips)
    m["skipped_files"] = [[p, r] for p, r in skips.entries.items()]
    return Evaluation(m, out, samples, classes, used)


def _eval_samples(source: Path, cfg, data: Optional[str | Path], split: str, classes: list[str]) -> tuple[list, str]:
    """The samples `evaluate` reads, and a sentence saying which they are."""
    from .errors import DataError
    from .rundir import RunDir
    from .splits import load_recorded, scan

    run = RunDir(source if source.is_dir() else source.parent.parent)
    own = data is None or Path(data).expanduser().resolve() == Path(cfg.data).resolve()
    if own and run.splits.is_file():
        splits = load_recorded(run.read_json(run.splits), data or cfg.data)
        return splits.get(split), f"the run's recorded {split} split ({len(splits.get(split))} images, {run.splits})"
    if own:           # a checkpoint away from its run folder: the split is made again the way the run made it
        splits = scan(cfg.data, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
        return splits.get(split), (f"the {split} split of {cfg.data} made again from the run's settings (no "
                                   f"splits.json beside the checkpoint): {len(splits.get(split))} images")
    folder = data
    splits = scan(folder, carve=False)
    if splits.classes != classes:
        raise DataError(f"{folder} has classes {splits.classes[:10]}{'...' if len(splits.classes) > 10 else ''}; the "
                        f"model was trained on {classes[:10]}{'...' if len(classes) > 10 else ''}")
    flat = splits.source["train"]["path"] == splits.root
    if flat:
        return splits.train, f"all {len(splits.train)} images of {folder} (it has no split folders)"
    if not splits.get(split):
        have = ", ".join(k + "/" for k in ("train", "val", "test") if k in splits.source)
        raise DataError(f"{folder} has no {split}/ folder (it has {have}); choose --split among those")
    return splits.get(split), f"{split}/ of {folder} ({len(splits.get(split))} images)"
