"""Fine-tuning end to end on real data (scikit-learn's digits written out as PNG folders)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SIGNAL_AT_STEP, TINY, tiny_cfg, write_digits_folder

from spinal_transfer.cli import main as cli
from spinal_transfer.config import TrainConfig
from spinal_transfer.errors import NonFiniteLoss
from spinal_transfer.evaluation.evaluate import evaluate
from spinal_transfer.runs.checkpoint import load_checkpoint
from spinal_transfer.training.train import run
from spinal_transfer.utils.runtime import tune_cpu_allocator

EPOCHS = 6


@pytest.fixture(scope="module")
def trained(digits_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "digits"
    # A constant lr of 0.05 leaves BatchNorm's running statistics behind the weights for the first
    # epochs (val top-1 swings by 30 points between epochs 2 and 4); cosine decay settles them.
    report = run(tiny_cfg(digits_folder, out, epochs=EPOCHS, scheduler="cosine"))
    return out, report


def test_digits_end_to_end_reaches_90_percent(trained, digits_folder):
    out, report = trained
    assert report["test"]["top1"] >= 0.90, report["test"]
    for name in ("config.yaml", "metrics.jsonl", "report.json", "classes.json", "train.log",
                 "checkpoints/best.pt", "checkpoints/last.pt", "plots/loss.png", "plots/accuracy.png",
                 "plots/confusion_test.png", "test_predictions.csv"):
        assert (out / name).is_file(), name
    rep = json.loads((out / "report.json").read_text())
    for split in ("val", "test"):
        for k in ("top1", "top5", "balanced_accuracy", "macro_f1"):
            assert 0.0 <= rep[split][k] <= 1.0
        assert rep[split]["loss"] > 0
    assert rep["test"]["num_samples"] == sum(1 for _ in (digits_folder / "test").rglob("*.png"))
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))                      # numbered from 1
    assert rep["best_epoch"] == min(rows, key=lambda r: r["val"]["loss"])["epoch"]     # chosen on val loss
    assert f"best epoch {rep['best_epoch']} " in (out / "train.log").read_text()
    # the resolved config is complete and reloads into the same dataclass
    cfg = TrainConfig.from_yaml(out / "config.yaml")
    assert cfg.img_size == 32 and cfg.mean is not None and cfg.backbone == "timm/test_resnet"
    # checkpoints hold only tensors and plain values
    ckpt = load_checkpoint(out / "checkpoints" / "best.pt")
    assert ckpt["classes"] == [f"digit_{k}" for k in range(10)] and ckpt["epoch"] == rep["best_epoch"]


def test_evaluate_reproduces_report(trained, digits_folder, capsys):
    out, report = trained
    m = evaluate(out / "checkpoints" / "best.pt", str(digits_folder), "test", "cpu").metrics
    for k in ("top1", "top5", "balanced_accuracy", "macro_f1"):
        assert m[k] == pytest.approx(report["test"][k], abs=1e-9)
    assert m["loss"] == pytest.approx(report["calibration"]["test"]["nll_after"], rel=1e-5)    # softmax(logits / T)
    plain = evaluate(out / "checkpoints" / "best.pt", str(digits_folder), "test", "cpu", calibrated=False).metrics
    assert plain["loss"] == pytest.approx(report["test"]["loss"], rel=1e-5)
    assert cli(["evaluate", str(out), "--split", "test", "--device", "cpu"]) == 0      # --data: the run's own
    captured = capsys.readouterr()
    assert json.loads(captured.out)["top1"] == pytest.approx(report["test"]["top1"])
    assert "the run's recorded test split (360 images" in captured.err


def test_evaluate_on_another_folder_of_the_runs_own_images_warns(trained, digits_folder, tmp_path, caplog):
    """QA 28: `evaluate RUN --data X` where X holds copies of the run's training images scored them with no word.
    Byte-identical copies of its train or val images are counted in one warning; new images get none."""
    out, _ = trained
    flat = tmp_path / "flat"
    for split, n in (("train", 3), ("test", 2)):          # 3 train copies a class, 2 test images a class
        for d in sorted((digits_folder / split).iterdir()):
            for f in sorted(d.iterdir())[:n]:
                (flat / d.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(f, flat / d.name / f"{split}_{f.name}")
    with caplog.at_level("WARNING", logger="spinal_transfer"):
        ev = evaluate(out, str(flat), "test", "cpu")
    said = [r.getMessage() for r in caplog.records if "byte-identical to images the run" in r.getMessage()]
    assert ev.metrics["num_samples"] == 50 and len(said) == 1 and said[0].startswith("30 of the 50 images evaluated")
    caplog.clear()
    for f in flat.rglob("train_*"):
        f.unlink()
    with caplog.at_level("WARNING", logger="spinal_transfer"):
        evaluate(out, str(flat), "test", "cpu")
    assert not [r for r in caplog.records if "byte-identical" in r.getMessage()]


@pytest.mark.slow      # 3 runs; test_first_run's slow test covers transfer with the defaults
def test_transfer_from_digits_0_4_beats_random_init(tmp_path):
    low = write_digits_folder(tmp_path / "low", digits=(0, 1, 2, 3, 4))
    high = write_digits_folder(tmp_path / "high", digits=(5, 6, 7, 8, 9))
    run(tiny_cfg(low, tmp_path / "r_low", epochs=EPOCHS, scheduler="cosine"))
    pretrained = tmp_path / "r_low" / "checkpoints" / "best.pt"         # a fine-tuned checkpoint as --weights
    # Two short cosine epochs: one epoch of 6 constant-lr steps left the outcome at the mercy of float
    # noise (channels_last vs NCHW flipped it between 0.45 and chance), this margin holds across seeds.
    budget = dict(epochs=2, limit_train_batches=4, lr=0.02, scheduler="cosine")
    rep_transfer = run(tiny_cfg(high, tmp_path / "r_transfer", weights=str(pretrained), **budget))
    rep_random = run(tiny_cfg(high, tmp_path / "r_random", **budget))
    assert rep_transfer["test"]["top1"] > rep_random["test"]["top1"] + 0.05, (rep_transfer["test"]["top1"],
                                                                            rep_random["test"]["top1"])


def _train_cmd(data: Path, out: Path, epochs: int) -> list[str]:
    flags = {**TINY, "data": str(data), "out": str(out), "epochs": epochs, "deterministic": "true",
             "augment": "paper", "head_preset": "vgg", "limit_train_batches": 12}
    cmd = [sys.executable, "-m", "spinal_transfer", "train"]
    for k, v in flags.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


ENV = {**os.environ, "PYTHONHASHSEED": "0"}
EXACT_EPOCHS = 3          # x 12 batches: the uninterrupted reference every interrupted run must equal


@pytest.fixture(scope="module")
def uninterrupted(digits_folder, tmp_path_factory) -> Path:
    """A deterministic run (paper augmentation, dropout and BatchNorm in the head) never interrupted."""
    out = tmp_path_factory.mktemp("exact") / "full"
    subprocess.run(_train_cmd(digits_folder, out, EXACT_EPOCHS), check=True, env=ENV, capture_output=True)
    return out


def _same_weights(a: Path, b: Path) -> None:
    x, y = load_checkpoint(a / "checkpoints" / "last.pt"), load_checkpoint(b / "checkpoints" / "last.pt")
    assert x["progress"] == y["progress"]
    for k, v in x["model"].items():
        assert torch.equal(v, y["model"][k]), k


@pytest.mark.slow      # 9-16 s; the default suite stays near 10 minutes
def test_kill_and_resume_matches_uninterrupted(digits_folder, tmp_path, uninterrupted):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(digits_folder, killed, EXACT_EPOCHS), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists(), "the run was killed before it saved its first epoch"
    assert load_checkpoint(last)["progress"]["epoch"] < EXACT_EPOCHS, "the run finished before it could be killed"
    assert not (killed / "report.json").exists()

    subprocess.run([sys.executable, "-m", "spinal_transfer", "train", "--resume", str(killed)], check=True,
                   env=ENV, capture_output=True)
    _same_weights(uninterrupted, killed)
    assert [json.loads(r)["val"] for r in (uninterrupted / "metrics.jsonl").read_text().splitlines()] == \
           [json.loads(r)["val"] for r in (killed / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["TERM", pytest.param("USR1", marks=pytest.mark.slow)])      # the same path: USR1 in the slow run
def test_a_signal_mid_epoch_checkpoints_the_step_and_resume_is_exact(digits_folder, tmp_path, uninterrupted, name):
    out = tmp_path / "signalled"
    k = int(np.random.default_rng().integers(2, EXACT_EPOCHS * 12 - 1))     # any step, epoch ends included
    cmd = [sys.executable, "-c", SIGNAL_AT_STEP, str(k), name, "1", "-1", *_train_cmd(digits_folder, out,
                                                                                       EXACT_EPOCHS)[3:]]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert res.returncode == 75, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and f"stopped: SIG{name} received" in res.stderr
    progress = load_checkpoint(out / "checkpoints" / "last.pt")["progress"]
    assert progress["step"] == k                          # nothing done before the signal is lost
    assert progress["epoch"] * 12 + progress["batch"] == k
    resumed = subprocess.run([sys.executable, "-m", "spinal_transfer", "train", "--resume", str(out)], env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_weights(uninterrupted, out)


def test_a_signal_to_the_whole_process_group_stops_as_one_to_the_main_process(digits_folder, tmp_path, uninterrupted):
    """Slurm signals every process of a job step, `timeout` and a terminal the whole process group: the DataLoader
    workers get the SIGTERM too, from a process that is not their parent, which PyTorch's worker handler dies of
    (the run ended in "DataLoader worker ... is killed by signal: Terminated"). They leave it to the main process
    (data/loaders.py), which checkpoints the step in flight; they end with it; the resumed run equals the
    uninterrupted one (augmentation does not depend on the worker)."""
    out = tmp_path / "group"
    cmd = [sys.executable, "-c", SIGNAL_AT_STEP, "5", "TERM@group", "1", "-1",
           *_train_cmd(digits_folder, out, EXACT_EPOCHS)[3:], "--workers", "2"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr and "stopped: SIGTERM received" in stderr
    assert load_checkpoint(out / "checkpoints" / "last.pt")["progress"]["step"] == 5
    deadline = time.time() + 30                   # the workers end with the main process
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("DataLoader workers outlived the stopped run")
    resumed = subprocess.run([sys.executable, "-m", "spinal_transfer", "train", "--resume", str(out)], env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_weights(uninterrupted, out)


@pytest.mark.slow      # 9-16 s; the default suite stays near 10 minutes
def test_a_resumed_epoch_with_checkpoints_inside_it_records_the_uninterrupted_train_loss(digits_folder, tmp_path,
                                                                                         uninterrupted):
    """After a resume inside an epoch, a further mid-epoch checkpoint used to count that epoch's earlier images
    twice: the weights were right, the train_loss in metrics.jsonl (and the trackers) too low."""
    out = tmp_path / "r"
    cmd = [sys.executable, "-c", SIGNAL_AT_STEP, "5", "TERM", "1", "-1", *_train_cmd(digits_folder, out,
                                                                                      EXACT_EPOCHS)[3:]]
    assert subprocess.run(cmd, env=ENV, capture_output=True, text=True).returncode == 75
    resumed = subprocess.run([sys.executable, "-m", "spinal_transfer", "train", "--resume", str(out),
                              "--checkpoint-every-steps", "2"], env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses = [[json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (uninterrupted, out)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    _same_weights(uninterrupted, out)


def test_a_second_ctrl_c_stops_at_once(digits_folder, tmp_path):
    cmd = [sys.executable, "-c", SIGNAL_AT_STEP, "3", "INT", "2", "-1", *_train_cmd(digits_folder, tmp_path / "r", 2)[3:]]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert res.returncode == 130, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and res.stderr.strip().endswith("interrupted")
    assert not (tmp_path / "r" / "checkpoints" / "last.pt").exists()        # no checkpoint was asked to finish


@pytest.mark.slow      # 9-16 s; the default suite stays near 10 minutes
def test_checkpoints_inside_an_epoch_every_n_steps(digits_folder, tmp_path, uninterrupted):
    out = tmp_path / "every5"
    res = subprocess.run(_train_cmd(digits_folder, out, EXACT_EPOCHS) + ["--checkpoint-every-steps", "5"], env=ENV,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert log.count("checkpoint written inside epoch") == len([s for s in range(1, EXACT_EPOCHS * 12 + 1)
                                                                if s % 5 == 0 and s % 12 != 0])
    _same_weights(uninterrupted, out)                    # writing checkpoints changes nothing


def test_every_stage_runs_its_own_schedule_from_its_start(digits_folder, tmp_path):
    """Stage 2 of a cosine schedule with warm-up starts its own warm-up, as stage 1 did: its lr per epoch is
    stage 1's times the ratio of their lrs (it used to continue stage 1's step count and wrap). Each epoch's
    row holds the lr its last optimizer step used (not the next step's, which the schedule has moved on to)."""
    cfg = tiny_cfg(digits_folder, tmp_path / "run", stages=[{"epochs": 3, "lr": 0.04}, {"epochs": 3, "lr": 0.004}],
                   scheduler="cosine", warmup_epochs=1.0, limit_train_batches=2)
    run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, second = ([r["lr"] for r in rows if r["stage"] == k] for k in (1, 2))
    # 2 steps an epoch, 6 in all: linear warm-up from 1e-3 over steps 0-1, then cosine over steps 2-5 (T_max 4);
    # the epochs' last steps are 1, 3, 5
    used = [1e-3 + (1 - 1e-3) / 2, (1 + math.cos(math.pi / 4)) / 2, (1 + math.cos(3 * math.pi / 4)) / 2]
    assert first == pytest.approx([0.04 * f for f in used])
    assert second == pytest.approx([lr / 10 for lr in first])


def test_a_val_loss_that_overflows_stops_the_run_and_is_never_best(three_digits, tmp_path, monkeypatch):
    """Finite training loss but inf/NaN logits on val (an lr far too high): the epoch is not "best" and the run
    stops as for a NaN training loss, last.pt and best.pt keeping the epoch before."""
    from spinal_transfer.training import train as train_module

    calls, original = [], train_module.evaluate_epoch

    def overflow_in_epoch_2(s):
        val, select = original(s)
        calls.append(1)
        return ({**val, "loss": float("nan")},) * 2 if len(calls) == 2 else (val, select)
    monkeypatch.setattr(train_module, "evaluate_epoch", overflow_in_epoch_2)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss) as e:
        run(tiny_cfg(three_digits, out, epochs=3, limit_train_batches=2))
    assert str(e.value).startswith("the val loss became NaN/inf after epoch 2/3 (the model's outputs overflow); "
                                   f"stopped. The last good checkpoint is {out / 'checkpoints' / 'last.pt'} (after "
                                   "epoch 1")
    assert load_checkpoint(out / "checkpoints" / "last.pt")["progress"]["epoch"] == 1
    assert load_checkpoint(out / "checkpoints" / "best.pt")["epoch"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_nan_score_is_never_the_best_epoch(tmp_path):
    from spinal_transfer.runs.rundir import RunDir
    from spinal_transfer.training.selection import CheckpointSaver

    saver = CheckpointSaver(RunDir(tmp_path / "run"), {}, multi_stage=False)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    model = torch.nn.Linear(2, 2)
    assert saver.update(1, float("nan"), model, None) is False and saver.best_epoch == 0
    assert saver.update(2, -1.0, model, None) is True and saver.update(3, float("nan"), model, None) is False
    assert (saver.best, saver.best_epoch) == (-1.0, 2)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(digits_folder, tmp_path):
    out = tmp_path / "nan"
    cfg = tiny_cfg(digits_folder, out, stages=[{"epochs": 1, "lr": 0.05}, {"epochs": 1, "lr": 1e12}],
                   limit_train_batches=10)
    with pytest.raises(NonFiniteLoss, match="NaN/inf") as e:
        run(cfg)
    good = load_checkpoint(out / "checkpoints" / "last.pt")
    assert good["progress"]["epoch"] == 1
    assert f"The last good checkpoint is {out / 'checkpoints' / 'last.pt'} (after epoch 1" in str(e.value)
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())
    assert not (out / "report.json").exists()
    assert "error: the training loss became NaN/inf" in (out / "train.log").read_text()     # logged too
    # the CLI: one clear line, exit code 3; in the first epoch no checkpoint exists, and none is named
    cmd = _train_cmd(digits_folder, tmp_path / "nan_cli", 1)
    cmd += ["--lr", "1e12"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 3 and "NaN/inf" in res.stderr and "Traceback" not in res.stderr
    assert "No checkpoint was saved yet" in res.stderr and "last.pt" not in res.stderr


def test_messy_folder_trains_and_lists_skipped_files(tmp_path):
    data = write_digits_folder(tmp_path / "messy", digits=(0, 1, 2))
    bad = {"train/digit_0/corrupt.jpg": b"\xff\xd8\xff\xe0 not really a jpeg",
           "train/digit_1/empty.png": b"",
           "val/digit_2/notes.png": b"just some text, not a picture"}
    for rel, content in bad.items():
        (data / rel).write_bytes(content)
    (data / "train" / ".ipynb_checkpoints").mkdir()
    (data / "train" / "digit_0" / ".DS_Store").write_bytes(b"\0\0")
    out = tmp_path / "run"
    report = run(tiny_cfg(data, out, epochs=1, limit_train_batches=4))
    assert report["classes"] == ["digit_0", "digit_1", "digit_2"]
    listed = (out / "skipped_files.txt").read_text()
    for rel in bad:
        assert str(data / rel) in listed, rel


def test_select_metric_keeps_the_epoch_it_names_and_tune_scores_that_epoch(digits_folder, tmp_path):
    from spinal_transfer.experiments.tune import best_epoch
    from spinal_transfer.runs.rundir import RunDir

    for metric, score in [("top1", lambda r: r["val"]["top1"]), ("loss", lambda r: -r["val"]["loss"])]:
        cfg = tiny_cfg(digits_folder, tmp_path / metric, epochs=5, limit_train_batches=2, select_metric=metric)
        report = run(cfg)
        rows = [json.loads(r) for r in (tmp_path / metric / "metrics.jsonl").read_text().splitlines()]
        expected = max(rows, key=score)["epoch"]              # max keeps the first of ties, as the saver does
        assert report["best_epoch"] == expected and report["selected_by"] == metric
        assert load_checkpoint(tmp_path / metric / "checkpoints" / "best.pt")["epoch"] == expected
        assert best_epoch(RunDir(cfg.out)) == (expected, rows[expected - 1]["val"]["top1"])
    assert "selected on val loss" in (tmp_path / "loss" / "train.log").read_text()
    assert "selected on val loss" in (tmp_path / "loss" / "report.html").read_text()


def test_class_weighted_loss_sampler_ema_and_accumulation_run(digits_folder, tmp_path):
    """The optional paths of the loop run end to end (their maths is the libraries')."""
    for i, extra in enumerate([dict(class_balance="loss", label_smoothing=0.1, accum_steps=2),
                               dict(class_balance="sampler", ema_decay=0.9, freeze_epochs=1, epochs=2),
                               dict(mixup=0.2, cutmix=1.0, scheduler="cosine", warmup_epochs=0.5,
                                    optimizer="adamw", lr=1e-3, clip_grad=1.0)]):
        cfg = tiny_cfg(digits_folder, tmp_path / f"opt{i}", **{"epochs": 1, "limit_train_batches": 4, **extra})
        report = run(cfg)
        assert 0.0 <= report["test"]["top1"] <= 1.0


def test_recipe_and_flags_fill_one_dataclass(tmp_path):
    from spinal_transfer.cli import build_parser
    from spinal_transfer.config import given_flags, resolve_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("backbone: timm/test_vit\nlayer_width: 64\nstages:\n- {epochs: 2, lr: 0.001}\n"
                      "- {epochs: 3, lr: 0.0001}\n")

    def resolved(*flags: str) -> TrainConfig:
        args = build_parser("train").parse_args(["train", "--recipe", str(recipe), "--data", "x", *flags])
        return resolve_config(args.recipe, given_flags(args))

    cfg = resolved("--layer-width", "8")
    assert (cfg.backbone, cfg.layer_width, cfg.data) == ("timm/test_vit", 8, "x")
    assert [(s.epochs, s.lr) for s in cfg.resolved_stages()] == [(2, 1e-3), (3, 1e-4)]
    # --epochs sets every stage's length; --lr the first stage's lr, the others keep their ratio to it
    assert [(s.epochs, s.lr) for s in resolved("--epochs", "4").resolved_stages()] == [(4, 1e-3), (4, 1e-4)]
    assert [(s.epochs, pytest.approx(s.lr)) for s in resolved("--lr", "0.01").resolved_stages()] == [(2, 0.01),
                                                                                                       (3, 0.001)]
    assert dataclasses.replace(cfg, stages=[]).resolved_stages()[0].epochs == TrainConfig().resolved_stages()[0].epochs
    bad = tmp_path / "bad.yaml"
    bad.write_text("layer_wdth: 3\n")
    with pytest.raises(ValueError, match="unknown option 'layer_wdth' \\(did you mean 'layer_width'\\?\\)"):
        TrainConfig.from_yaml(bad)


_HEAP = """
import ctypes, ctypes.util, sys, torch
from spinal_transfer.utils.runtime import tune_cpu_allocator

class MallInfo2(ctypes.Structure):                    # glibc >= 2.33, malloc.h
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
if not hasattr(libc, "mallinfo2"):
    print("skip 0 0"); sys.exit()
libc.mallinfo2.restype = MallInfo2
applied = tune_cpu_allocator(torch.device("cpu")) if sys.argv[1] == "tuned" else False
block = torch.empty(1 << 24).fill_(1.0)               # 64 MB, as a step's activations
mapped_alone = libc.mallinfo2().hblkhd                # bytes mmapped block by block: unmapped again on free
del block
kept = libc.mallinfo2().fordblks                      # free bytes the heap keeps for the next allocation
print(applied, mapped_alone >> 20, kept >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator tuning is Linux-only")
def test_cpu_allocator_tuning_keeps_freed_activations_for_the_next_step():
    """glibc's own accounting, not the kernel's page-fault counter (which a sandboxed CI kernel may
    count differently): by default a 64 MB block is mmapped alone and handed back on free, so the next
    step faults all of it in again; tuned, it comes from the heap and stays there for reuse."""
    def heap(mode: str) -> tuple[str, int, int]:
        out = subprocess.run([sys.executable, "-c", _HEAP, mode], capture_output=True, text=True, check=True)
        applied, mapped_alone, kept = out.stdout.split()
        return applied, int(mapped_alone), int(kept)

    applied, mapped_alone, kept = heap("tuned")
    if applied != "True":
        pytest.skip("not glibc 2.33 or newer")
    assert mapped_alone < 64 <= kept                  # MB: from the heap, and kept after the free
    _, mapped_alone, kept = heap("default")
    assert mapped_alone >= 64 > kept                  # glibc's default: mapped alone, returned on free
    assert not tune_cpu_allocator(torch.device("meta"))             # only ever applied for the CPU


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    nhwc = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


@pytest.mark.parametrize("flag, expected", [(None, torch.channels_last), (False, torch.contiguous_format)])
def test_channels_last_is_the_cpu_default_and_can_be_turned_off(digits_folder, tmp_path, monkeypatch, flag, expected):
    import spinal_transfer.training.train as T

    seen: dict[str, set] = {"input": set(), "weight": set()}
    build = T.build_model

    def spying_build_model(*a, **kw):
        model = build(*a, **kw)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))

        def record(module, args):
            if module.training:
                seen["input"].add(_memory_format(args[0]))
                seen["weight"].add(_memory_format(conv.weight))
        model.register_forward_pre_hook(record)
        return model

    monkeypatch.setattr(T, "build_model", spying_build_model)
    run(tiny_cfg(digits_folder, tmp_path / "run", epochs=1, limit_train_batches=2, channels_last=flag))
    assert seen == {"input": {expected}, "weight": {expected}}
    assert T.use_channels_last(None, torch.device("cpu")) and not T.use_channels_last(None, torch.device("mps"))


def test_early_stopping_on_a_metric_sequence():
    from spinal_transfer.training.selection import EarlyStopping

    def first_stop(scores, patience, min_delta=0.0):
        rule = EarlyStopping(patience, min_delta)
        for epoch, score in enumerate(scores, 1):
            if rule.update(epoch, score, "val"):
                return epoch, rule.best_epoch
        return None

    assert first_stop([0.5, 0.6, 0.6, 0.59, 0.7], patience=2) == (4, 2)          # 2 epochs without a gain
    assert first_stop([0.5, 0.6, 0.61, 0.62, 0.63], patience=2, min_delta=0.02) == (4, 2)   # gains below delta
    assert first_stop([0.5, 0.6, 0.7, 0.8], patience=1) is None
    assert first_stop([0.9, 0.1], patience=1) == (2, 1)


def test_early_stopping_state_round_trips_and_an_old_last_pt_still_resumes():
    from spinal_transfer.training.selection import EarlyStopping
    from spinal_transfer.training.train import Progress, early_stopping_state

    scores = [0.5, 0.7, 0.6, 0.65, 0.6]
    whole = EarlyStopping(3)
    stops = [whole.update(e, x, "val") for e, x in enumerate(scores, 1)]
    assert stops[:4] == [None] * 4 and stops[4] and (whole.best, whole.best_epoch, whole.bad) == (0.7, 2, 3)
    half = EarlyStopping(3)                 # stopped after epoch 3, restored from its state_dict, continued
    for e, x in enumerate(scores[:3], 1):
        half.update(e, x, "val")
    again = EarlyStopping(3)
    again.load_state_dict(half.state_dict())
    assert [again.update(e, x, "val") for e, x in enumerate(scores[3:], 4)] == stops[3:]
    # a last.pt from before: the state sat in progress; it is read from there, and Progress takes the rest
    old = {"progress": {"epoch": 3, "step": 9, "stage_step": 9, "batch": 0, "epoch_loss": 0.0, "epoch_seen": 0,
                        "stopped": {}, "early_best": 0.7, "early_best_epoch": 2, "early_bad": 1}}
    assert early_stopping_state(old) == half.state_dict()
    assert Progress.from_checkpoint(old) == Progress(epoch=3, step=9, stage_step=9)
    new = {"progress": dataclasses.asdict(Progress(epoch=3)), "early_stopping": half.state_dict()}
    assert early_stopping_state(new) == half.state_dict() and Progress.from_checkpoint(new).epoch == 3
    half.start_stage()
    assert half.state_dict() == EarlyStopping().state_dict()


@pytest.mark.slow      # 4 runs: ~40 s
def test_early_stopping_ends_the_stage_says_why_and_survives_resume(digits_folder, tmp_path):
    # a frozen backbone (BatchNorm statistics fixed) and an lr that cannot move the head: no epoch improves on
    # the first, so patience 2 stops stage 1 after its epoch 3; stage 2 (2 epochs) is too short to stop
    cfg = tiny_cfg(digits_folder, tmp_path / "run", stages=[{"epochs": 6, "lr": 1e-12}, {"epochs": 2, "lr": 1e-12}],
                   limit_train_batches=2, early_stop_patience=2, freeze_backbone=True, select_metric="top1")
    report = run(cfg)
    assert [(x["stage"], x["ran"], x["epoch"]) for x in report["early_stops"]] == [(1, 3, 3)]
    assert "did not improve by more than 0 for 2 epoch(s)" in report["stopped"]["reason"]
    assert report["epochs_trained"] == 5
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["stage"]) for r in rows] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2)]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "stage 1 stopped early after epoch 3: val top-1 did not improve" in log
    # interrupted inside epoch 3 (after 2 epochs: the stage's best is epoch 1, one epoch without a gain) and
    # resumed: EarlyStopping's state comes back from last.pt, so stage 1 still stops after epoch 3, not later
    from conftest import cli_flags

    flags = cli_flags(**{**TINY, "data": digits_folder, "out": tmp_path / "again", "limit_train_batches": 2,
                         "early_stop_patience": 2, "freeze_backbone": "true", "select_metric": "top1",
                         "stages": "[{epochs: 6, lr: 1.0e-12}, {epochs: 2, lr: 1.0e-12}]"})
    stopped = subprocess.run([sys.executable, "-c", SIGNAL_AT_STEP, "5", "TERM", "1", "-1", "train", *flags],
                             env=ENV, capture_output=True, text=True)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    last = load_checkpoint(tmp_path / "again" / "checkpoints" / "last.pt")
    assert (last["progress"]["epoch"], last["progress"]["batch"]) == (2, 1)
    assert (last["early_stopping"]["best_epoch"], last["early_stopping"]["bad"]) == (1, 1)
    resumed = subprocess.run([sys.executable, "-m", "spinal_transfer", "train", "--resume", str(tmp_path / "again")],
                             env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert [(x["stage"], x["ran"], x["epoch"]) for x in again["early_stops"]] == [(1, 3, 3)]
    assert again["epochs_trained"] == 5
