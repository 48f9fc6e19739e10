"""Classification metrics against numbers worked out by hand for six samples of three classes."""
from __future__ import annotations

import math

import pytest
import torch

from spinal_transfer.evaluation.metrics import SUMMARY_KEYS, classification_metrics, summary

# predictions (argmax): 0 0 1 1 0 1; targets: 0 0 1 0 1 1. Class "c" is never true and never predicted.
LOGITS = torch.tensor([[3.0, 1.0, 0.0], [2.0, 0.0, 1.0], [0.0, 2.0, 1.0], [1.0, 4.0, 0.0], [2.0, 1.0, 0.0],
                       [0.5, 1.5, 1.0]])
TARGETS = torch.tensor([0, 0, 1, 0, 1, 1])


def test_metrics_match_a_hand_count():
    m = classification_metrics(LOGITS, TARGETS, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [1, 2, 0], [0, 0, 0]]
    assert m["top1"] == pytest.approx(4 / 6) and m["top5"] == 1.0 and m["num_samples"] == 6
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3) / 2)        # classes present in the targets
    assert m["per_class"]["a"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)     # "c", never true nor predicted, has no F1
    with_c = classification_metrics(LOGITS[:2], torch.tensor([0, 2]), ["a", "b", "c"])   # "c" true, never predicted
    assert with_c["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)          # a: P 1/2 R 1 -> 2/3; c: 0; b absent
    by_hand = -sum(LOGITS[i, t] - math.log(sum(math.exp(v) for v in LOGITS[i].tolist()))
                   for i, t in enumerate(TARGETS.tolist())) / 6
    assert m["loss"] == pytest.approx(float(by_hand), rel=1e-6)
    assert list(summary(m)) == list(SUMMARY_KEYS)


def test_top5_counts_a_hit_in_the_five_largest_only():
    logits = torch.arange(7.0).repeat(2, 1)                  # class 6 ranks first ... class 0 last
    m = classification_metrics(logits, torch.tensor([2, 1]), [str(i) for i in range(7)])
    assert m["top5"] == 0.5 and m["top1"] == 0.0
