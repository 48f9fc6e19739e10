"""Classification metrics (scikit-learn) and the run's plots (matplotlib)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sklearn import metrics as skm

SUMMARY_KEYS = ("top1", "top5", "balanced_accuracy", "macro_f1", "loss")


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, classes: Sequence[str]) -> dict:
    """Top-1/top-5, balanced accuracy, macro F1, per-class precision/recall and the confusion matrix.

    Fractions in [0, 1]. Labels are always range(len(classes)) so a class absent from this split
    still has its row, and top-5 is capped at the number of classes.
    """
    labels = list(range(len(classes)))
    y = targets.cpu().numpy()
    logits = logits.float().cpu()
    loss = float(torch.nn.functional.cross_entropy(logits, targets.cpu()).item()) if len(y) else float("nan")
    pred = logits.argmax(1).numpy()
    probs = torch.softmax(logits, 1).numpy()
    # With 5 classes or fewer every label is in the top 5.
    top5 = float(skm.top_k_accuracy_score(y, probs, k=5, labels=labels)) if len(classes) > 5 else 1.0
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    return {
        "top1": float(skm.accuracy_score(y, pred)),
        "top5": top5,
        "balanced_accuracy": float(_balanced_accuracy(y, pred)),
        "macro_f1": float(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "loss": loss,
        "num_samples": int(len(y)),
        "per_class": {c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for c, p, r, f, s in zip(classes, precision, recall, f1, support)},
        "confusion_matrix": skm.confusion_matrix(y, pred, labels=labels).tolist(),
    }


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    import warnings

    with warnings.catch_warnings():     # classes absent from y_true are ignored, which is what we want
        warnings.simplefilter("ignore")
        return skm.balanced_accuracy_score(y, pred)


def summary(m: dict) -> dict:
    return {k: m[k] for k in SUMMARY_KEYS}


def plot_curves(metrics_jsonl: Path, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    if not rows:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    ep = [r["epoch"] for r in rows]
    for key, ylabel, name in (("loss", "loss", "loss.png"), ("top1", "top-1 accuracy", "accuracy.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        if key == "loss":
            ax.plot(ep, [r["train_loss"] for r in rows], label="train")
        ax.plot(ep, [r["val"][key] for r in rows], label="val")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
