"""Best-epoch selection: the first of equal scores stays best, best.pt holds the weights that scored, a saver
rebuilt from its state_dict chooses as the uninterrupted one would, and --select-metric loss picks by val loss."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from spinal_transfer.runs.checkpoint import load_checkpoint
from spinal_transfer.training.selection import SELECT_METRICS, CheckpointSaver, EarlyStopping, selection_score


def _folder(tmp_path) -> SimpleNamespace:
    return SimpleNamespace(best=tmp_path / "best.pt", stage_best=tmp_path / "stage_best.pt", last=tmp_path / "last.pt")


def _model(value: float) -> torch.nn.Module:
    m = torch.nn.Linear(2, 1)
    torch.nn.init.constant_(m.weight, value)
    return m


def test_ties_keep_the_earlier_epoch_and_best_pt_holds_its_weights(tmp_path):
    run = _folder(tmp_path)
    saver = CheckpointSaver(run, {"classes": ["a", "b"]}, multi_stage=False)
    assert [saver.update(e, s, _model(e), None) for e, s in [(1, 0.5), (2, 0.8), (3, 0.8), (4, 0.7)]] == \
        [True, True, False, False]
    best = load_checkpoint(run.best)
    assert saver.best_epoch == 2 and best["epoch"] == 2 and best["classes"] == ["a", "b"]
    assert torch.equal(best["model"]["weight"], torch.full((1, 2), 2.0))
    assert not run.stage_best.exists()                   # single stage: no stage_best.pt


def test_a_resumed_saver_chooses_as_the_uninterrupted_one(tmp_path):
    scores = [0.4, 0.9, 0.6, 0.9, 0.95]
    whole = CheckpointSaver(_folder(tmp_path / "a"), {}, multi_stage=True)
    picks = [whole.update(e, s, _model(e), None) for e, s in enumerate(scores, 1)]
    first = CheckpointSaver(_folder(tmp_path / "b"), {}, multi_stage=True)
    for e, s in enumerate(scores[:3], 1):
        first.update(e, s, _model(e), None)
    resumed = CheckpointSaver(_folder(tmp_path / "b"), {}, multi_stage=True, state=first.state_dict())
    assert picks[3:] == [resumed.update(e, s, _model(e), None) for e, s in enumerate(scores[3:], 4)]
    assert resumed.state_dict() == whole.state_dict() == {"best": 0.95, "best_epoch": 5, "stage_best": 0.95}


def test_a_new_stage_has_its_own_best_and_the_ema_weights_are_the_ones_selected(tmp_path):
    run = _folder(tmp_path)
    saver = CheckpointSaver(run, {}, multi_stage=True)
    saver.update(1, 0.9, _model(1), SimpleNamespace(module=_model(-1)))
    saver.start_stage()
    assert saver.update(2, 0.7, _model(2), None) is False              # not the run's best ...
    assert load_checkpoint(run.stage_best)["epoch"] == 2                # ... but the new stage's
    assert torch.equal(saver.stage_start_weights()["weight"], torch.full((1, 2), 2.0))
    assert torch.equal(load_checkpoint(run.best)["model"]["weight"], torch.full((1, 2), -1.0))   # EMA of epoch 1


def test_selection_by_loss_picks_the_lowest_loss_where_top1_ties(tmp_path):
    # val top-1 ties at its ceiling from epoch 2; the loss goes on falling to epoch 4, then rises
    metrics = [{"top1": 0.9, "loss": 0.50}, {"top1": 1.0, "loss": 0.30}, {"top1": 1.0, "loss": 0.20},
               {"top1": 1.0, "loss": 0.10}, {"top1": 1.0, "loss": 0.15}]
    picks = {}
    for metric in SELECT_METRICS:
        saver = CheckpointSaver(_folder(tmp_path / metric), {}, multi_stage=False)
        for e, m in enumerate(metrics, 1):
            saver.update(e, selection_score(m, metric), _model(e), None)
        picks[metric] = load_checkpoint(tmp_path / metric / "best.pt")["epoch"]
    assert picks == {"top1": 2, "loss": 4}
    with pytest.raises(ValueError, match="loss, top1"):
        selection_score(metrics[0], "f1")


def test_early_stopping_on_loss_counts_min_delta_in_loss_units_and_says_so():
    early = EarlyStopping(patience=2, min_delta=0.05, metric="loss")
    losses = [1.0, 0.90, 0.87, 0.86]      # 0.90 beats 1.0 by 0.10; 0.87 and 0.86 beat 0.90 by less than 0.05
    stops = [early.update(e, selection_score({"top1": 0.5, "loss": x}, "loss"), "val") for e, x in enumerate(losses, 1)]
    assert stops[:3] == [None, None, None] and early.best_epoch == 2
    assert stops[3] == ("val loss did not improve by more than 0.05 for 2 epoch(s) (stage best loss 0.9000 at "
                        "epoch 2)")
