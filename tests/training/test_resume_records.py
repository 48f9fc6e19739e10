"""What a resumed run's own files say about its resumes: the interrupted epoch's seconds and images/s cover the
whole epoch (metrics.jsonl), and each resume, with the settings it changed, is listed (report.json, config.yaml,
report.html, the `report` command's lines). Real tiny runs, interrupted in this process by a real SIGTERM after
a chosen optimizer step."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_cfg

import spinal_transfer.training.train as T
from spinal_transfer.cli import main as cli
from spinal_transfer.errors import Interrupted
from spinal_transfer.runs.checkpoint import atomic_save, load_checkpoint


def _sigterm_after_step(monkeypatch: pytest.MonkeyPatch, k: int, pause: float = 0.0) -> None:
    """Every batch takes at least `pause` more seconds (inside the epoch's training time), and SIGTERM arrives
    right after optimizer step `k`: the run writes last.pt and stops there."""
    real, fired = T.train_one_epoch, []

    def patched(*args, **kw):
        progress = kw["progress"]

        def on_step() -> None:
            time.sleep(pause)
            if progress.step == k and not fired:
                fired.append(k)
                os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **{**kw, "on_step": on_step})
    monkeypatch.setattr(T, "train_one_epoch", patched)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_an_epoch_interrupted_and_resumed_records_the_seconds_of_both_parts(three_digits, tmp_path, monkeypatch):
    """The resumed epoch's row used to count only the seconds after the resume (QA: 9.7 s for an epoch of
    30 batches of which 29 were done before the signal), and its images/s was that much too high."""
    out, pause, k = tmp_path / "run", 0.5, 6
    cfg = tiny_cfg(three_digits, out, epochs=1, batch_size=16, limit_train_batches=8)
    _sigterm_after_step(monkeypatch, k, pause)
    with pytest.raises(Interrupted):
        T.run(cfg)
    monkeypatch.undo()
    before = load_checkpoint(out / "checkpoints" / "last.pt")["progress"]
    assert (before["batch"], before["epoch_seen"]) == (k, k * 16)
    report = T.run(resume=out)
    (row,) = _rows(out)
    assert row["seconds"] >= k * pause                       # both parts, not only the 2 batches after the resume
    assert row["train_images_per_s"] <= 8 * 16 / (k * pause)
    assert k * pause <= before["epoch_seconds"] <= row["seconds"]    # last.pt carried the part before the signal
    assert report["resumes"] == [{"at": f"in epoch 1 at batch {k}", "epochs_done": 0, "batch": k, "step": k,
                                  "changed": {}}]


def test_an_old_last_pt_without_the_epochs_seconds_still_resumes_and_says_so(three_digits, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _sigterm_after_step(monkeypatch, 3)
    with pytest.raises(Interrupted):
        T.run(tiny_cfg(three_digits, out, epochs=1, batch_size=16, limit_train_batches=5))
    monkeypatch.undo()
    last = out / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    del ckpt["progress"]["epoch_seconds"], ckpt["resumes"]           # as a last.pt written before they existed
    ckpt.pop("format")
    atomic_save(ckpt, last)
    T.run(resume=out)
    assert "cover only the part trained after this resume" in (out / "train.log").read_text()
    (row,) = _rows(out)
    assert row["train_images_per_s"] > 0 and row["seconds"] > 0


@pytest.mark.slow      # ~12-17 s: a real run stopped and resumed through the CLI
def test_a_resume_with_another_batch_size_is_recorded_in_the_runs_files(three_digits, tmp_path, monkeypatch):
    """config.yaml used to be rewritten as if the whole run had trained with the new batch size, and nothing in
    the run's files said otherwise (BatchNorm makes batch 8 another training than batch 16)."""
    out = tmp_path / "run"
    _sigterm_after_step(monkeypatch, 2)                       # the end of epoch 1 of 2 steps: stops after it
    with pytest.raises(Interrupted):
        T.run(tiny_cfg(three_digits, out, epochs=2, batch_size=16, limit_train_batches=2))
    monkeypatch.undo()
    assert cli(["train", "--resume", str(out), "--batch-size", "8", "--accum-steps", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["resumes"] == [{"at": "after epoch 1", "epochs_done": 1, "batch": 0, "step": 2, "changed": {
        "batch_size": {"from": 16, "to": 8}, "accum_steps": {"from": 1, "to": 2}}}]
    text = (out / "config.yaml").read_text()
    assert text.startswith("# resumed after epoch 1 with accum_steps 1 -> 2, batch_size 16 -> 8; below: the settings "
                           "now\n")
    assert yaml.safe_load(text)["batch_size"] == 8
    assert "after epoch 1 with accum_steps 1 \u2192 2, batch_size 16 \u2192 8" in (out / "report.html").read_text()
    # extended later: the earlier resume stays listed, the new one is added
    assert cli(["train", "--resume", str(out), "--epochs", "3"]) == 0
    resumes = json.loads((out / "report.json").read_text())["resumes"]
    assert [r["changed"] for r in resumes] == [report["resumes"][0]["changed"], {"epochs": {"from": 2, "to": 3}}]


@pytest.mark.slow      # ~12-17 s: a real run stopped and resumed through the CLI
def test_an_epoch_resumed_with_another_batch_size_goes_on_at_its_image(three_digits, tmp_path, monkeypatch):
    """Stopped after 3 batches of 16 (48 images), resumed with batches of 8 (x2 accumulation, the same global
    batch): the epoch goes on at image 48, 6 batches of 8 done, so its other images are trained once. Counting
    batches done by the new size started it at image 24 (24 images twice)."""
    out = tmp_path / "run"
    _sigterm_after_step(monkeypatch, 3)
    with pytest.raises(Interrupted):
        T.run(tiny_cfg(three_digits, out, epochs=1, batch_size=16))
    monkeypatch.undo()
    batches, real = [], T.train_one_epoch
    monkeypatch.setattr(T, "train_one_epoch", lambda *a, **kw: real(*a, **{**kw, "on_step": lambda: batches.append(1)}))
    assert cli(["train", "--resume", str(out), "--batch-size", "8", "--accum-steps", "2"]) == 0
    n = json.loads((out / "report.json").read_text())["num_images"]["train"]
    assert len(batches) == (n - 3 * 16) // 8                 # (train drops the last partial batch)
    assert "the interrupted epoch goes on at image 48 (6 batches of 8 done; it had batch size 16)" in \
        (out / "train.log").read_text()


def test_the_report_command_says_each_resume_and_what_it_changed(three_digits, tmp_path, cli_run):
    """`report` printed only the page's path: that a run was resumed with another batch size (config.yaml holds
    only the settings at the end) was on the page alone. Now one line per resume; none for a run never resumed."""
    out = tmp_path / "run"
    T.run(tiny_cfg(three_digits, out, epochs=1, img_size=16, limit_train_batches=1))
    res = cli_run("report", out)
    assert res.returncode == 0 and "resumed" not in res.stderr, res.stderr[-2000:]
    res = cli_run("train", "--resume", out, "--epochs", "2", "--batch-size", "16", "--accum-steps", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    res = cli_run("report", out)
    assert res.returncode == 0 and res.stdout.split() == [str(out / "report.html")], res.stderr[-2000:]
    assert [line for line in res.stderr.splitlines() if line.startswith("resumed")] == [
        "resumed after epoch 1 with epochs 1 -> 2, accum_steps 1 -> 2, batch_size 32 -> 16"]
