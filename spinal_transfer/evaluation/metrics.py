"""Classification metrics (scikit-learn)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from sklearn import metrics as skm

SUMMARY_KEYS = ("top1", "top5", "balanced_accuracy", "macro_f1", "loss")


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, classes: Sequence[str]) -> dict:
    """Top-1/top-5, balanced accuracy, macro F1, per-class precision/recall and the confusion matrix.

    Fractions in [0, 1]. Labels are always range(len(classes)) so a class absent from this split
    still has its row, and top-5 is capped at the number of classes. Macro F1 averages over the classes the
    split has or the model predicts (scikit-learn's own default; balanced accuracy over those the split has): a
    class with neither (e.g. too few images to hold one out) has no F1, and counting it as 0 would lower the
    score of a split that holds nothing of it.
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
        "macro_f1": float(skm.f1_score(y, pred, labels=sorted(set(y) | set(pred)) or labels, average="macro",
                                       zero_division=0)),
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
