"""`spinal-transfer predict`: top-k classes of image files and folders, from a bundle, its ONNX file or a run.

Inputs get the evaluation preprocessing stored with the model (export.eval_transform, which is
build_transforms(train=False)), so a prediction here is what evaluation would have computed. A file
that cannot be decoded is skipped, not fatal: it is reported on stderr and in `<out>.skipped.txt`
(tab-separated path and reason, like a run's skipped_files.txt; always written, empty when nothing
was skipped, so an old list never outlives its CSV).
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from .checkpoint import atomic_write_text, load_run_checkpoint, model_from_checkpoint
from .config import CONFIG_FIELDS
from .errors import DataError
from .evaluation import TTA, tta_probs
from .export import CONFIG_FILE, Runner, bundle_config, eval_transform, load, onnx_runner, read_config
from .runtime import use_channels_last

PathLike = Union[str, os.PathLike]
TOPK = 5


@dataclass
class Predictions:
    paths: list[str]                    # the images that were read, in input order
    probs: torch.Tensor                 # (len(paths), num_classes) softmax, float64
    classes: list[str]
    skipped: list[tuple[str, str]]      # (path, reason) of files that could not be read
    tta: Optional[dict] = None          # the test-time augmentation used (TTA.to_dict()), None without

    def top(self, k: int) -> list[list[tuple[str, float]]]:
        """Per image, the k most probable (class, probability), most probable first."""
        values, index = self.probs.topk(min(k, len(self.classes)), dim=1)
        return [[(self.classes[i], p) for i, p in zip(row_i, row_v)]
                for row_i, row_v in zip(index.tolist(), values.tolist())]


def open_model(source: PathLike, device: torch.device) -> tuple[dict, Runner]:
    """(bundle config, batch -> logits) of a bundle folder (or its model.safetensors), an .onnx file next
    to its config.json, a RUN folder (its best.pt) or a checkpoint file."""
    path = Path(source)
    if path.suffix == ".onnx":
        return read_config(path), onnx_runner(path, device.type)
    if (path / CONFIG_FILE).is_file() or path.suffix == ".safetensors":
        config, model = read_config(path), load(path)
    else:
        ckpt = load_run_checkpoint(path)          # weights_only: a crafted pickle is refused here
        config, model = bundle_config(ckpt), model_from_checkpoint(ckpt)[0]
    model.to(device)
    memory_format = torch.channels_last if use_channels_last(None, device) else torch.contiguous_format
    model.to(memory_format=memory_format)

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device, non_blocking=True).contiguous(memory_format=memory_format)).float().cpu()

    return config, run


def predict(source: PathLike, paths: Sequence[PathLike], batch_size: Optional[int] = None,
            workers: Optional[int] = None, device: str = "auto", tta: Optional[TTA] = None) -> Predictions:
    """Class probabilities of every image in `paths` (files, or folders searched recursively);
    batch size and workers default to training's. With `tta`, the mean softmax over its views of each
    preprocessed image (evaluation.TTA; works with every model kind, ONNX included)."""
    from torch.utils.data import SequentialSampler

    from .loaders import make_loader
    from .rundir import SkipLog
    from .runtime import configure_process, pick_device
    from .splits import list_images

    files = list_images(list(paths))
    if not files:
        raise DataError(f"no images found in {', '.join(map(str, paths))}")
    dev = pick_device(device)
    configure_process(dev)
    config, run = open_model(source, dev)
    loader = make_loader([(f, -1) for f in files], eval_transform(config),
                         batch_size or CONFIG_FIELDS["batch_size"].default, workers, dev,
                         SequentialSampler(range(len(files))))
    probs, index, skips = [], [], SkipLog()
    with tqdm(total=len(files), desc="predict", unit="img") as bar:
        for x, _, idx in skips.watch(loader):
            if len(x):
                probs.append(tta_probs(run, x, tta, torch.float64))
                index.append(idx)
            bar.n = len(skips) + sum(len(i) for i in index)
            bar.refresh()
    order = torch.cat(index).tolist() if index else []
    num_classes = len(config["classes"])
    return Predictions([files[i] for i in order], torch.cat(probs) if probs else torch.zeros(0, num_classes),
                       config["classes"], list(skips.entries.items()), tta.to_dict() if tta is not None else None)


def write_csv(preds: Predictions, out: PathLike, topk: int = TOPK) -> Path:
    """`out`: path, label_1, prob_1, ..., label_k, prob_k per image; `<out>.skipped.txt`: the skipped
    files. Returns the skip list's path."""
    k = min(topk, len(preds.classes))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path"] + [f"{col}_{j}" for j in range(1, k + 1) for col in ("label", "prob")])
    for path, top in zip(preds.paths, preds.top(k)):
        writer.writerow([path] + [v for label, p in top for v in (label, f"{p:.6f}")])
    atomic_write_text(out, buf.getvalue())
    skipped_path = Path(f"{out}.skipped.txt")
    atomic_write_text(skipped_path, "".join(f"{p}\t{' '.join(r.split())}\n" for p, r in preds.skipped))
    return skipped_path
