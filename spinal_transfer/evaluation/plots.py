"""The run's figures: training curves, the normalized confusion matrix, the top-losses grid and the reliability
diagram.

Everything is drawn on `matplotlib.figure.Figure` objects rendered by the Agg canvas directly,
never through `pyplot`: no global backend is selected or switched (importing this module, or
calling it from a notebook, a thread or a headless server leaves matplotlib's state alone), and
figures are freed with their last reference instead of living in pyplot's registry.

Input is the run folder's contract: `metrics.jsonl` rows with 1-based `epoch` and `stage`,
`train_loss`, optional `train_top1`, `lr`, `frozen`, `val` (and optional `test`) summaries.
"""
from __future__ import annotations

import io
import json
import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

import numpy as np

from ..data.images import BadImage, load_image
from ..utils.stamp import png_metadata
from .interpret import Prediction

if TYPE_CHECKING:       # matplotlib is imported inside the functions: the CLI imports this module
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .calibration import Calibration, SplitCalibration  # lazy: type names only; calibration imports torch

PathLike = Union[str, Path]
#: Above this many classes a confusion matrix is drawn without per-cell numbers (and the report
#: shows the most-confused-pairs table instead of the matrix).
MATRIX_NUMBERS_MAX_CLASSES = 30
#: Above this many classes the matrix has no tick labels: they would overlap.
MATRIX_LABELS_MAX_CLASSES = 60

_TRAIN, _VAL, _TEST, _BEST = "#1f77b4", "#ff7f0e", "#2ca02c", "#555555"


def _figure(w: float, h: float) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def figure_png(fig: "Figure", dpi: int = 100) -> bytes:
    """PNG bytes of a figure (for embedding in a page without touching the disk)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata=png_metadata())
    return buf.getvalue()


def save_figure(fig: "Figure", path: PathLike, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_png(fig, dpi))
    return path


# ------------------------------------------------------------------------------------------------
# Training curves

def read_metrics_rows(path: PathLike) -> list[dict]:
    """The per-epoch rows of a metrics.jsonl (blank lines ignored)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _epoch_axis(ax: "Axes", rows: Sequence[dict], best_epoch: Optional[int]) -> None:
    """Whole-number epoch ticks, frozen-backbone epochs shaded, stage starts and the best epoch marked."""
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    frozen = [r["epoch"] for r in rows if r.get("frozen")]
    if frozen and len(frozen) < len(rows):
        ax.axvspan(min(frozen) - 0.5, max(frozen) + 0.5, color="#999999", alpha=0.12, lw=0,
                   label="backbone frozen")
    for prev, cur in zip(rows, rows[1:]):
        if cur.get("stage", 1) != prev.get("stage", 1):
            ax.axvline(cur["epoch"] - 0.5, color="#999999", ls=":", lw=1)
    if best_epoch is not None:
        ax.axvline(best_epoch, color=_BEST, ls="--", lw=1, label=f"best epoch ({best_epoch})")


def _series(rows: Sequence[dict], get) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = get(r)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            xs.append(r["epoch"])
            ys.append(float(v))
    return xs, ys


def _plot(ax: "Axes", rows: Sequence[dict], get, label: str, color: str, ls: str = "-") -> None:
    xs, ys = _series(rows, get)
    if xs:
        ax.plot(xs, ys, ls, color=color, label=label, marker="o" if len(rows) <= 40 else None, ms=3.5)


def draw_loss(ax: "Axes", rows: Sequence[dict], best_epoch: Optional[int] = None) -> None:
    """Train and val (and test, when logged) loss on the same axes."""
    _plot(ax, rows, lambda r: r.get("train_loss"), "train", _TRAIN)
    _plot(ax, rows, lambda r: (r.get("val") or {}).get("loss"), "val", _VAL)
    _plot(ax, rows, lambda r: (r.get("test") or {}).get("loss"), "test", _TEST, "--")
    _epoch_axis(ax, rows, best_epoch)
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("loss")
    ax.legend(fontsize="small")


def draw_accuracy(ax: "Axes", rows: Sequence[dict], best_epoch: Optional[int] = None) -> None:
    """Top-1 accuracy: train (only when the loop measured it), val, test (when logged)."""
    from matplotlib.ticker import PercentFormatter

    _plot(ax, rows, lambda r: r.get("train_top1"), "train", _TRAIN)
    _plot(ax, rows, lambda r: (r.get("val") or {}).get("top1"), "val", _VAL)
    _plot(ax, rows, lambda r: (r.get("test") or {}).get("top1"), "test", _TEST, "--")
    if best_epoch is not None:
        best = [r for r in rows if r["epoch"] == best_epoch]
        split = "test" if best and "test" in best[0] and "val" not in best[0] else "val"
        if best and (best[0].get(split) or {}).get("top1") is not None:
            ax.plot([best_epoch], [best[0][split]["top1"]], "*", color=_BEST, ms=12, zorder=5)
    _epoch_axis(ax, rows, best_epoch)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("top-1 accuracy")
    ax.set_title("accuracy")
    ax.legend(fontsize="small")


def draw_lr(ax: "Axes", rows: Sequence[dict], best_epoch: Optional[int] = None) -> None:
    """The head's learning rate at the end of each epoch; log scale once it spans more than 20x."""
    xs, ys = _series(rows, lambda r: r.get("lr"))
    if xs:
        ax.plot(xs, ys, "-", color="#9467bd", marker="o" if len(rows) <= 40 else None, ms=3.5, label="head lr")
        pos = [y for y in ys if y > 0]
        if pos and max(pos) / min(pos) > 20 and len(pos) == len(ys):
            ax.set_yscale("log")
    _epoch_axis(ax, rows, best_epoch)
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate (end of epoch)")


def curves_figure(rows: Sequence[dict], best_epoch: Optional[int] = None) -> "Figure":
    """One figure, three panels side by side: loss, accuracy, learning rate."""
    fig = _figure(15, 4.2)
    axes = fig.subplots(1, 3)
    draw_loss(axes[0], rows, best_epoch)
    draw_accuracy(axes[1], rows, best_epoch)
    draw_lr(axes[2], rows, best_epoch)
    return fig


def plot_curves(metrics: Union[PathLike, Sequence[dict]], out_dir: PathLike,
                best_epoch: Optional[int] = None) -> dict[str, Path]:
    """Write `curves.png` (loss, accuracy, lr) and the single panels `loss.png`, `accuracy.png`.

    `metrics`: a metrics.jsonl path or its rows. Returns {file name: path}; nothing is written
    when there are no rows yet.
    """
    rows = read_metrics_rows(metrics) if isinstance(metrics, (str, Path)) else list(metrics)
    if not rows:
        return {}
    out = Path(out_dir)
    written = {"curves.png": save_figure(curves_figure(rows, best_epoch), out / "curves.png")}
    for name, draw in (("loss.png", draw_loss), ("accuracy.png", draw_accuracy)):
        fig = _figure(6.5, 4.2)
        draw(fig.subplots(), rows, best_epoch)
        written[name] = save_figure(fig, out / name)
    return written


# ------------------------------------------------------------------------------------------------
# Confusion matrix

def normalize_confusion(cm: Sequence[Sequence[int]]) -> np.ndarray:
    """Rows divided by their sums (each true class sums to 1); a class with no images stays all zero."""
    a = np.asarray(cm, dtype=np.float64)
    sums = a.sum(axis=1, keepdims=True)
    return np.divide(a, sums, out=np.zeros_like(a), where=sums > 0)


def _short(name: str, width: int = 24) -> str:
    """Shorten in the middle: class names often share a prefix and differ at the end."""
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return name[:head] + "\u2026" + name[-(width - 1 - head):]


def confusion_figure(cm: Sequence[Sequence[int]], classes: Sequence[str], title: str = "") -> "Figure":
    """Row-normalized confusion matrix, readable from 2 classes to a few hundred.

    Up to MATRIX_NUMBERS_MAX_CLASSES every cell carries its percentage; up to
    MATRIX_LABELS_MAX_CLASSES the axes carry class names; beyond that only the colours remain
    (the diagonal and the hot spots are still visible; the report lists the pairs by name).
    """
    n = len(classes)
    norm = normalize_confusion(cm)
    side = min(max(4.5, 2.5 + 0.42 * n), 24.0)
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class")
    if n <= MATRIX_LABELS_MAX_CLASSES:
        fs = max(5.0, min(10.0, 260.0 / max(n, 1)))
        labels = [_short(c) for c in classes]
        long_names = n > 6 or max((len(c) for c in labels), default=0) > 10
        ax.set_xticks(range(n), labels, rotation=90 if long_names else 0, fontsize=fs)
        ax.set_yticks(range(n), labels, fontsize=fs)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if n <= MATRIX_NUMBERS_MAX_CLASSES:
        fs = max(5.0, min(10.0, 180.0 / max(n, 1)))
        for i in range(n):
            for j in range(n):
                v = norm[i, j]
                if v > 0 or i == j:
                    ax.text(j, i, f"{100 * v:.0f}" if v == 0 or v >= 0.005 else "<1", ha="center", va="center", fontsize=fs,
                            color="white" if v > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or f"confusion matrix, % of each true class ({n} classes)", fontsize=10)
    return fig


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], path: PathLike, title: str = "") -> Path:
    """Write the normalized confusion matrix PNG (see `confusion_figure`)."""
    n = len(classes)
    return save_figure(confusion_figure(cm, classes, title), path, dpi=100 if n <= 100 else 80)


# ------------------------------------------------------------------------------------------------
# Top losses

def thumbnail(path: PathLike, size: int = 160) -> tuple[Optional[np.ndarray], str]:
    """(HxWx3 uint8 at most `size` px on the long side, "") or (None, why it could not be read).

    Decoded with `spinal_transfer.data.images.load_image`, the training pipeline's own decoder, so the
    picture is what the model saw before preprocessing (EXIF orientation applied, any mode as RGB).
    """
    from PIL import Image

    try:
        arr = load_image(path, min_size=size)
    except BadImage as e:
        return None, str(e)
    im = Image.fromarray(arr)
    im.thumbnail((size, size), Image.LANCZOS)
    return np.asarray(im), ""


def loss_caption(p: "Prediction", width: int = 26) -> str:
    """"true: A / predicted: B (93.1%) / loss 4.21": what a reader needs to judge the mistake."""
    pp = f" ({100 * p.prediction_prob:.1f}%)" if p.prediction_prob is not None else ""
    loss = f"loss {p.loss:.2f}" if p.loss is not None else ""
    return "\n".join([textwrap.shorten(f"true: {p.target_name}", width, placeholder="\u2026"),
                      textwrap.shorten(f"predicted: {p.prediction_name}", width - len(pp), placeholder="\u2026") + pp,
                      loss])


def top_losses_figure(predictions: Iterable["Prediction"], ncols: int = 4, size: int = 160) -> "Figure":
    """A grid of images, each captioned with true class, predicted class, its probability and the loss."""
    preds = list(predictions)
    ncols = max(1, min(ncols, len(preds) or 1))
    nrows = max(1, math.ceil(len(preds) / ncols))
    fig = _figure(2.6 * ncols, 3.0 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, p in zip(axes, preds):
        img, why = thumbnail(p.path, size)
        if img is not None:
            ax.imshow(img)
        else:
            ax.text(0.5, 0.5, textwrap.fill(f"cannot read: {why}", 28), ha="center", va="center", fontsize=7,
                    transform=ax.transAxes)
        ax.set_title(loss_caption(p), fontsize=8)
    if not preds:
        axes[0].text(0.5, 0.5, "no wrong predictions", ha="center", va="center", transform=axes[0].transAxes)
    return fig


def plot_top_losses(predictions: Iterable["Prediction"], path: PathLike, ncols: int = 4) -> Path:
    """Write the top-losses grid PNG (pass `interpret.top_losses(...)`'s result)."""
    return save_figure(top_losses_figure(predictions, ncols), path)


# ------------------------------------------------------------------------------------------------
# Calibration

def _draw_reliability(ax: "Axes", name: str, split: "SplitCalibration") -> None:
    """Accuracy against confidence per bin, before and after temperature scaling; the diagonal is perfect
    calibration. Bars: the share of images in each bin (after)."""
    from matplotlib.ticker import PercentFormatter

    ax.plot([0, 1], [0, 1], ":", color=_BEST, lw=1, label="perfectly calibrated")
    before, after = split.bins(after=False), split.bins(after=True)
    mids = (after.edges[:-1] + after.edges[1:]) / 2
    width = after.edges[1] - after.edges[0]
    ax.bar(mids, after.counts / max(after.counts.sum(), 1), width=width * 0.9, color=_TEST, alpha=0.15,
           label="images per bin (after)")
    for bins, label, color in ((before, f"before (ECE {before.ece:.3f})", _VAL),
                               (after, f"after, T = {split.temperature:.2f} (ECE {after.ece:.3f})", _TRAIN)):
        used = bins.counts > 0
        ax.plot(bins.confidence[used], bins.accuracy[used], "o-", color=color, ms=4, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{name}: {len(split.targets)} images, {len(after.counts)} bins")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")


def calibration_figure(calibration: "Calibration") -> "Figure":
    """The reliability diagram: one panel per split (val, where T was fitted, then test)."""
    names = list(calibration.splits)
    fig = _figure(5.2 * len(names), 4.8)
    for ax, name in zip(np.atleast_1d(fig.subplots(1, len(names))), names):
        _draw_reliability(ax, name, calibration.splits[name])
    return fig


def plot_calibration(calibration: "Calibration", path: PathLike) -> Path:
    """Write plots/calibration.png (see `calibration_figure`)."""
    return save_figure(calibration_figure(calibration), path)
