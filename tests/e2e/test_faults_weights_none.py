"""`--weights none`: no frozen first epoch on a random backbone (said in one line), and the offline-weights error
names both ways to go on without a download."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, cli_flags

from spinal_transfer.config import load_yaml

REPO = Path(__file__).resolve().parents[2]


def _train(tmp_path: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch")}
    return subprocess.run([sys.executable, "-m", "spinal_transfer", "train", *cli_flags(**{**TINY, **kw})],
                          capture_output=True, text=True, env=env, timeout=600)


def test_a_random_backbone_is_not_frozen_first_and_the_log_says_why(three_digits, tmp_path):
    out = tmp_path / "run"
    res = _train(tmp_path, data=three_digits, out=out, epochs=2, limit_train_batches=1, freeze_epochs=1)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert [r["frozen"] for r in rows if "frozen" in r] == [False, False]
    assert "freeze_epochs 1 -> 0: with --weights none the backbone is random" in (out / "train.log").read_text()
    assert load_yaml((out / "config.yaml").read_text())["freeze_epochs"] == 0


def test_the_offline_weights_error_names_weights_none_and_a_file(three_digits, tmp_path):
    res = _train(tmp_path, data=three_digits, out=tmp_path / "run", weights="default")
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    text = res.stderr[res.stderr.index("error:"):]
    assert "--weights FILE" in text and "--weights none" in text, text
    assert not (tmp_path / "run").exists()


def test_resuming_a_random_backbone_run_with_the_freeze_asked_at_its_start_is_the_same_experiment():
    """config.yaml records the 0 frozen epochs a --weights none run trained; a resume (or reproduce, which passes
    its whole recipe again) asking for the recipe's 1 is the same experiment, another number is not."""
    from spinal_transfer.config import TrainConfig, resume_config
    from spinal_transfer.errors import ConfigError

    ran = TrainConfig(data="d", weights="none", freeze_epochs=0, epochs=2)
    assert resume_config(ran, TrainConfig(data="d", weights="none", freeze_epochs=1, epochs=3)).freeze_epochs == 0
    with pytest.raises(ConfigError, match=r"^freeze_epochs=0 \(the run has 1\) would make"):
        resume_config(TrainConfig(data="d", weights="w.pt", freeze_epochs=1), TrainConfig(data="d", weights="w.pt"))


def test_the_lr_sweep_of_a_random_backbone_is_not_frozen_either(three_digits, tmp_path):
    """`--lr auto` / `lr-find` sweep the first epoch as the run trains it: with --weights none that is unfrozen."""
    from conftest import tiny_cfg

    from spinal_transfer.training.lr_find import lr_find_for_config

    frozen_note = "swept with the backbone frozen, as the run's first epoch trains"
    cfg = tiny_cfg(three_digits, tmp_path / "r", weights="none", freeze_epochs=1)
    notes = lr_find_for_config(cfg, num_steps=8).notes
    assert frozen_note not in notes, notes
    cfg = tiny_cfg(three_digits, tmp_path / "r", weights="none", freeze_epochs=1, freeze_backbone=True)
    assert frozen_note in lr_find_for_config(cfg, num_steps=8).notes      # a backbone frozen throughout still is


@pytest.mark.parametrize("command", ["train", "lr-find", "audit"])
def test_offline_weights_are_refused_before_the_data_is_read(three_digits, tmp_path, monkeypatch, command):
    """The weights check needs no model and no data: a run that cannot get its weights says so before it scans
    the folder (a million files take minutes) or takes its folder's lock."""
    from conftest import tiny_cfg

    from spinal_transfer.errors import WeightsUnavailable
    from spinal_transfer.experiments import audit
    from spinal_transfer.training import lr_find, train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    def read(*a, **k):
        raise AssertionError("the data folder was read before the weights were checked")
    for module, name in ((train, "load_data"), (lr_find, "config_splits"), (audit, "audit_splits")):
        monkeypatch.setattr(module, name, read)
    cfg = tiny_cfg(three_digits, tmp_path / "run", weights="default")
    call = {"train": lambda: train.run(cfg), "lr-find": lambda: lr_find.lr_find_for_config(cfg),
            "audit": lambda: audit.audit(cfg, tmp_path / "audit")}[command]
    with pytest.raises(WeightsUnavailable, match="--weights none|weights=none"):
        call()
    assert not (tmp_path / "run").exists() and not (tmp_path / "audit").exists()
