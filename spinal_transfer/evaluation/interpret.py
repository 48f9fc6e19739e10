"""Error analysis of per-image predictions: the most confidently wrong images and the most confused pairs.

What fastai calls `ClassificationInterpretation`, read from the run's `test_predictions.csv`
(or `evaluate`'s predictions CSV) instead of a live model, so a report can be rebuilt from the
folder alone. The CSV's columns are

    path,target,prediction,target_name,prediction_name,target_prob,prediction_prob,loss,
    top1_name,top1_prob,...,topK_name,topK_prob

where `loss` is the image's cross-entropy, -log(target_prob). Files written before that format
(only `path,target,prediction`) still read: names come from `classes` and the probability
fields are None, so `top_losses` returns nothing rather than a wrong ranking.
"""
from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from ..errors import DataError
from ..utils.atomic import atomic_write_text
from ..utils.textfiles import open_text

PathLike = Union[str, Path]


@dataclass(frozen=True)
class Prediction:
    """One row of a predictions CSV."""

    path: str
    target: int
    prediction: int
    target_name: str
    prediction_name: str
    target_prob: Optional[float] = None
    prediction_prob: Optional[float] = None
    loss: Optional[float] = None
    topk: tuple[tuple[str, float], ...] = field(default=())

    @property
    def correct(self) -> bool:
        return self.target == self.prediction


@dataclass(frozen=True)
class ConfusedPair:
    """Images of `true_name` predicted as `predicted_name`: `count` of the `true_total` images of that class."""

    true_name: str
    predicted_name: str
    count: int
    true_total: int

    @property
    def fraction(self) -> float:
        """Share of the true class that went to the predicted class (a row of the normalized matrix)."""
        return self.count / self.true_total if self.true_total else 0.0


def _float(v: Optional[str]) -> Optional[float]:
    if v is None or v == "":
        return None
    return float(v)


def _name(row: dict, key: str, idx: int, classes: Optional[Sequence[str]]) -> str:
    if row.get(key):
        return row[key]
    return classes[idx] if classes is not None and 0 <= idx < len(classes) else str(idx)


def read_predictions(path: PathLike, classes: Optional[Sequence[str]] = None) -> list[Prediction]:
    """Rows of a predictions CSV, in file order. `classes` fills in names for the old 3-column format. A path
    that is not UTF-8 reads back as the name of its file (`open_text`), as it was written. A row cut short or
    edited (an empty or non-numeric number, a missing column) is a DataError naming the file and line."""
    out: list[Prediction] = []
    with open_text(path) as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        k = 0
        while f"top{k + 1}_name" in fields:
            k += 1
        try:
            for r in reader:
                out.append(_prediction(r, k, classes))
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"{path} is damaged at line {reader.line_num} ({type(e).__name__}: {e}): it is not the "
                            f"predictions CSV spinal-transfer wrote; restore it, or remove it to go without "
                            f"what it feeds (the page's predictions, a paired test)") from None
    return out


def _prediction(r: dict, k: int, classes: Optional[Sequence[str]]) -> Prediction:
    """One row of a predictions CSV with `k` top-k columns."""
    if None in r.values() or None in r:            # csv.DictReader's marks of a row shorter or longer than the header
        raise ValueError(f"{sum(v is not None for v in r.values())} of {len(r)} columns")
    t, p = int(r["target"]), int(r["prediction"])
    tp = _float(r.get("target_prob"))
    loss = _float(r.get("loss"))
    if loss is None and tp is not None:     # the contract defines loss as -log p(target)
        loss = -math.log(max(tp, 1e-45))
    topk = tuple((r[f"top{i}_name"], float(r[f"top{i}_prob"])) for i in range(1, k + 1) if r.get(f"top{i}_name"))
    return Prediction(r["path"], t, p, _name(r, "target_name", t, classes), _name(r, "prediction_name", p, classes),
                      tp, _float(r.get("prediction_prob")), loss, topk)


def top_losses(predictions: Iterable[Prediction], n: int = 16, wrong_only: bool = True) -> list[Prediction]:
    """The `n` images with the highest loss, highest first (ties: by path, so the order is stable).

    With `wrong_only` (the report's "most confidently wrong"), correctly classified images are left
    out: a right answer with a low-ish probability is not a mistake worth looking at first. Rows
    without a loss (old CSV format) are never returned.
    """
    rows = [p for p in predictions if p.loss is not None and not (wrong_only and p.correct)]
    rows.sort(key=lambda p: (-p.loss, p.path))     # type: ignore[operator]
    return rows[:n]


def most_confused(predictions: Iterable[Prediction], limit: Optional[int] = None,
                  min_count: int = 1) -> list[ConfusedPair]:
    """Off-diagonal (true, predicted) pairs sorted by count, then by share of the true class, then by names.

    The table that replaces a confusion matrix once there are too many classes to read one: the
    pairs worth fixing first, whatever the number of classes.
    """
    preds = list(predictions)
    totals = Counter(p.target_name for p in preds)
    pairs = Counter((p.target_name, p.prediction_name) for p in preds if not p.correct)
    out = [ConfusedPair(t, q, c, totals[t]) for (t, q), c in pairs.items() if c >= min_count]
    out.sort(key=lambda x: (-x.count, -x.fraction, x.true_name, x.predicted_name))
    return out[:limit] if limit is not None else out


def most_confused_from_matrix(cm: Sequence[Sequence[int]], classes: Sequence[str], limit: Optional[int] = None,
                              min_count: int = 1) -> list[ConfusedPair]:
    """`most_confused` from a confusion matrix (rows true, columns predicted), for when no CSV exists."""
    out = []
    for i, row in enumerate(cm):
        total = int(sum(row))
        for j, c in enumerate(row):
            if i != j and c >= min_count:
                out.append(ConfusedPair(classes[i], classes[j], int(c), total))
    out.sort(key=lambda x: (-x.count, -x.fraction, x.true_name, x.predicted_name))
    return out[:limit] if limit is not None else out


def prediction_header(num_classes: int, topk: int = 5) -> list[str]:
    """The predictions CSV's columns for `num_classes` classes (top-k capped at the class count)."""
    k = min(topk, num_classes)
    return (["path", "target", "prediction", "target_name", "prediction_name", "target_prob", "prediction_prob",
             "loss"] + [c for i in range(1, k + 1) for c in (f"top{i}_name", f"top{i}_prob")])


def prediction_rows(paths: Sequence[str], logits: Any, targets: Sequence[int], classes: Sequence[str],
                    topk: int = 5) -> list[list]:
    """Rows for `prediction_header`: softmax probabilities and the per-image loss from float64
    log-softmax (so a very confident mistake gets its true, large loss rather than -log(0))."""
    import torch

    z = torch.as_tensor(logits).detach().to("cpu", torch.float64)
    logp = torch.log_softmax(z, dim=1) if len(z) else z
    probs = logp.exp()
    k = min(topk, len(classes))
    y = [int(t) for t in (targets.tolist() if hasattr(targets, "tolist") else targets)]
    rows = []
    for i, (path, t) in enumerate(zip(paths, y)):
        order = torch.argsort(probs[i], descending=True, stable=True)[:k].tolist()
        p = order[0]
        row = [path, t, p, classes[t], classes[p], float(probs[i, t]), float(probs[i, p]), float(-logp[i, t])]
        for j in order:
            row += [classes[j], float(probs[i, j])]
        rows.append(row)
    return rows


def write_predictions_csv(path: PathLike, paths: Sequence[str], logits: Any, targets: Sequence[int],
                          classes: Sequence[str], topk: int = 5) -> Path:
    """Write a predictions CSV in the run-folder format (see the module docstring); `logits` N x C."""
    import io

    if len(paths) != len(targets):     # a misaligned file would be worse than none
        raise RuntimeError(f"{len(paths)} paths for {len(targets)} predictions")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(prediction_header(len(classes), topk))
    w.writerows(prediction_rows(paths, logits, targets, classes, topk))

    atomic_write_text(path, buf.getvalue())
    return Path(path)
