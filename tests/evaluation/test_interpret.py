"""Error analysis from a predictions CSV: the file reads back to the probabilities and losses of the logits, the
top losses are the wrong answers ranked by loss, and the confused pairs agree with the confusion matrix's."""
from __future__ import annotations

import math

import pytest
import torch

from spinal_transfer.evaluation.interpret import (
    most_confused, most_confused_from_matrix, read_predictions, top_losses, write_predictions_csv,
)
from spinal_transfer.evaluation.metrics import classification_metrics

CLASSES = ["cat", "dog", "fox"]
LOGITS = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0], [50.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.5, 0.0],
                       [1.0, 0.0, 3.0]])
TARGETS = [0, 0, 1, 1, 2, 2]
PATHS = [f"img/{i}, with comma.png" for i in range(6)]


@pytest.fixture
def preds(tmp_path):
    return read_predictions(write_predictions_csv(tmp_path / "p.csv", PATHS, LOGITS, TARGETS, CLASSES), CLASSES)


def _loss(i: int) -> float:
    row = LOGITS[i].tolist()
    return math.log(sum(math.exp(v) for v in row)) - row[TARGETS[i]]


def test_the_csv_reads_back_to_the_logits_probabilities_and_losses(preds):
    assert [p.path for p in preds] == PATHS and [p.target for p in preds] == TARGETS
    assert [p.prediction for p in preds] == [0, 1, 0, 1, 1, 2]
    assert [p.loss for p in preds] == pytest.approx([_loss(i) for i in range(6)], rel=1e-9)
    assert preds[2].loss == pytest.approx(50.0)                   # a confident mistake keeps its real loss
    assert preds[0].topk[0][0] == "cat" and len(preds[0].topk) == 3


def test_top_losses_are_the_wrong_answers_highest_loss_first(preds):
    assert [p.path for p in top_losses(preds, n=2)] == [PATHS[2], PATHS[1]]
    assert [p.path for p in top_losses(preds, n=10, wrong_only=False)][:3] == [PATHS[2], PATHS[1], PATHS[4]]


def test_confused_pairs_agree_with_the_confusion_matrix(preds):
    cm = classification_metrics(LOGITS, torch.tensor(TARGETS), CLASSES)["confusion_matrix"]
    from_csv = [(c.true_name, c.predicted_name, c.count, c.true_total) for c in most_confused(preds)]
    from_cm = [(c.true_name, c.predicted_name, c.count, c.true_total) for c in most_confused_from_matrix(cm, CLASSES)]
    assert from_csv == from_cm == [("cat", "dog", 1, 2), ("dog", "cat", 1, 2), ("fox", "dog", 1, 2)]
