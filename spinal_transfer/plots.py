"""The run's plots (matplotlib, drawn to files)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")          # files only: no display is needed or assumed
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: list[dict], best_epoch: int, out_dir: Path) -> None:
    """loss.png and accuracy.png: train and val per epoch (whole-number epochs), the best epoch marked."""
    if not rows:
        return
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    ep = [r["epoch"] for r in rows]
    for key, ylabel, name in (("loss", "loss", "loss.png"), ("top1", "top-1 accuracy", "accuracy.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        if key == "loss":
            ax.plot(ep, [r["train_loss"] for r in rows], marker="o", label="train")
        ax.plot(ep, [r["val"][key] for r in rows], marker="o", label="val")
        ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch ({best_epoch})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str) -> None:
    plt = _pyplot()
    from sklearn.metrics import ConfusionMatrixDisplay

    n = len(classes)
    size = min(4 + 0.35 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.asarray(cm), display_labels=list(classes)).plot(
        ax=ax, include_values=n <= 30, xticks_rotation="vertical", colorbar=False)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
