"""--log-to: a small real training loop logs through the Tracker to TensorBoard, MLflow (SQLite beside the
runs) and W&B (offline), and each store is read back with that tool's own reader; an unreachable MLflow
server, a backend failing mid-run and a missing package each cost one warning and never the run."""
from __future__ import annotations

import json
import logging
import math
import struct
import sys
import time
from pathlib import Path

import pytest
import torch

from spinal_transfer.evaluation.plots import plot_curves
from spinal_transfer.utils.tracking import (
    INSTALL_HINT,
    Backend,
    Tracker,
    epoch_metrics,
    flatten_params,
    parse_log_to,
    summary_metrics,
)

CONFIG = {"backbone": "timm/resnet18", "lr": 0.05, "stages": [{"epochs": 2, "lr": 0.05}, {"epochs": 1, "lr": 0.005}],
          "mean": [0.485, 0.456, 0.406], "clip_grad": None, "freeze_backbone": False, "epochs": 3, "data": "/data/x"}
EPOCHS, STEPS_PER_EPOCH = 3, 6


def train(tracker: Tracker, run_dir: Path) -> dict:
    """A real (tiny) training loop wired the way train.run should be: params once, a step hook, an
    epoch hook with the metrics.jsonl row, the summary and artifacts at the end."""
    torch.manual_seed(0)
    x = torch.randn(240, 8)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    model = torch.nn.Linear(8, 2)
    tracker.log_params(CONFIG)
    rows, steps, step = [], [], 0
    for epoch in range(1, EPOCHS + 1):
        lr = 0.05 if epoch <= 2 else 0.005
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        t0, total = time.perf_counter(), 0.0
        for idx in torch.arange(240).split(240 // STEPS_PER_EPOCH):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            steps.append((step, loss.item(), lr))
            tracker.log_step(step, {"train_loss": loss.item(), "lr": lr})
            total += loss.item()
        with torch.no_grad():
            out = model(x)
            val_loss = float(torch.nn.functional.cross_entropy(out, y))
            top1 = float((out.argmax(1) == y).float().mean())
        row = {"epoch": epoch, "stage": 1 if epoch <= 2 else 2, "lr": lr, "train_loss": total / STEPS_PER_EPOCH,
               "train_images_per_s": 240 / (time.perf_counter() - t0), "frozen": False,
               "seconds": time.perf_counter() - t0,
               "val": {"top1": top1, "top5": 1.0, "balanced_accuracy": top1, "macro_f1": top1, "loss": val_loss}}
        rows.append(row)
        tracker.log_epoch(epoch, row)
    best = max(rows, key=lambda r: r["val"]["top1"])
    report = {"best_epoch": best["epoch"], "selected_on": "val", "classes": ["neg", "pos"], "num_skipped_files": 0,
              "val": dict(best["val"], num_samples=240), "test": dict(best["val"], num_samples=240),
              "stopped": {"epoch": 3, "reason": "early stopping: val top-1 did not improve"}}
    (run_dir / "report.json").write_text(json.dumps(report))
    plots = plot_curves(rows, run_dir / "plots", best_epoch=best["epoch"])
    tracker.log_summary(report)
    tracker.log_artifacts([run_dir / "report.json", plots["curves.png"], run_dir / "missing.txt"])
    tracker.close()
    return {"rows": rows, "steps": steps, "report": report}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One run logged to all three backends (W&B offline: no credentials, WANDB_MODE unset)."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("home")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        mp.delenv(var, raising=False)
    mp.setenv("NETRC", str(home / "netrc"))              # no W&B login on this machine, whatever $HOME has
    mp.setenv("WANDB_CONFIG_DIR", str(home / "wandb-config"))
    runs = tmp_path_factory.mktemp("runs")
    run_dir = runs / "pets-spinal"
    run_dir.mkdir()
    tracker = Tracker.create("tensorboard,mlflow,wandb", run_dir, experiment="issue15")
    assert tracker.active == ["tensorboard", "mlflow", "wandb"]
    out = train(tracker, run_dir)
    yield {"run_dir": run_dir, "runs": runs, **out}
    mp.undo()


def test_tensorboard_scalars_read_back(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tracked["run_dir"] / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    val = [(e.step, e.value) for e in ea.Scalars("val/top1")]
    assert val == [(r["epoch"], pytest.approx(r["val"]["top1"])) for r in tracked["rows"]]
    assert [e.value for e in ea.Scalars("train/loss")] == pytest.approx([r["train_loss"] for r in tracked["rows"]])
    assert [e.value for e in ea.Scalars("epoch/lr")] == pytest.approx([0.05, 0.05, 0.005])
    steps = [(e.step, e.value) for e in ea.Scalars("step/train_loss")]
    assert steps == [(s, pytest.approx(v)) for s, v, _ in tracked["steps"]]
    assert len(steps) == EPOCHS * STEPS_PER_EPOCH
    assert ea.Scalars("final/test/top1")[0].value == pytest.approx(tracked["report"]["test"]["top1"])
    assert "plots/curves" in ea.Tags()["images"]
    # the hparams table: every flattened config key is there
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = ea.PluginTagToContent("hparams")
    infos = [plugin_data_pb2.HParamsPluginData.FromString(v) for v in content.values()]
    hp = next(i.session_start_info.hparams for i in infos if i.HasField("session_start_info"))
    assert set(hp) == set(flatten_params(CONFIG))
    assert hp["stages"].string_value == '[{"epochs":2,"lr":0.05},{"epochs":1,"lr":0.005}]'


def test_mlflow_metrics_and_params_read_back(tracked):
    from mlflow.tracking import MlflowClient

    db = tracked["runs"] / "mlruns.db"
    assert db.is_file(), "the default store is a SQLite file beside the run folders"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("issue15")
    (run,) = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'pets-spinal'")
    assert run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in flatten_params(CONFIG).items()}
    assert run.data.params["mean"] == "[0.485,0.456,0.406]" and run.data.params["clip_grad"] == "None"
    hist = client.get_metric_history(run.info.run_id, "val/top1")
    assert sorted((m.step, m.value) for m in hist) == [(r["epoch"], pytest.approx(r["val"]["top1"]))
                                                      for r in tracked["rows"]]
    steps = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "step/train_loss"))
    assert steps == [(s, pytest.approx(v)) for s, v, _ in tracked["steps"]]
    assert run.data.metrics["final/best_epoch"] == tracked["report"]["best_epoch"]
    assert run.data.tags["stop_reason"] == "early stopping: val top-1 did not improve"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)} | \
        {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"report.json", "plots/curves.png"} <= arts
    assert Path(exp.artifact_location.removeprefix("file://")) == tracked["runs"] / "mlartifacts"
    assert any((tracked["runs"] / "mlartifacts").rglob("curves.png"))


def read_wandb_log(path: Path) -> list:
    """The records of a .wandb file (LevelDB log framing: 7-byte file header, 32 KiB blocks, records
    split FULL/FIRST/MIDDLE/LAST), decoded with W&B's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, out, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(payload)
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            out.append(pending + payload)
    return [pb.Record.FromString(r) for r in out]


def test_wandb_offline_run_read_back(tracked):
    runs = list((tracked["run_dir"] / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "W&B must run offline under the run folder when nobody is logged in"
    (log_file,) = runs[0].glob("run-*.wandb")
    records = read_wandb_log(log_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == "pets-spinal" and run.project == "issue15"
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    assert {k: config[k] for k in flatten_params(CONFIG)} == flatten_params(CONFIG)
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    epochs = [(h["epoch"], h["val/top1"]) for h in history if "val/top1" in h]
    assert epochs == [(r["epoch"], pytest.approx(r["val"]["top1"])) for r in tracked["rows"]]
    steps = [(h["optimizer_step"], h["step/train_loss"]) for h in history if "step/train_loss" in h]
    assert steps == [(s, pytest.approx(v)) for s, v, _ in tracked["steps"]]
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    assert summary["final/test/top1"] == pytest.approx(tracked["report"]["test"]["top1"])
    assert "exit" in kinds
    assert (runs[0] / "files" / "report.json").exists() and (runs[0] / "files" / "plots" / "curves.png").exists()


def test_unreachable_mlflow_server_warns_once_and_training_finishes(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    caplog.set_level(logging.WARNING, logger="spinal_transfer.utils.tracking")
    t0 = time.perf_counter()
    tracker = Tracker.create(["tensorboard", "mlflow"], run_dir, tracking_uri="http://127.0.0.1:9")
    out = train(tracker, run_dir)
    assert time.perf_counter() - t0 < 60
    mine = [r for r in caplog.records if r.name == "spinal_transfer.utils.tracking"]
    assert len(mine) == 1 and "mlflow" in mine[0].getMessage() and "127.0.0.1:9" in mine[0].getMessage()
    assert len(out["rows"]) == EPOCHS
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"))
    ea.Reload()
    assert len(ea.Scalars("val/top1")) == EPOCHS        # the other backend kept logging


class _DiesInEpoch2(Backend):
    name = "flaky"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def log_epoch(self, epoch, metrics):
        self.calls.append(f"epoch {epoch}")
        if epoch == 2:
            raise ConnectionError("server went away")

    def log_step(self, step, values):
        self.calls.append("step")

    def close(self, status):
        self.calls.append(f"close {status}")


def test_backend_failing_mid_run_is_switched_off_with_one_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="spinal_transfer.utils.tracking")
    flaky = _DiesInEpoch2()
    tracker = Tracker([flaky])
    out = train(tracker, tmp_path)
    assert len(out["rows"]) == EPOCHS
    assert [c for c in flaky.calls if c != "step"] == ["epoch 1", "epoch 2", "close FAILED"]
    assert flaky.calls.count("step") == 2 * STEPS_PER_EPOCH            # nothing after the failure
    mine = [r.getMessage() for r in caplog.records if r.name == "spinal_transfer.utils.tracking"]
    assert len(mine) == 1 and "flaky failed in log_epoch (ConnectionError: server went away)" in mine[0]
    assert tracker.active == []


def test_missing_package_names_the_extra(tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)          # import wandb -> ImportError
    caplog.set_level(logging.WARNING, logger="spinal_transfer.utils.tracking")
    tracker = Tracker.create("wandb", tmp_path)
    assert tracker.active == []
    train(tracker, tmp_path)
    mine = [r.getMessage() for r in caplog.records if r.name == "spinal_transfer.utils.tracking"]
    assert len(mine) == 1 and INSTALL_HINT in mine[0] and "wandb" in mine[0]


def test_only_the_enabled_rank_logs(tmp_path):
    tracker = Tracker.create("tensorboard,mlflow", tmp_path / "run", enabled=False)
    assert tracker.active == []
    tracker.log_epoch(1, {"epoch": 1, "val": {"top1": 1.0}})
    tracker.close()
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlruns.db").exists()


def test_parse_and_flatten():
    assert parse_log_to("tensorboard, MLflow,tensorboard") == ["tensorboard", "mlflow"]
    assert parse_log_to(None) == [] and parse_log_to(["wandb,mlflow"]) == ["wandb", "mlflow"]
    with pytest.raises(ValueError, match="tensorbord"):
        parse_log_to("tensorbord")
    assert flatten_params({"a": {"b": [1, 2], "c": None}, "d": 1.5, "e": True}) == \
        {"a.b": "[1,2]", "a.c": "None", "d": 1.5, "e": True}
    row = {"epoch": 4, "stage": 2, "lr": 0.1, "train_loss": 0.5, "frozen": True, "new_thing": 7,
           "val": {"top1": 0.9, "loss": math.nan}}
    m = epoch_metrics(row)
    assert m["train/loss"] == 0.5 and m["epoch/frozen"] == 1.0 and m["epoch/new_thing"] == 7.0
    assert m["val/top1"] == 0.9 and "epoch" not in m
    assert summary_metrics({"best_epoch": 3, "test": {"top1": 0.8, "per_class": {}}}) == \
        {"final/best_epoch": 3.0, "final/test/top1": 0.8}


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    """A resume logs into the MLflow run the folder started (RUN/tracking.json), not a second run holding only
    the epochs after the interruption; a param the resume changed (--epochs) is a tag, since MLflow keeps the
    first value of a param."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from spinal_transfer.utils.tracking import MLflowBackend

    uri, run_dir = f"sqlite:///{tmp_path / 'ml.db'}", tmp_path / "runs" / "r"
    first = MLflowBackend(run_dir, "r", uri, "resume")
    first.log_params({"epochs": 2, "lr": 0.1})
    first.log_epoch(1, {"val/top1": 0.5})
    first.close("KILLED")
    again = MLflowBackend(run_dir, "r", uri, "resume")
    assert again.run_id == first.run_id
    again.log_params({"epochs": 4, "lr": 0.1})
    again.log_epoch(2, {"val/top1": 0.75})
    again.close("FINISHED")
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params == {"epochs": "2", "lr": "0.1"}
    assert run.data.tags["resumed_with.epochs"] == "4"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/top1")] == [(1, 0.5), (2, 0.75)]


def test_a_copied_run_folder_gets_its_own_mlflow_run_and_a_moved_one_continues(tmp_path, caplog):
    """A run folder copied (tracking.json with it) and resumed would log its epochs into the original's MLflow run:
    while the original folder is there and names that run, the copy gets a new MLflow run, said once; a folder moved
    as a whole (the original gone) continues its run, whose run_dir tag follows it."""
    pytest.importorskip("mlflow")
    import shutil

    from mlflow.tracking import MlflowClient

    from spinal_transfer.utils.tracking import MLflowBackend

    uri, original = f"sqlite:///{tmp_path / 'ml.db'}", tmp_path / "runs" / "r"
    first = MLflowBackend(original, "r", uri, "copies")
    first.log_epoch(1, {"val/top1": 0.5})
    first.close("KILLED")
    shutil.copytree(original, tmp_path / "runs" / "copy")
    copy = MLflowBackend(tmp_path / "runs" / "copy", "copy", uri, "copies")
    assert copy.run_id != first.run_id and "this folder is a copy" in caplog.text
    copy.log_epoch(2, {"val/top1": 0.9})
    copy.close("FINISHED")
    client = MlflowClient(tracking_uri=uri)
    assert [m.value for m in client.get_metric_history(first.run_id, "val/top1")] == [0.5]   # the original's alone
    assert MLflowBackend(tmp_path / "runs" / "copy", "copy", uri, "copies").run_id == copy.run_id  # its own now
    moved = tmp_path / "moved"
    original.rename(moved)
    again = MLflowBackend(moved, "r", uri, "copies")
    assert again.run_id == first.run_id
    assert client.get_run(first.run_id).data.tags["run_dir"] == str(moved.resolve())


def test_the_destination_a_driver_gave_a_run_travels_with_it(tmp_path):
    """RUN/tracking.json keeps the store folder and name compare or reproduce gave a run (relative to the run
    folder: an OUT moved as a whole keeps its store) beside its MLflow run id; a run of its own records none."""
    from spinal_transfer.utils.tracking import RUN_ID_FILE, record_destination, recorded_destination

    out = tmp_path / "cmp"
    run_dir = out / "runs" / "spinal" / "seed1"
    assert recorded_destination(run_dir) is None
    run_dir.mkdir(parents=True)
    (run_dir / RUN_ID_FILE).write_text(json.dumps({"mlflow_run_id": "abc"}))
    record_destination(run_dir, out, "spinal/seed1")
    assert recorded_destination(run_dir) == (out.resolve(), "spinal/seed1")
    assert json.loads((run_dir / RUN_ID_FILE).read_text())["mlflow_run_id"] == "abc"
    moved = tmp_path / "moved"
    out.rename(moved)
    assert recorded_destination(moved / "runs" / "spinal" / "seed1") == (moved.resolve(), "spinal/seed1")
    (moved / "runs" / "spinal" / "seed1" / RUN_ID_FILE).write_text("{damaged")
    assert recorded_destination(moved / "runs" / "spinal" / "seed1") is None


def test_a_moved_store_gets_no_artifact_written_to_its_old_place(tmp_path, caplog, monkeypatch):
    """MLflow keeps the absolute artifact folder of an experiment and its runs in the database: after OUT is moved
    as a whole, a resumed run (and a new one) would write its artifacts to the old place, re-creating the folder
    moved away or failing on the file standing there (mlflow off, the run FAILED). They are not logged there: one
    warning, and the metrics still go to the moved store, in the same MLflow run, which ends FINISHED."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    old, new = tmp_path / "cmp7", tmp_path / "cmp7m"
    run_dir = old / "runs" / "linear" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "report.json").write_text("{}")
    first = Tracker.create("mlflow", run_dir, run_name="linear/seed0", experiment="moved", store_root=old)
    first.log_epoch(1, {"epoch": 1, "val": {"top1": 0.5}})
    first.log_artifacts([run_dir / "report.json"])
    first.close("KILLED")
    old.rename(new)
    old.write_text("the user's file")
    caplog.set_level(logging.WARNING, logger="spinal_transfer.utils.tracking")
    run_dir = new / "runs" / "linear" / "seed0"
    again = Tracker.create("mlflow", run_dir, run_name="linear/seed0", experiment="moved", store_root=new)
    again.log_epoch(2, {"epoch": 2, "val": {"top1": 0.75}})
    again.log_artifacts([run_dir / "report.json"])
    again.log_artifacts([run_dir / "report.json"])
    assert again.active == ["mlflow"]
    again.close()
    assert old.read_text() == "the user's file"
    mine = [r.getMessage() for r in caplog.records if r.name == "spinal_transfer.utils.tracking"]
    assert len(mine) == 1 and f"moved from {old.resolve()}" in mine[0] and "not logged" in mine[0]
    client = MlflowClient(tracking_uri=f"sqlite:///{new.resolve() / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("moved").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "linear/seed0"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/top1")] == [(1, 0.5), (2, 0.75)]
    old.unlink()                    # a new run in the moved store: the experiment's old place is not re-created
    fresh = new / "runs" / "spinal" / "seed0"
    fresh.mkdir(parents=True)
    (fresh / "report.json").write_text("{}")
    with Tracker.create("mlflow", fresh, run_name="spinal/seed0", experiment="moved", store_root=new) as tracker:
        tracker.log_epoch(1, {"epoch": 1, "val": {"top1": 0.25}})
        tracker.log_artifacts([fresh / "report.json"])
    assert not old.exists()
    runs = client.search_runs([client.get_experiment_by_name("moved").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]


@pytest.mark.parametrize("damaged", ['{"store_root": "../../..", "run_na', "[1, 2]"])
def test_a_damaged_record_is_set_aside_with_one_warning(tmp_path, caplog, monkeypatch, damaged):
    """A damaged RUN/tracking.json was read as absent without a word: a `train --resume` of a compare run opened
    a second MLflow store beside the run and overwrote the file. Now one warning names it and says what happens
    (a new MLflow run in the store beside the run folder, the file kept as tracking.json.damaged), as it does."""
    pytest.importorskip("mlflow")
    from types import SimpleNamespace

    from spinal_transfer.runs.rundir import RunDir
    from spinal_transfer.training.train import _tracker
    from spinal_transfer.utils.tracking import RUN_ID_FILE, read_record

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "cmp" / "runs" / "linear" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / RUN_ID_FILE).write_text(damaged)
    caplog.set_level(logging.WARNING, logger="spinal_transfer.utils.tracking")
    with _tracker(SimpleNamespace(log_to="", tracking_uri=None, experiment="damaged"), RunDir(run_dir), None):
        pass                                                     # untracked: the record is not read, nor moved
    assert (run_dir / RUN_ID_FILE).read_text() == damaged and not caplog.records
    cfg = SimpleNamespace(log_to="mlflow", tracking_uri=None, experiment="damaged")
    with _tracker(cfg, RunDir(run_dir), None) as tracker:
        assert tracker.active == ["mlflow"]
        tracker.log_epoch(1, {"epoch": 1, "val": {"top1": 0.5}})
    assert read_record(tmp_path / "elsewhere") == {}             # a missing one is silent
    mine = [r.getMessage() for r in caplog.records if r.name == "spinal_transfer.utils.tracking"]
    assert len(mine) == 1 and str(run_dir / RUN_ID_FILE) in mine[0] and "damaged" in mine[0]
    assert "beside the run folder" in mine[0] and "kept as tracking.json.damaged" in mine[0]
    assert (run_dir / "tracking.json.damaged").read_text() == damaged
    assert (run_dir.parent / "mlruns.db").is_file()          # the store beside it, as the warning says
    assert set(json.loads((run_dir / RUN_ID_FILE).read_text())) == {"mlflow_run_id"}


_START_TOGETHER = """
import sys, time
from pathlib import Path
root, i = Path(sys.argv[1]), sys.argv[2]
from spinal_transfer.utils.tracking import MLflowBackend
(root / f"ready{i}").touch()
while not (root / "go").exists():
    time.sleep(0.001)
backend = MLflowBackend(root / f"run{i}", f"run{i}", None, None)
print(backend.run_id)
"""


@pytest.mark.slow  # ~15 s: four processes import MLflow
def test_processes_starting_on_one_new_mlflow_store_all_track(tmp_path):
    """Two compare workers sharing OUT start their first runs at once on a new OUT/mlruns.db: MLflow creates the
    schema without a lock, so all but one failed ("table experiments already exists") and ran untracked. Four
    processes released together: each gets its own MLflow run in the one store."""
    import subprocess

    procs = [subprocess.Popen([sys.executable, "-c", _START_TOGETHER, str(tmp_path), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(4)) and time.time() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-500:] for _, err in outs]
    ids = {out.strip() for out, _ in outs}
    assert len(ids) == 4
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    assert {client.get_run(r).info.run_name for r in ids} == {f"run{i}" for i in range(4)}
