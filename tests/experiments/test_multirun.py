"""What compare and tune share: the two modes' config fields, and the refusal to run under torchrun."""
from __future__ import annotations

from pathlib import Path

import pytest

from spinal_transfer.config import RESUME_SAFE, TrainConfig
from spinal_transfer.experiments.multirun import IGNORED, MODES, MultiRunError, mode_fields, refuse_torchrun


def test_frozen_mode_shares_one_feature_cache_and_finetune_trains_end_to_end(tmp_path):
    assert set(MODES) == {"frozen", "finetune"}
    frozen = mode_fields("frozen", tmp_path / "out")
    assert frozen["freeze_backbone"] and frozen["cache_features"]
    assert Path(frozen["cache_dir"]).parent == tmp_path / "out"
    assert mode_fields("frozen", tmp_path / "out", cache_dir="/shared/cache")["cache_dir"] == "/shared/cache"
    assert mode_fields("finetune", tmp_path) == {"freeze_backbone": False}       # nothing set for nothing
    assert mode_fields("finetune", tmp_path, cache_features=True) == {"freeze_backbone": False, "cache_features": False}
    TrainConfig(**frozen)                               # fields a config accepts as they are
    with pytest.raises(MultiRunError, match="--mode must be one of"):
        mode_fields("linear-probe", tmp_path)


def test_fields_that_do_not_change_what_a_run_learns_are_ignored_in_its_identity():
    assert "out" in IGNORED and "workers" in IGNORED and "device" in IGNORED
    assert not {"epochs", "stages", "data", "limit_train_batches"} & IGNORED
    assert IGNORED - {"out"} <= set(RESUME_SAFE)


def test_refuses_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MultiRunError, match="compare is not run under torchrun"):
        refuse_torchrun("compare")
    monkeypatch.setenv("WORLD_SIZE", "1")
    refuse_torchrun("compare")


def test_a_run_stopped_inside_a_driver_says_to_rerun_the_driver():
    """compare, reproduce and tune resume their own runs: `train --resume` would leave their tables behind."""
    from spinal_transfer.errors import Interrupted, rerun_resumes

    said = "SIGTERM received: stopped at epoch 2, batch 3 (optimizer step 9); RUN/last.pt: train --resume RUN"
    with pytest.raises(Interrupted) as stop:
        with rerun_resumes("compare"):
            raise Interrupted(said)
    assert str(stop.value) == ("SIGTERM received: stopped at epoch 2, batch 3 (optimizer step 9); the run in flight "
                               "kept its last.pt, and the same compare command resumes it and goes on")


def test_finetune_mode_says_when_it_trains_a_backbone_the_recipe_keeps_frozen(tmp_path, caplog):
    """A frozen tune's best.yaml (freeze_backbone: true) given to compare, whose default mode fine-tunes: said."""
    for mode, frozen_recipe, warned in (("finetune", True, True), ("finetune", False, False),
                                        ("frozen", True, False)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            fields = mode_fields(mode, tmp_path, freeze_backbone=frozen_recipe)
        assert fields["freeze_backbone"] == (mode == "frozen")
        assert ("give --mode frozen to keep it frozen" in caplog.text) == warned, (mode, frozen_recipe)
