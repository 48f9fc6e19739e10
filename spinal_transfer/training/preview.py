"""A picture of what training sees: one augmented training batch as a grid PNG, class names as captions.

Why: an augmentation that crops a small image into an unrecognisable fragment, or a normalization that does not
match the backbone, is obvious at a glance and invisible in a loss curve. The grid shows the first `n` images of
epoch 1 in the training order (`loaders.EpochSampler`) with their own augmentation seeds, so it is exactly the
start of the run's first batch, not a lookalike; each image is denormalized and placed pixel for pixel (upscaled
by a whole factor, nearest neighbour), never resampled by the plotting library.

Drawn on a bare `matplotlib.figure.Figure` rendered by the Agg canvas (as plots.py): no pyplot, no global backend.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..data.loaders import BadSample, EpochSampler, ImageDataset
from ..utils.stamp import png_metadata
from .inputs import RunInputs

PathLike = Union[str, Path]
TILE_MIN = 96        # tiles are upscaled by a whole factor until at least this many pixels a side
CAPTION_PX = 16      # caption band above each tile
PAD_PX = 4
DPI = 100


@dataclass
class BatchPreview:
    """What the grid shows: for tile j, the sample index and augmentation seed, and the tile's box in the PNG
    (top, left, side in pixels; each source pixel is `scale` x `scale` PNG pixels)."""

    path: Path
    indices: list[int]
    seeds: list[int]
    boxes: list[tuple[int, int, int]]
    scale: int
    skipped: list[tuple[str, str]]


def denormalize(x: Any, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """CHW normalized tensor -> HxWx3 uint8 (what the pipeline's uint8 picture was, to rounding)."""
    arr = np.asarray(x, dtype=np.float64).transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)


def first_batch(num_samples: int, seed: int, n: int) -> list[tuple[int, int]]:
    """(sample index, augmentation seed) of the first `n` training images of epoch 1, as the run draws them."""
    sampler = EpochSampler(num_samples, seed)
    sampler.set_epoch(1)
    return list(sampler)[:n]


def _caption(name: str, width_px: int) -> str:
    chars = max(4, width_px // 6)
    return textwrap.shorten(name, chars, placeholder="\u2026") if len(name) > chars else name


def write_batch_preview(samples: Sequence[tuple[str, int]], transform: Any, classes: Sequence[str],
                        mean: Sequence[float], std: Sequence[float], path: PathLike, n: int = 32,
                        seed: int = 0, ncols: int = 8) -> BatchPreview:
    """Write the grid of the first `n` augmented training images (epoch 1, training seed `seed`) to `path`.

    `transform` is the training pipeline (`build_transforms(dc, train=True, aug)`), `mean`/`std` its
    normalization. Files that fail to decode are left out (listed in the result) and the next images fill in."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ds = ImageDataset(samples, transform)
    images, indices, seeds, skipped = [], [], [], []
    for i, s in first_batch(len(samples), seed, len(samples)):
        if len(images) == n:
            break
        item = ds[(i, s)]
        if isinstance(item, BadSample):
            skipped.append((item.path, item.reason))
            continue
        images.append(denormalize(item[0], mean, std))
        indices.append(i)
        seeds.append(s)
    if not images:
        raise ValueError("no training image could be decoded for the preview")
    side = images[0].shape[0]
    scale = max(1, math.ceil(TILE_MIN / side))
    tile = side * scale
    cols = max(1, min(ncols, len(images)))
    rows = math.ceil(len(images) / cols)
    cell_w, cell_h = tile + PAD_PX, tile + CAPTION_PX + PAD_PX
    width, height = cols * cell_w + PAD_PX, rows * cell_h + PAD_PX
    mosaic = np.full((height, width, 3), 255, np.uint8)
    boxes = []
    for j, img in enumerate(images):
        top = PAD_PX + (j // cols) * cell_h + CAPTION_PX
        left = PAD_PX + (j % cols) * cell_w
        mosaic[top:top + tile, left:left + tile] = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
        boxes.append((top, left, tile))

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.figimage(mosaic, 0, 0, origin="upper")            # pixels as they are: no resampling
    for j, (top, left, _) in enumerate(boxes):
        name = str(classes[samples[indices[j]][1]])
        fig.text((left + tile / 2) / width, 1 - (top - 3) / height, _caption(name, tile), ha="center", va="bottom",
                 fontsize=7)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    fig.savefig(tmp, dpi=DPI, format="png", metadata=png_metadata())
    tmp.replace(out)
    return BatchPreview(out, indices, seeds, boxes, scale, skipped)


def training_pipeline(cfg: Any) -> tuple[list[tuple[str, int]], list[str], Any, Any]:
    """(training samples, classes, DataConfig, training transform) as `train` builds them from a TrainConfig
    (RunInputs: the protocol applied), offline: the data config comes from the backbone's registry metadata
    (timm pretrained cfg, torchvision weight enum) and `weights` only chooses which preset; no model is built
    and nothing is downloaded."""
    inputs = RunInputs.from_config(cfg)
    return inputs.splits.train, inputs.classes, inputs.data_config, inputs.train_transform


def show_batch(cfg: Any, out: PathLike, n: Optional[int] = None) -> BatchPreview:
    """The preview of the run `cfg` describes, before training: the first batch (up to 32 images) of epoch 1."""
    samples, classes, dc, tf = training_pipeline(cfg)
    return write_batch_preview(samples, tf, classes, dc.mean, dc.std, out, n=n or min(32, cfg.batch_size),
                               seed=cfg.seed)
