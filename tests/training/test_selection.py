"""Best-epoch selection: the first of equal scores stays best, best.pt holds the weights that scored, and a saver
rebuilt from its state_dict chooses as the uninterrupted one would."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from spinal_transfer.runs.checkpoint import load_checkpoint
from spinal_transfer.training.selection import CheckpointSaver


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
