"""A run is one owned thing: its folder's lock and layout, resume that listens, one skip log, one numbering."""
from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, cli_flags, snapshot, tiny_cfg, truncated_jpeg, write_digits_folder

from spinal_transfer.evaluation.interpret import read_predictions
from spinal_transfer.runs.checkpoint import load_checkpoint
from spinal_transfer.training.train import run

PACKAGE = Path(__file__).resolve().parents[2] / "spinal_transfer"
ENV = {**os.environ, "PYTHONHASHSEED": "0"}


def _cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spinal_transfer", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=timeout)


@pytest.fixture
def finished(finished_run) -> Path:
    return finished_run


def _train_args(data: Path, out: Path, **kw) -> list[str]:
    return ["train", *cli_flags(**{**TINY, "data": data, "out": out, "epochs": 2, "limit_train_batches": 3, **kw})]


# --- one skip log; per-image outputs keep their exact paths --------------------------------------

@pytest.mark.parametrize("options", [dict(select_on="val"), dict(select_on="test"),
                                     dict(freeze_backbone=True, cache_features=True)],
                         ids=["select-on-val", "select-on-test", "cache-features"])
def test_undecodable_test_image_is_listed_once_and_predictions_keep_exact_paths(tmp_path, options):
    data = write_digits_folder(tmp_path / "d", digits=(0, 1, 2))
    cut = truncated_jpeg(data / "test" / "digit_1" / "cut.jpg")
    out = tmp_path / "run"
    report = run(tiny_cfg(data, out, epochs=2, limit_train_batches=2, **options))
    lines = (out / "skipped_files.txt").read_text().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == [str(cut)]           # listed once, whatever the epochs
    assert "truncated" in lines[0] or "corrupt" in lines[0]
    assert report["num_skipped_files"] == json.loads((out / "report.json").read_text())["num_skipped_files"] == 1
    others = sorted(str(p) for p in (data / "test").rglob("*.png"))
    rows = read_predictions(out / "test_predictions.csv")
    assert [r.path for r in rows] == others                          # exact paths, in sample order
    assert all(r.target_name == Path(r.path).parent.name for r in rows)
    assert report["test"]["num_samples"] == len(others)


def test_a_test_class_whose_every_image_is_unreadable_is_named(tmp_path):
    """A class with no readable test image is not in the test metrics: named in a warning and in report.json. A
    folder like that is refused before training (tests/e2e/test_faults_refusals.py); here its files break while
    the run trains (a disk, a sync tool), so only the final evaluation meets them."""
    data = write_digits_folder(tmp_path / "d", digits=(0, 1, 2))
    files = sorted((data / "test" / "digit_1").iterdir())
    cut = len(files)

    def break_test_class(_row: dict) -> None:
        for f in files:                                  # half a PNG: the header reads, the pixels do not
            f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
    report = run(tiny_cfg(data, tmp_path / "run", epochs=1, batch_size=8), on_epoch=break_test_class)
    assert report["classes_without_readable_images"] == {"test": ["digit_1"]}
    assert report["num_skipped"]["test"] == cut      # every one, decoded in training or after it
    warned = [ln for ln in (tmp_path / "run" / "train.log").read_text().splitlines() if "no readable" in ln]
    assert len(warned) == 1 and "test metrics do not cover" in warned[0]


def test_resume_from_a_moved_data_folder_lists_each_skipped_file_once_under_its_new_place(three_digits, tmp_path,
                                                                                         cli_run):
    data = tmp_path / "data"
    for d in sorted((three_digits / "train").iterdir()):
        shutil.copytree(d, data / d.name, ignore=lambda folder, names: sorted(names)[20:])
    truncated_jpeg(data / "digit_1" / "cut.jpg")                 # fails when decoded
    (data / "digit_2" / "notes.txt").write_text("not an image")   # skipped by the scan
    run(tiny_cfg(data, tmp_path / "run", epochs=1, batch_size=16))
    assert len((tmp_path / "run" / "skipped_files.txt").read_text().splitlines()) == 2
    moved = data.rename(tmp_path / "moved")
    res = cli_run("train", "--resume", tmp_path / "run", "--epochs", 2, "--data", moved)
    assert res.returncode == 0, res.stderr[-2000:]
    listed = [ln.split("\t")[0] for ln in (tmp_path / "run" / "skipped_files.txt").read_text().splitlines()]
    assert sorted(listed) == [str(moved / "digit_1" / "cut.jpg"), str(moved / "digit_2" / "notes.txt")]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["num_skipped_files"] == 2


# --- the folder is owned: no silent overwrite, a lock, a fresh default name ----------------------

def test_rerun_into_a_finished_run_refuses_and_leaves_every_file_byte_identical(finished, three_digits, cli_run):
    before = snapshot(finished)
    res = cli_run(*_train_args(three_digits, finished))
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "already holds a finished run" in lines[0] and "--resume" in lines[0]
    assert "--overwrite" in lines[0] and "Traceback" not in res.stderr
    assert snapshot(finished) == before


def test_overwrite_removes_the_runs_files_and_nothing_else(finished, three_digits, tmp_path, cli_run):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    (copy / "my_notes.txt").write_text("mine")
    (copy / "checkpoints" / "best.pt").write_bytes(b"junk that must go")
    (copy / "eval_val").mkdir()                       # evaluate --out RUN/eval_val of the earlier model
    res = cli_run(*_train_args(three_digits, copy, epochs=1, limit_train_batches=1), "--overwrite")
    assert res.returncode == 0, res.stderr
    assert (copy / "my_notes.txt").read_text() == "mine" and (copy / "eval_val").is_dir()
    assert "--overwrite: removed the earlier run's" in res.stderr and "checkpoints" in res.stderr
    assert "kept what a train run does not write: eval_val/, my_notes.txt (an evaluate or report" in res.stderr
    assert len((copy / "metrics.jsonl").read_text().splitlines()) == 1
    assert load_checkpoint(copy / "checkpoints" / "best.pt")["epoch"] == 1


def test_overwrite_of_a_run_that_cannot_start_keeps_the_earlier_run(finished, three_digits, tmp_path, cli_run):
    """--overwrite clears the earlier run only for a run that can start: a backbone typo (with the closest
    names), a resize the crop does not fit or a data folder the scan refuses is one line, and every file is
    left as it was."""
    before = snapshot(finished)
    backbone = TINY["backbone"]
    two_trains = tmp_path / "two_trains"               # a data folder the scan refuses: train/ beside Train/
    shutil.copytree(three_digits, two_trains)
    shutil.copytree(two_trains / "train", two_trains / "Train")
    for flags, says in ((("--backbone", backbone + "x"), f"did you mean {backbone}"),
                        (("--resize-size", "8", "--img-size", "16"), "--resize-size 8 is smaller than the 16 px"),
                        (("--data", two_trains), "both Train and train exist")):
        res = cli_run(*_train_args(three_digits, finished), *flags, "--overwrite")
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2 and len(lines) == 1 and says in lines[0], res.stderr[-2000:]
        assert snapshot(finished) == before


def test_a_second_train_on_the_same_folder_refuses_while_the_first_runs(three_digits, tmp_path, cli_run):
    out = tmp_path / "busy"
    first = subprocess.Popen([sys.executable, "-m", "spinal_transfer", *_train_args(three_digits, out, epochs=50,
                                                                                   limit_train_batches=None)],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "config.yaml").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended before the test could start the second"
        second = cli_run(*_train_args(three_digits, out), "--overwrite")   # not even --overwrite gets in
        assert second.returncode == 2 and "is in use by pid" in second.stderr, second.stderr
        resume = cli_run("train", "--resume", str(out))
        assert resume.returncode == 2 and "is in use" in resume.stderr
        plain = cli_run(*_train_args(three_digits, out))      # said as a run in progress, not one to resume
        assert plain.returncode == 2 and f"holds a run that pid {first.pid} on " in plain.stderr, plain.stderr
        assert " is training now; wait for it to end" in plain.stderr
        assert (out / "config.yaml").exists()                # and not cleared as a run that never got going
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # a killed process leaves no stuck lock: the folder can be started over at once
    again = cli_run(*_train_args(three_digits, out, epochs=1, limit_train_batches=1), "--overwrite")
    assert again.returncode == 0, again.stderr


def test_default_out_is_a_new_folder_per_run_printed_at_the_start(three_digits, tmp_path, cli_run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", *cli_flags(**{**TINY, "data": three_digits, "epochs": 1, "limit_train_batches": 1})]
    first, second = cli_run(*args), cli_run(*args)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.startswith("test_resnet-spinal-") for r in runs)
    assert f"run folder runs/{runs[0]}" in first.stderr and f"run folder runs/{runs[1]}" in second.stderr


# --- resume that listens -------------------------------------------------------------------------

def test_resume_with_more_epochs_extends_a_finished_run_and_reselects(finished, tmp_path, cli_run):
    copy = tmp_path / "extend"
    shutil.copytree(finished, copy)
    res = cli_run("train", "--resume", str(copy), "--epochs", "3")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(r) for r in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    report = json.loads((copy / "report.json").read_text())
    assert report["epochs_trained"] == 3
    assert report["best_epoch"] == min(rows, key=lambda r: r["val"]["loss"])["epoch"]      # the default: val loss
    assert (copy / "report-epoch2.json").is_file()                     # the earlier report, kept aside
    assert load_checkpoint(copy / "checkpoints" / "last.pt")["progress"]["epoch"] == 3
    again = cli_run("train", "--resume", str(copy))
    assert again.returncode == 0 and "nothing to add" in again.stderr


@pytest.mark.parametrize("flag", [["--lr", "0.5"], ["--backbone", "timm/test_vit"], ["--seed", "7"],
                                  ["--head", "linear"], ["--augment", "modern"], ["--batch-size", "7"]])
def test_resume_refuses_a_flag_that_would_change_the_experiment(finished, flag, cli_run):
    before = snapshot(finished)
    saved = load_checkpoint(finished / "checkpoints" / "last.pt")["config"]
    global_batch = saved["batch_size"] * saved["accum_steps"]
    res = cli_run("train", "--resume", str(finished), *flag)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{flag[0]} " in res.stderr and "different experiment" in res.stderr
    # what it does accept, said in the same line: a batch size that keeps the global batch is not a new experiment
    assert f"--batch-size and --accum-steps that keep their product (the global batch, {global_batch})" in res.stderr
    assert snapshot(finished) == before


def test_resume_cannot_shorten_below_what_was_trained(finished, cli_run):
    res = cli_run("train", "--resume", str(finished), "--epochs", "1")
    assert res.returncode == 2 and "already trained 2 epochs" in res.stderr


# --- structure -----------------------------------------------------------------------------------

def test_the_command_line_imports_neither_torch_nor_timm():
    code = ("import sys\nimport spinal_transfer, spinal_transfer.cli\nfrom spinal_transfer.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["False", "False"]
    version = _cli("--version")
    assert version.returncode == 0 and version.stdout.split() == ["spinal-transfer", __import__("spinal_transfer").__version__]
    import spinal_transfer

    assert spinal_transfer.build_model.__name__ == "build_model"       # top-level names load on use


def test_training_is_made_of_short_functions_and_only_the_drivers_import_the_loop():
    long = [(path.name, n.name, n.end_lineno - n.lineno + 1) for path in sorted((PACKAGE / "training").glob("*.py"))
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert long == []
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and (node.module == "training.train" or (
                    node.module == "training" and any(a.name == "train" for a in node.names))):
                importers.add(str(path.relative_to(PACKAGE)))
    assert importers <= {"cli/train.py", "experiments/reproduce.py", "experiments/compare.py",
                         "experiments/tune.py"}, importers    # the drivers


def test_resume_refuses_a_last_pt_it_cannot_continue_from_and_another_folders_images(finished, other_run,
                                                                                     three_digits, tmp_path, cli_run):
    """QA 28: a last.pt copied from another run (other images) trained on from that run's weights and place; a
    best.pt copied over last.pt (the old advice for a damaged one) ended in a KeyError traceback; a --data folder
    holding other images under the run's file names trained on them after a warning. Each is one line, exit 2,
    and the damaged-last.pt advice names what the run can do instead."""
    other_data, other = other_run
    mine = tmp_path / "mine"
    shutil.copytree(finished, mine)
    shutil.copy(other / "checkpoints" / "last.pt", mine / "checkpoints" / "last.pt")
    before = snapshot(mine)
    res = cli_run("train", "--resume", mine, "--epochs", 3)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert "last.pt comes from another run (its split fingerprints differ" in lines[0] and "Traceback" not in res.stderr
    assert snapshot(mine) == before

    config = (mine / "config.yaml").read_text()     # a run on the same images with another backbone: its last.pt
    shutil.copy(finished / "checkpoints" / "last.pt", mine / "checkpoints" / "last.pt")
    (mine / "config.yaml").write_text(config.replace("backbone: timm/test_resnet", "backbone: timm/test_efficientnet"))
    res = cli_run("train", "--resume", mine)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert ("last.pt comes from another run (its backbone 'timm/test_resnet' is not "
            f"{mine / 'config.yaml'}'s 'timm/test_efficientnet')") in res.stderr
    (mine / "config.yaml").write_text(config)

    shutil.copy(mine / "checkpoints" / "best.pt", mine / "checkpoints" / "last.pt")
    res = cli_run("train", "--resume", mine, "--epochs", 3)
    assert res.returncode == 2 and "holds a model's weights only" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr

    shutil.copy(finished / "checkpoints" / "last.pt", mine / "checkpoints" / "last.pt")
    with open(mine / "checkpoints" / "last.pt", "r+b") as f:
        f.truncate(1000)
    res = cli_run("train", "--resume", mine, "--epochs", 3)
    assert res.returncode == 2 and "is truncated or damaged" in res.stderr, res.stderr[-2000:]
    assert "a run continues only from the last.pt it wrote" in res.stderr and "--weights" in res.stderr
    assert "resume from an older one" not in res.stderr

    shutil.copy(finished / "checkpoints" / "last.pt", mine / "checkpoints" / "last.pt")
    impostor = tmp_path / "impostor"              # the run's file names, other digits' images in them
    pool = sorted((other_data / "train").rglob("*.png"))
    for i, f in enumerate(sorted(three_digits.rglob("*.png"))):
        (impostor / f.relative_to(three_digits)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(pool[i % len(pool)], impostor / f.relative_to(three_digits))
    res = cli_run("train", "--resume", mine, "--epochs", 3, "--data", impostor)
    assert res.returncode == 2 and f"{impostor} is not the run's data folder" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_an_out_that_is_a_data_folder_is_refused_before_anything_is_written(three_digits, tmp_path, cli_run):
    """QA 28: `train --out` (or compare's) into a folder of class folders was accepted; the next train on that
    folder read the run's plots as a class "runs". A folder holding images of its own (not ours, which are
    marked) is refused, --overwrite or not; one holding only our marked plots or other files is not."""
    other = tmp_path / "other_data"
    shutil.copytree(three_digits / "train", other)
    before = snapshot(other)
    for argv in (_train_args(three_digits, other), [*_train_args(three_digits, other), "--overwrite"],
                 _train_args(three_digits, other / "digit_0"),
                 ["compare", *cli_flags(**{**{k: v for k, v in TINY.items() if k != "head"}, "data": three_digits,
                                           "out": other, "epochs": 1}),
                  "--heads", "linear", "spinal", "--seeds", "1"]):
        res = cli_run(*argv)
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, (argv, res.stderr[-2000:])
        assert "holds images (" in lines[0] and "it is a data folder" in lines[0], lines
    assert snapshot(other) == before
    from spinal_transfer.runs.rundir import user_image
    from spinal_transfer.evaluation.plots import _figure, save_figure

    mine = tmp_path / "notes"
    (mine / "plots").mkdir(parents=True)
    save_figure(_figure(1, 1), mine / "plots" / "curve.png")       # ours: marked
    (mine / "notes.txt").write_text("mine")
    assert user_image(mine) is None
    shutil.copy(next((three_digits / "train" / "digit_0").iterdir()), mine / "plots" / "photo.png")
    assert user_image(mine) == mine / "plots" / "photo.png"
