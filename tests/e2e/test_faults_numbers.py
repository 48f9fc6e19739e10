"""Numbers as people write them: `1e-3`, `5E-4`, `1e+6` are floats in every YAML the tool reads (PyYAML alone,
YAML 1.1, reads them as strings)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY, cli_flags

from spinal_transfer.config import TrainConfig, load_yaml

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0"}


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spinal_transfer", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=600)


@pytest.mark.slow      # 9-16 s; the default suite stays near 10 minutes
def test_exponent_floats_are_numbers_in_a_recipe_and_in_stages(three_digits, tmp_path):
    assert yaml.safe_load("lr: 1e-3") == {"lr": "1e-3"}         # the trap: PyYAML alone gives a string
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("backbone: timm/test_resnet\nweights: none\nlr: 1e-3\nweight_decay: 5E-4\n"
                      "label_smoothing: 1e-1\n")
    flags = cli_flags(**{**TINY, "lr": None, "weight_decay": None, "label_smoothing": None})
    res = _cli("train", "--recipe", recipe, *flags, "--data", three_digits, "--out", tmp_path / "run",
               "--epochs", 1, "--limit-train-batches", 1)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = load_yaml((tmp_path / "run" / "config.yaml").read_text())
    assert (cfg["lr"], cfg["weight_decay"], cfg["label_smoothing"]) == (1e-3, 5e-4, 0.1)
    res = _cli("train", *flags, "--data", three_digits, "--out", tmp_path / "staged", "--limit-train-batches", 1,
               "--stages", "[{epochs: 1, lr: 1e-3}, {epochs: 1, lr: 1E+0}]")
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = load_yaml((tmp_path / "staged" / "config.yaml").read_text())
    assert cfg["stages"] == [{"epochs": 1, "lr": 1e-3}, {"epochs": 1, "lr": 1.0}]
    assert [json.loads(ln)["epoch"] for ln in (tmp_path / "staged" / "metrics.jsonl").read_text().splitlines()
            if '"epoch"' in ln][-1] == 2


def test_a_written_recipe_reads_back_to_the_same_config_and_the_loader_keeps_yaml_types(tmp_path):
    cfg = TrainConfig(backbone="timm/test_resnet", lr=1e-5, weight_decay=1e+6, stages=[{"epochs": 2, "lr": 3e-4}])
    (tmp_path / "best.yaml").write_text(cfg.to_yaml())           # as tune writes best.yaml
    assert TrainConfig.from_yaml(tmp_path / "best.yaml").to_dict() == cfg.to_dict()
    assert load_yaml("[1e-3, 5E-4, 1e+6, 1, 0.5, .5, -.inf, 1_000, abc1e3, '1e-3', 2001-12-14]")[:10] == [
        1e-3, 5e-4, 1e6, 1, 0.5, 0.5, float("-inf"), 1000, "abc1e3", "1e-3"]
