"""`spinal-transfer predict`: top-k classes of image files and folders, from a bundle, its ONNX file or a run.

Inputs get the evaluation preprocessing stored with the model (export.eval_transform, which is
build_transforms(train=False)), so a prediction here is what evaluation would have computed. A file
that cannot be decoded is skipped, not fatal: it is reported on stderr and in `<out>.skipped.txt`
(tab-separated path and reason, like a run's skipped_files.txt; always written, empty when nothing
was skipped, so an old list never outlives its CSV).
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from .checkpoint import atomic_write_text
from .config import TrainConfig
from .export import CONFIG_FILE, Runner, bundle_config, eval_transform, load, onnx_runner, read_config
from .utils import use_channels_last

PathLike = Union[str, os.PathLike]
TOPK = 5


@dataclass
class Predictions:
    paths: list[str]                    # the images that were read, in input order
    probs: torch.Tensor                 # (len(paths), num_classes) softmax, float64
    classes: list[str]
    skipped: list[tuple[str, str]]      # (path, reason) of files that could not be read

    def top(self, k: int) -> list[list[tuple[str, float]]]:
        """Per image, the k most probable (class, probability), most probable first."""
        values, index = self.probs.topk(min(k, len(self.classes)), dim=1)
        return [[(self.classes[i], p) for i, p in zip(row_i, row_v)]
                for row_i, row_v in zip(index.tolist(), values.tolist())]


def open_model(source: PathLike, device: torch.device) -> tuple[dict, Runner]:
    """(bundle config, batch -> logits) of a bundle folder (or its model.safetensors), an .onnx file next
    to its config.json, a RUN folder (its best.pt) or a checkpoint file."""
    from .train import load_run_checkpoint, model_from_checkpoint

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
            workers: Optional[int] = None, device: str = "auto") -> Predictions:
    """Class probabilities of every image in `paths` (files, or folders searched recursively);
    batch size and workers default to TrainConfig's."""
    from .data import list_images
    from .train import make_loader
    from .utils import pick_device, tune_cpu_allocator

    files = list_images(list(paths))
    if not files:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, paths))}")
    dev = pick_device(device)
    tune_cpu_allocator(dev)
    config, run = open_model(source, dev)
    # The label slot carries each file's index, so results map back to paths after bad files drop out.
    opts = {k: v for k, v in (("batch_size", batch_size), ("workers", workers)) if v is not None}
    loader = make_loader([(f, i) for i, f in enumerate(files)], eval_transform(config), TrainConfig(**opts),
                         False, dev)
    probs, index, skipped = [], [], []
    with tqdm(total=len(files), desc="predict", unit="img") as bar:
        for x, idx, bad in loader:
            skipped += bad
            if len(x):
                probs.append(torch.softmax(run(x).double(), dim=1))
                index.append(idx)
            bar.update(len(x) + len(bad))
    order = torch.cat(index).tolist() if index else []
    num_classes = len(config["classes"])
    return Predictions([files[i] for i in order], torch.cat(probs) if probs else torch.zeros(0, num_classes),
                       config["classes"], skipped)


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


# --- command line --------------------------------------------------------------------------------

HELP = "top-k classes of images with a bundle, its ONNX file, a run or a checkpoint"
EXAMPLES = """\
  spinal-transfer predict bundles/pets photos/ --out preds.csv
  spinal-transfer predict bundles/pets/model.onnx photos/ extra.jpg --topk 3 --out preds.csv
  spinal-transfer predict runs/pets photos/ --batch-size 128 --workers 8 --device cuda
Folders are searched recursively for images. The CSV has path, label_1, prob_1, ... label_k, prob_k;
unreadable files are skipped and listed on stderr and in OUT.skipped.txt (path<TAB>reason)."""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="BUNDLE_OR_RUN",
                        help="bundle folder, bundle .onnx file, run folder (best.pt) or checkpoint file")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument("--topk", type=int, default=TOPK, help=f"classes per image (default: {TOPK})")
    parser.add_argument("--batch-size", type=int, help=f"images per batch (default: {TrainConfig().batch_size})")
    parser.add_argument("--workers", type=int, help="DataLoader worker processes decoding images (default: as in training)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (ONNX: cuda if onnxruntime has it)")
    parser.add_argument("--out", default="predictions.csv", help="CSV to write (default: predictions.csv)")


def main(args: argparse.Namespace) -> int:
    from .export import MissingDependency

    if args.topk < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    try:
        preds = predict(args.model, args.paths, args.batch_size, args.workers, args.device)
    except MissingDependency as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped_path = write_csv(preds, args.out, args.topk)
    for path, reason in preds.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"wrote {len(preds.paths)} predictions to {args.out}; {len(preds.skipped)} file(s) skipped "
          f"(listed in {skipped_path})", file=sys.stderr)
    return 0
