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


def test_a_csv_cut_short_is_one_line_naming_the_file_and_line(tmp_path, cli_run, finished_run):
    """QA 29: `report RUN` of a run whose test_predictions.csv was cut mid-row ended in a ValueError traceback."""
    import shutil

    from spinal_transfer.errors import DataError

    path = write_predictions_csv(tmp_path / "p.csv", PATHS, LOGITS, TARGETS, CLASSES)
    text = path.read_text()
    path.write_text(text[:text.index("\n", text.index("\n") + 1) + 40])        # the header, one row, a cut row
    with pytest.raises(DataError, match=r"p\.csv is damaged at line 3 \(ValueError: "):
        read_predictions(path, CLASSES)
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    cut = (run / "test_predictions.csv").read_text()[:300]
    (run / "test_predictions.csv").write_text(cut)
    res = cli_run("report", run)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "test_predictions.csv is damaged at line" in res.stderr


def test_top_losses_are_the_wrong_answers_highest_loss_first(preds):
    assert [p.path for p in top_losses(preds, n=2)] == [PATHS[2], PATHS[1]]
    assert [p.path for p in top_losses(preds, n=10, wrong_only=False)][:3] == [PATHS[2], PATHS[1], PATHS[4]]


def test_confused_pairs_agree_with_the_confusion_matrix(preds):
    cm = classification_metrics(LOGITS, torch.tensor(TARGETS), CLASSES)["confusion_matrix"]
    from_csv = [(c.true_name, c.predicted_name, c.count, c.true_total) for c in most_confused(preds)]
    from_cm = [(c.true_name, c.predicted_name, c.count, c.true_total) for c in most_confused_from_matrix(cm, CLASSES)]
    assert from_csv == from_cm == [("cat", "dog", 1, 2), ("dog", "cat", 1, 2), ("fox", "dog", 1, 2)]
