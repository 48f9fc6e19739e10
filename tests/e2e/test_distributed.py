"""Distributed training under torchrun: 2 CPU processes (gloo) on the digits folder.

The backbone is timm's test_vit (LayerNorm, no BatchNorm) with a dropout-free spinal head, weights
from random init, no augmentation, deterministic: two processes with per-device batch B must then
train exactly what one process with batch 2B trains (EpochShuffle hands rank r the positions
r, r+2, ... of the epoch order, so the ranks' step-k batches together are the 1-process step-k
batch, and DDP's gradient average equals the gradient of the mean loss over that global batch).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SIGNAL_AT_STEP, cli_flags, truncated_jpeg

from spinal_transfer.config import TrainConfig
from spinal_transfer.evaluation.interpret import read_predictions
from spinal_transfer.runs.checkpoint import load_checkpoint
from spinal_transfer.training.train import run

PER_DEVICE_BATCH = 16
EPOCHS = 3
SMALL = dict(backbone="timm/test_vit", weights="none", head="spinal", head_preset="resnet", layer_width=16,
             img_size=32, workers=0, augment="none", optimizer="sgd", lr=0.05, scheduler="none",
             deterministic=True, device="cpu", limit_train_batches=3, log_interval=1, epochs=EPOCHS, seed=3)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*train_args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
            str(_free_port()), "-m", "spinal_transfer", "train", *train_args]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun's process group and each worker's: a crash of the whole job."""
    pids = [proc.pid] + _descendants(proc.pid)
    for pid in pids:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    proc.wait()
    deadline = time.time() + 30
    while any(_alive(p) for p in pids[1:]) and time.time() < deadline:
        time.sleep(0.05)


def _run(cmd: list[str], log: Path, timeout: float = 600) -> None:
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            raise
    assert rc == 0, log.read_text()[-4000:]


def _count(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.png"))


def _one_process(data: Path, out: Path, **options) -> dict:
    """The run that two processes with batch B must equal: one process, global batch 2B, the same seed, run
    here with one thread like each worker (oversubscribed threads on busy cores are many times slower); the
    global determinism flags are restored afterwards."""
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(TrainConfig(**{**SMALL, **options, "data": str(data), "out": str(out),
                                  "batch_size": 2 * PER_DEVICE_BATCH}))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])


@pytest.fixture(scope="module")
def data(digits_folder, tmp_path_factory) -> Path:
    """The digits with one test image that passes the folder scan but cannot be decoded."""
    import shutil

    folder = tmp_path_factory.mktemp("ddp-data") / "digits"
    shutil.copytree(digits_folder, folder)
    truncated_jpeg(folder / "test" / "digit_3" / "cut.jpg")
    return folder


@pytest.fixture(scope="module")
def ddp_run(data, tmp_path_factory) -> dict:
    """A 2-process run killed (SIGKILL to torchrun and its workers) right after its first checkpoint,
    then resumed under torchrun to the end, and the same run uninterrupted. Every torchrun launch costs
    three fresh interpreters importing torch, most of this file's time on two busy cores."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    log = out.parent / "killed.log"
    with log.open("w") as f:
        proc = subprocess.Popen(_torchrun(*cli_flags(data=data, out=out, batch_size=PER_DEVICE_BATCH, **SMALL)),
                                env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        last = out / "checkpoints" / "last.pt"
        deadline = time.time() + 400
        try:
            while not last.exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
        finally:
            _kill_tree(proc)
    assert last.exists(), "the run was killed before it saved its first epoch:\n" + log.read_text()[-3000:]
    killed = {"progress": load_checkpoint(last)["progress"], "report": (out / "report.json").exists(),
              "metrics": (out / "metrics.jsonl").read_text().splitlines()}
    _run(_torchrun("--resume", str(out)), out.parent / "resume.log")
    whole = out.parent / "uninterrupted"
    _run(_torchrun(*cli_flags(data=data, out=whole, batch_size=PER_DEVICE_BATCH, **SMALL)), out.parent / "whole.log")
    return {"out": out, "killed": killed, "whole": whole}


@pytest.mark.slow      # torchrun twice: ~1.5 min
def test_killed_two_process_run_resumes_to_completion(ddp_run):
    out, killed = ddp_run["out"], ddp_run["killed"]
    assert killed["progress"]["epoch"] < EPOCHS, "the run finished before it could be killed"
    assert not killed["report"]
    assert len(killed["metrics"]) == killed["progress"]["epoch"]
    assert (out / "report.json").is_file() and (out / "test_predictions.csv").is_file()
    log = (out / "train.log").read_text()
    assert re.search(r"\(resuming (after epoch \d+|in epoch \d+ at batch \d+)\)", log)
    assert log.count("world size 2;") == 2
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))   # every epoch exactly once
    assert rows[0] == json.loads(killed["metrics"][0])                 # the epoch logged before the kill, kept
    assert not list(out.rglob("*.tmp")), "a temporary file of an atomic write was left behind"
    # killed and resumed, the weights are those of the uninterrupted 2-process run, bit for bit
    a, b = load_checkpoint(out / "checkpoints" / "last.pt"), load_checkpoint(ddp_run["whole"] / "checkpoints" / "last.pt")
    assert a["progress"] == b["progress"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_an_undecodable_test_image_met_by_any_rank_is_listed_and_paths_stay_exact(ddp_run, data):
    out = ddp_run["out"]
    cut = data / "test" / "digit_3" / "cut.jpg"
    assert [ln.split("\t")[0] for ln in (out / "skipped_files.txt").read_text().splitlines()] == [str(cut)]
    assert json.loads((out / "report.json").read_text())["num_skipped_files"] == 1
    rows = read_predictions(out / "test_predictions.csv")
    assert [r.path for r in rows] == sorted(str(p) for p in (data / "test").rglob("*.png"))


def test_two_processes_count_every_sample_once_and_match_one_process(ddp_run, data, tmp_path):
    out = ddp_run["out"]
    log = (out / "train.log").read_text()
    assert f"world size 2; batch {PER_DEVICE_BATCH} per device, global batch {2 * PER_DEVICE_BATCH}" in log
    assert "not scaled" in log
    report = json.loads((out / "report.json").read_text())
    for split in ("val", "test"):      # 359 and 360 images: shards of unequal length, no padding counted
        assert report[split]["num_samples"] == _count(data / split), split

    one = _one_process(data, tmp_path / "one")
    a, b = load_checkpoint(out / "checkpoints" / "last.pt"), load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    assert a["progress"] == b["progress"]
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], rtol=0, atol=1e-5), (k, (v - b["model"][k]).abs().max())
    # Gathered predictions come back in sample order: the per-image CSVs agree line by line.
    two_rows = (out / "test_predictions.csv").read_text().splitlines()
    one_rows = (tmp_path / "one" / "test_predictions.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in two_rows] == [r.split(",")[:2] for r in one_rows]
    assert sum(x.split(",")[2] != y.split(",")[2] for x, y in zip(two_rows, one_rows)) <= 1   # a near-tie may flip one
    assert report["best_epoch"] == one["best_epoch"]
    rows2, rows1 = ([json.loads(r) for r in (d / "metrics.jsonl").read_text().splitlines()] for d in (out, tmp_path / "one"))
    assert [r["train_loss"] for r in rows2] == pytest.approx([r["train_loss"] for r in rows1], abs=1e-5)   # all ranks'
    assert report["val"]["loss"] == pytest.approx(one["val"]["loss"], abs=1e-4)


@pytest.mark.slow      # torchrun twice: ~40 s
def test_a_signal_to_one_rank_stops_both_at_the_same_step_and_resume_is_exact(ddp_run, data, tmp_path):
    """SIGTERM reaches rank 1 only, after a random optimizer step: both ranks agree to stop after it, rank 0
    writes last.pt, every worker exits with 75, and the resumed run ends bit-identical to the uninterrupted one."""
    harness = tmp_path / "signal_at_step.py"
    harness.write_text(SIGNAL_AT_STEP)
    k = int(np.random.default_rng().integers(2, EPOCHS * SMALL["limit_train_batches"]))
    out = tmp_path / "signalled"
    cmd = _torchrun(*cli_flags(data=data, out=out, batch_size=PER_DEVICE_BATCH, **SMALL))
    at = cmd.index("spinal_transfer") - 1
    cmd[at:at + 2] = [str(harness), str(k), "TERM", "1", "1"]           # the script instead of -m spinal_transfer
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "exitcode  : 75" in res.stderr + res.stdout, (res.stderr + res.stdout)[-3000:]
    assert "stopped: SIGTERM received" in res.stderr
    assert load_checkpoint(out / "checkpoints" / "last.pt")["progress"]["step"] == k
    _run(_torchrun("--resume", str(out)), tmp_path / "resume.log")
    a = load_checkpoint(out / "checkpoints" / "last.pt")
    b = load_checkpoint(ddp_run["whole"] / "checkpoints" / "last.pt")
    assert a["progress"] == b["progress"]
    for key, v in a["model"].items():
        assert torch.equal(v, b["model"][key]), key


@pytest.mark.slow      # torchrun once and one process: ~40 s
def test_early_stopping_under_torchrun_stops_both_ranks_where_one_process_stops(data, tmp_path):
    """Each rank scores only its shard of val; the stop is decided on the gathered metric, so both ranks end
    the stage after the same epoch (a rank that trained on alone would wait in DDP's all-reduce until the
    timeout fails this test), and it is the epoch a single process with the global batch stops at."""
    opts = {"epochs": 6, "early_stop_patience": 1, "early_stop_min_delta": 0.02, "select_metric": "top1"}
    out = tmp_path / "two"
    _run(_torchrun(*cli_flags(data=data, out=out, batch_size=PER_DEVICE_BATCH, **{**SMALL, **opts})),
         tmp_path / "two.log", timeout=300)
    two = json.loads((out / "report.json").read_text())
    one = _one_process(data, tmp_path / "one", **opts)
    stops = [(x["stage"], x["ran"], x["epoch"]) for x in two["early_stops"]]
    assert stops and stops == [(x["stage"], x["ran"], x["epoch"]) for x in one["early_stops"]]
    assert two["epochs_trained"] == one["epochs_trained"] == stops[0][2] < opts["epochs"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == two["epochs_trained"]
    assert "stage 1 stopped early after epoch" in (out / "train.log").read_text()


@pytest.mark.slow      # torchrun once: ~40 s
def test_every_rank_evaluates_with_the_batchnorm_statistics_rank_0_saves(data, tmp_path):
    """After an epoch each rank's BatchNorm running statistics carry its own last batch (DDP broadcasts rank 0's
    only at the start of a forward): the val shards were evaluated with two sets, and the epoch's val metrics
    belonged to no saved model. The best epoch's row must equal what report.json measures from best.pt."""
    out = tmp_path / "bn"
    flags = {**SMALL, "backbone": "timm/test_resnet", "augment": "light", "epochs": 2}
    _run(_torchrun(*cli_flags(data=data, out=out, batch_size=PER_DEVICE_BATCH, **flags)), tmp_path / "bn.log")
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    best = next(r for r in rows if r["epoch"] == report["best_epoch"])
    assert best["val"]["top1"] == report["val"]["top1"]
    assert best["val"]["loss"] == pytest.approx(report["val"]["loss"], abs=1e-6)
