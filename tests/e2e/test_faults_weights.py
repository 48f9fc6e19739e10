"""`--weights FILE` says what it loaded and refuses what cannot be right: another architecture, a backbone the
file does not cover; a head is restored only for the same classes in the same order."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import TINY, cli_flags, write_digits_folder

from spinal_transfer.runs.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0"}


def _train(data: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return ["train", *cli_flags(**{**TINY, "data": data, "out": out, "weights": weights, "epochs": 1,
                                   "limit_train_batches": 1}), *extra]


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_a_checkpoint_of_another_architecture_is_refused_in_one_line(finished_run, three_digits, tmp_path):
    best = finished_run / "checkpoints" / "best.pt"
    args = [*_train(three_digits, tmp_path / "run", best), "--backbone", "timm/test_efficientnet"]
    res = subprocess.run([sys.executable, "-m", "spinal_transfer", *args], capture_output=True, text=True,
                         env=ENV, timeout=600)
    assert res.returncode == 2, res.stderr[-3000:]
    line = _one_error_line(res.stderr)
    assert "timm/test_resnet" in line and "timm/test_efficientnet" in line and str(best) in line


def test_the_head_is_restored_only_for_the_same_classes_and_report_json_says_what_was_taken(
        finished_run, three_digits, tmp_path, cli_run):
    best = finished_run / "checkpoints" / "best.pt"
    sha = hashlib.sha256(best.read_bytes()).hexdigest()
    n_backbone = sum(not k.startswith("fc.") and not k.endswith("num_batches_tracked")     # counters: not weights
                     for k in load_checkpoint(best)["model"])
    res = cli_run(*_train(three_digits, tmp_path / "same", best))
    assert res.returncode == 0, res.stderr[-3000:]
    log = (tmp_path / "same" / "train.log").read_text()
    assert f"head: restored from {best} (same 3 classes)" in log
    assert f"{n_backbone} of {n_backbone} backbone tensors loaded from {best}; 0 missing" in log
    taken = json.loads((tmp_path / "same" / "report.json").read_text())["weights"]
    assert taken == {"source": str(best), "sha256": sha, "backbone_tensors": n_backbone, "head_restored": True}
    assert sha[:12] in (tmp_path / "same" / "report.html").read_text()

    other = write_digits_folder(tmp_path / "other", digits=(3, 4, 5))      # three classes too: the shapes match
    res = cli_run(*_train(other, tmp_path / "new", best))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"head: new ({best}'s classes differ)" in (tmp_path / "new" / "train.log").read_text()
    taken = json.loads((tmp_path / "new" / "report.json").read_text())["weights"]
    assert taken["head_restored"] is False and taken["sha256"] == sha


def test_a_plain_state_dict_reports_its_counts_and_a_partial_one_needs_weights_partial(
        finished_run, three_digits, tmp_path, cli_run):
    sd = dict(load_checkpoint(finished_run / "checkpoints" / "best.pt")["model"])
    dropped = next(k for k in sd if k.startswith("conv1."))
    del sd[dropped]
    sd["extra.weight"] = torch.zeros(2)
    plain = tmp_path / "plain.pt"
    torch.save(sd, plain)
    n_backbone = sum(not k.startswith("fc.") and not k.endswith("num_batches_tracked") for k in sd
                     if k != "extra.weight") + 1
    res = cli_run(*_train(three_digits, tmp_path / "refused", plain))
    assert res.returncode == 2
    line = _one_error_line(res.stderr)
    assert f"{n_backbone - 1} of {n_backbone} backbone tensors" in line and "1 missing" in line
    assert "--weights-partial" in line
    res = cli_run(*_train(three_digits, tmp_path / "partial", plain, "--weights-partial"))
    assert res.returncode == 0, res.stderr[-3000:]
    log = (tmp_path / "partial" / "train.log").read_text()
    assert f"{n_backbone - 1} of {n_backbone} backbone tensors loaded from {plain}; 1 missing, 0 with a shape mismatch, " \
           f"1 unexpected (not used)" in log
    assert f"head: new ({plain} records no class names)" in log
    taken = json.loads((tmp_path / "partial" / "report.json").read_text())["weights"]
    assert taken["backbone_tensors"] == n_backbone - 1 and taken["head_restored"] is False

    # Every tensor there but more besides (a deeper model of the family): another architecture, refused.
    deeper = {**load_checkpoint(finished_run / "checkpoints" / "best.pt")["model"], "layer9.weight": torch.ones(3)}
    torch.save(deeper, tmp_path / "deeper.pt")
    line = _one_error_line(cli_run(*_train(three_digits, tmp_path / "deeper", tmp_path / "deeper.pt")).stderr)
    assert f"{n_backbone} of {n_backbone} backbone tensors" in line and "'layer9.weight'" in line
    # Names of another implementation: nothing fits, so --weights-partial would train a random backbone.
    torch.save({"net." + k: v for k, v in sd.items()}, tmp_path / "renamed.pt")
    res = cli_run(*_train(three_digits, tmp_path / "renamed", tmp_path / "renamed.pt", "--weights-partial"))
    assert res.returncode == 2 and "nothing of" in _one_error_line(res.stderr) and "convert-weights" in res.stderr
    assert not (tmp_path / "deeper").exists() and not (tmp_path / "renamed").exists()


def test_weights_given_as_a_run_or_bundle_folder_take_its_file(finished_run, three_digits, tmp_path, cli_run):
    res = cli_run(*_train(three_digits, tmp_path / "from_run", finished_run))
    assert res.returncode == 0, res.stderr[-3000:]
    taken = json.loads((tmp_path / "from_run" / "report.json").read_text())["weights"]
    assert taken["source"] == str(finished_run / "checkpoints" / "best.pt") and taken["head_restored"] is True
    res = cli_run(*_train(three_digits, tmp_path / "refused", three_digits))
    assert res.returncode == 2 and "neither a bundle's model.safetensors nor a run's checkpoints/best.pt" in \
        _one_error_line(res.stderr)
