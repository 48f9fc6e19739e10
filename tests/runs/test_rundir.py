"""The run folder: its state from the files it holds, its lock between processes, and --overwrite removing only
what a run wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from spinal_transfer.errors import CheckpointError, RunFolderError
from spinal_transfer.runs.checkpoint import atomic_save
from spinal_transfer.runs.rundir import RunDir, load_run_checkpoint

HOLD = """
import sys
from spinal_transfer.runs.rundir import RunDir, load_run_checkpoint
with RunDir(sys.argv[1]).lock():
    print('held', flush=True)
    sys.stdin.readline()
"""


def test_state_follows_the_files_a_run_writes(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.state() == "new" and not run.holds_run()
    run.write_text(run.config, "epochs: 2\n")
    assert run.state() == "started"
    atomic_save({"epoch": 1}, run.last)
    assert run.state() == "interrupted"
    run.write_json(run.report, {"epochs_trained": 2})
    assert run.state() == "finished" and run.read_report() == {"epochs_trained": 2}
    assert run.set_aside_report() == run.path / "report-epoch2.json" and run.state() == "interrupted"


def test_a_second_process_is_refused_with_who_holds_the_folder(tmp_path):
    run = RunDir(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run.path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run.is_locked() and run.lock_holder().startswith(f"pid {holder.pid} on ")
        run.write_text(run.config, "epochs: 3\n")
        atomic_save({"epoch": 1}, run.last)                  # a run in training: said as such, not as one to resume
        assert run.unfinished() == (f"{run.path} has not finished (0 of 3 epochs done); {run.lock_holder()} is "
                                    f"training it now")
        with pytest.raises(RunFolderError, match=rf"in use by pid {holder.pid} on "):
            with run.lock():
                pass
    finally:
        holder.communicate("\n")
    assert not run.is_locked()
    with run.lock():                           # free once the holder let go
        assert f"pid {os.getpid()} " in run.lock_file.read_text()


def test_clear_removes_the_runs_files_and_nothing_else(tmp_path):
    run = RunDir(tmp_path / "run")
    for path in (run.config, run.metrics, run.plot("curves.png"), run.best):
        run.write_text(path, "x")
    (run.path / "notes.txt").write_text("mine")
    (run.checkpoints / ".best.pt.abc.tmp").write_text("torn")
    removed = run.clear()
    assert {p.name for p in removed} == {"config.yaml", "metrics.jsonl", "plots", "checkpoints"}
    assert sorted(p.name for p in run.path.iterdir()) == ["notes.txt"]


def test_stray_temps_and_metrics_after_the_last_checkpoint_are_dropped(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()                           # training made it (and holds its lock) before the first epoch
    for epoch in (1, 2, 3):
        run.append_metrics({"epoch": epoch, "top1": epoch / 10})
    run.keep_metrics_until(2)
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2]
    assert json.loads(run.metrics.read_text().splitlines()[1]) == {"epoch": 2, "top1": 0.2}
    stray = run.path / ".metrics.jsonl.x1y2.tmp"
    stray.write_text("torn")
    assert run.remove_stray_temps() == [stray] and not stray.exists()


def test_a_folder_without_best_pt_or_a_checkpoint_without_a_model_is_refused(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_text(run.config, "epochs: 2\n")
    with pytest.raises(CheckpointError, match="has no checkpoints/best.pt: it is not a run folder"):
        load_run_checkpoint(run.path)
    atomic_save({"model": {}}, run.best)
    with pytest.raises(CheckpointError, match="holds no model description"):
        load_run_checkpoint(run.path)


def test_an_interrupted_run_of_compare_or_tune_says_the_command_resumes_it_too(tmp_path):
    for folder, says in ((tmp_path / "cmp" / "runs" / "linear" / "seed0", True),
                         (tmp_path / "tune" / "trials" / "trial0003", True), (tmp_path / "mine", False)):
        run = RunDir(folder)
        run.write_text(run.config, "epochs: 3\n")
        atomic_save({"epoch": 1}, run.last)
        text = run.unfinished()
        assert text.startswith(f"{folder} has not finished (0 of 3 epochs done); `spinal-transfer train --resume "
                               f"{folder}` finishes it")
        assert ("rerunning the compare, reproduce or tune command that made it" in text) == says, text
