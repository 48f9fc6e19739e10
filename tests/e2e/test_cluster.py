"""Long runs on shared clusters: `reproduce` sharded by a scheduler, and the examples/ job scripts run as a
scheduler would run them (its environment variables set here, its commands `srun`/`scontrol` stood in for)."""
from __future__ import annotations

import csv
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import signal_after, write_digits_folder

from spinal_transfer.errors import EXIT_INTERRUPTED
from spinal_transfer.experiments import reproduce as rp

REPO = Path(__file__).resolve().parents[2]
TINY = dict(backbone="timm/test_resnet", weights="none", img_size=16, batch_size=64, workers=0, augment="none",
            optimizer="sgd", scheduler="none", device="cpu", log_interval=1000, deterministic=True,
            stages=[{"epochs": 2, "lr": 0.05}], limit_train_batches=2)
HEADS = {"default": dict(head="linear"), "spinal": dict(head="spinal", layer_width=8)}


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JOB_COMPLETION"))}
    return {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "PYTHONHASHSEED": "0", **extra}


def _recipes(folder: Path, data_name: str, **kw) -> Path:
    folder.mkdir(parents=True)
    for head, h in HEADS.items():
        (folder / f"digits_tiny_{head}.yaml").write_text(yaml.safe_dump({"data": data_name, **TINY, **h, **kw}))
    return folder


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cluster")
    write_digits_folder(root / "digits", digits=(0, 1, 2), size=16)
    return root


def _starts(out: Path) -> dict[str, int]:
    """How many times each run folder was started or resumed (the first line of every start in train.log)."""
    return {str(p.parent.relative_to(out)): p.read_text().count("run folder ") for p in out.rglob("train.log")}


# --- the shard arithmetic ------------------------------------------------------------------------

@pytest.mark.parametrize("spec, env, expected", [
    ("2/5", {}, (2, 5)),
    ("auto", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}, (3, 8)),
    ("auto", {"SLURM_ARRAY_TASK_ID": "13", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_STEP": "1",
              "SLURM_ARRAY_TASK_COUNT": "4"}, (3, 4)),
    ("auto", {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2",
              "SLURM_ARRAY_TASK_COUNT": "5"}, (2, 5)),
    ("auto/8", {"JOB_COMPLETION_INDEX": "7"}, (7, 8)),
])
def test_shard_comes_from_the_argument_or_the_scheduler(spec, env, expected):
    assert rp.shard_from_env(spec, env) == expected


@pytest.mark.parametrize("spec, env, needle", [("3/3", {}, "does not exist"), ("auto", {}, "give K/N"),
                                               ("auto", {"JOB_COMPLETION_INDEX": "1"}, "does not exist"),
                                               ("auto/3", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4"},
                                                "has 4 tasks")])
def test_a_wrong_shard_is_one_clear_error(spec, env, needle):
    with pytest.raises(rp.ReproduceError, match=needle):
        rp.shard_from_env(spec, env)


def test_shards_cover_every_run_once_and_balance_the_estimated_cost():
    costs = [50.0, 1, 7, 7, 20, 3, 3, 3, 40, 9, 2, 30]
    shards = [rp.shard_of(costs, k, 3) for k in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(len(costs)))
    loads = [sum(costs[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(costs[i] for s in shards for i in s if len(s) > 1)
    assert max(loads) < sum(costs) / 3 + max(costs) / 2            # the greedy bound, far from all-in-one


# --- three shards together = one sequential table ------------------------------------------------

@pytest.mark.slow      # three reproduce processes: ~1 min
def test_three_shards_started_together_run_everything_once_and_collect_the_sequential_table(data_root, tmp_path):
    recipes = _recipes(tmp_path / "recipes", "digits")
    base = ["reproduce", "--recipes", str(recipes / "*.yaml"), "--data-root", str(data_root), "--seeds", "2"]
    sharded = tmp_path / "sharded"
    procs = [subprocess.Popen([sys.executable, "-m", "spinal_transfer", *base, "--out", str(sharded),
                               "--shard", f"{k}/3"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for k in range(3)]
    results = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [r[1][-2000:] for r in results]
    starts = _starts(sharded)
    assert len(starts) == 4 and set(starts.values()) == {1}, starts        # every (recipe, seed) trained once
    collected = subprocess.run([sys.executable, "-m", "spinal_transfer", *base, "--out", str(sharded), "--collect"],
                               env=_env(), capture_output=True, text=True)
    assert collected.returncode == 0, collected.stderr[-2000:]

    sequential = tmp_path / "sequential"
    from spinal_transfer.cli import main

    assert main([*base, "--out", str(sequential)]) == 0
    for name in rp.RESULT_FILES:       # no timings in the tables: byte for byte
        assert (sharded / name).read_bytes() == (sequential / name).read_bytes(), name
    with open(sharded / "results.csv") as f:
        assert [r["finished_seeds"] for r in csv.DictReader(f)] == ["0;1", "0;1"]


def test_small_machine_overrides_are_recorded_and_refused_when_mixed(data_root, tmp_path):
    recipes = _recipes(tmp_path / "recipes", "digits")
    base = ["reproduce", "--recipes", str(recipes / "*_spinal.yaml"), "--data-root", str(data_root), "--seeds", "1",
            "--out", str(tmp_path / "out")]
    from spinal_transfer.cli import main

    assert main(base + ["--batch-size", "32", "--img-size", "24", "--epochs", "1"]) == 0
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert all("batch_size=32" in r["overrides"] and "img_size=24" in r["overrides"] for r in rows), rows
    assert main(base + ["--batch-size", "16", "--img-size", "24", "--epochs", "1"]) == 2      # mixed: refused


# --- the job scripts in examples/, run as the scheduler would run them ---------------------------

def _fake(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.slow
def test_slurm_array_script_runs_its_shard_passes_usr1_on_and_requeues(data_root, tmp_path):
    recipes = _recipes(tmp_path / "recipes", "digits", stages=[{"epochs": 40, "lr": 0.05}])
    fakes = tmp_path / "bin"
    _fake(fakes, "scontrol", f'echo "$@" >> {tmp_path / "scontrol.log"}')
    env = _env(SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_TASK_COUNT="1", SLURM_JOB_ID="4242",
               RECIPES=str(recipes / "*_spinal.yaml"), DATA_ROOT=str(data_root), SEEDS="1",
               OUT=str(tmp_path / "out"))
    env["PATH"] = f"{fakes}:{env['PATH']}"
    script = REPO / "examples" / "slurm" / "reproduce_array.sbatch"
    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "out" / "runs" / "digits_tiny_default" / "seed0" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)               # what `--signal=B:USR1@120` does
    output = job.communicate(timeout=600)[0]
    assert job.returncode == EXIT_INTERRUPTED, output[-3000:]
    assert "stopped: SIGUSR1 received" in output and "Traceback" not in output
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]


@pytest.mark.slow
def test_multinode_script_trains_under_srun_and_torchrun_and_a_requeue_resumes(data_root, tmp_path):
    fakes = tmp_path / "bin"
    _fake(fakes, "scontrol", 'if [ "$1" = show ]; then echo localhost; else echo "$@" >> "$SCONTROL_LOG"; fi')
    _fake(fakes, "srun", 'exec "$@"')
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, **HEADS["spinal"], "stages": [{"epochs": 2, "lr": 0.05}]}))
    env = _env(SLURM_JOB_ID="77", SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost", GPUS_PER_NODE="2",
               RDZV_PORT=str(29500 + os.getpid() % 1000), RECIPE=str(recipe), DATA=str(data_root / "digits"),
               OUT=str(tmp_path / "run"), SCONTROL_LOG=str(tmp_path / "scontrol.log"), OMP_NUM_THREADS="1")
    env["PATH"] = f"{fakes}:{env['PATH']}"
    script = REPO / "examples" / "slurm" / "train_multinode.sbatch"
    first = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "run" / "report.json").is_file() and "world size 2" in (tmp_path / "run" / "train.log").read_text()
    again = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "nothing to add" in again.stderr
    assert not (tmp_path / "scontrol.log").exists()                  # finished: never requeued


@pytest.mark.slow
def test_kubernetes_indexed_job_pods_together_finish_the_table(data_root, tmp_path):
    job = yaml.safe_load((REPO / "examples" / "kubernetes" / "reproduce-indexed-job.yaml").read_text())
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    ignored = spec["podFailurePolicy"]["rules"][0]
    assert ignored["action"] == "Ignore" and ignored["onExitCodes"]["values"] == [EXIT_INTERRUPTED]
    container = spec["template"]["spec"]["containers"][0]
    args = list(container["args"])
    n = spec["completions"]
    assert args[args.index("--shard") + 1] == f"auto/{n}"
    recipes = _recipes(tmp_path / "recipes", "digits")
    for flag, value in (("--recipes", str(recipes / "*.yaml")), ("--data-root", str(data_root)),
                        ("--out", str(tmp_path / "out")), ("--seeds", "2")):
        args[args.index(flag) + 1] = value
    command = [sys.executable, "-m", "spinal_transfer", *container["command"][1:], *args]
    for k in range(n):                              # the pods, one index each (here one after another)
        pod = subprocess.run(command, env=_env(JOB_COMPLETION_INDEX=str(k)), capture_output=True, text=True)
        assert pod.returncode == 0, (k, pod.stderr[-2000:])
    assert sorted(_starts(tmp_path / "out").values()) == [1, 1, 1, 1]
    collect = subprocess.run(command[:-2] + ["--collect"], env=_env(), capture_output=True, text=True)
    assert collect.returncode == 0, collect.stderr[-2000:]
    assert shlex.join(container["command"]).startswith("spinal-transfer reproduce")


# --- a signal while a run writes its report, or between runs ---------------------------------------

@pytest.mark.parametrize("line,finishing", [
    ("calibration: temperature", True),          # run 1 tests its best epoch and writes its report
    ("seed 0: starting", False),                 # run 1 logged, its train.run not yet holding the signals
])
def test_reproduce_stops_after_the_run_in_flight_on_a_signal(data_root, tmp_path, line, finishing):
    """The old code said 'finishing that (seconds), then exiting' for a SIGTERM during run 1's report, then
    trained run 2 and exited 0. Now: exit 75 with the usual line once run 1's report is written, run 2 never
    started. Timed on the log line, not on a sleep."""
    recipes = _recipes(tmp_path / "recipes", "digits")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "spinal_transfer", "reproduce", "--recipes", str(recipes / "*.yaml"),
           "--data-root", str(data_root), "--seeds", "1", "--out", str(out)]
    code, err = signal_after(cmd, line, signal.SIGTERM, _env())
    assert code == EXIT_INTERRUPTED, err[-3000:]
    assert ("finishing that (seconds), then exiting" in err) == finishing, err[-3000:]
    assert "stopped: SIGTERM received" in err and "the same reproduce command resumes it" in err, err[-3000:]
    assert "[2/2]" not in err and "Traceback" not in err
    assert len(list(out.rglob("report.json"))) == (1 if finishing else 0)
