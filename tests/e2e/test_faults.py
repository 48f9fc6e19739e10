"""Fault injection: broken inputs never silently change a run or end in a traceback.

Each case asserts the exact outcome: the exit code, one line naming the cause, no traceback, and files left as
they were where nothing should change. Cases that need the operating system's help (a full disk, a read-only
folder) run inside a user namespace with a size-limited tmpfs and skip, saying why, where that is not allowed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, cli_flags, snapshot, write_digits_folder
from PIL import Image

from spinal_transfer.errors import CheckpointError
from spinal_transfer.runs.checkpoint import load_checkpoint
from spinal_transfer.runs.rundir import RunDir

ENV = {**os.environ, "PYTHONHASHSEED": "0"}


def _cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
    return subprocess.run([sys.executable, "-m", "spinal_transfer", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, cwd=cwd, timeout=timeout)


def _one_line_error(res: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The process failed with `code` and said so in one `error:` line containing every needle."""
    assert res.returncode == code, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:") or " error: " in ln]
    assert len(errors) == 1, res.stderr[-3000:]
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


@pytest.fixture
def data(three_digits) -> Path:
    return three_digits


@pytest.fixture
def finished(finished_run) -> Path:
    return finished_run


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- a run's data is fixed at its start ----------------------------------------------------------

def test_resume_keeps_the_recorded_files_when_images_and_a_class_are_added(finished, data, tmp_path):
    folder = _copy(data, tmp_path / "digits")
    run_copy = _copy(finished, tmp_path / "run")
    cfg = (run_copy / "config.yaml").read_text().replace(str(data), str(folder))
    (run_copy / "config.yaml").write_text(cfg)
    n_test = len(json.loads((run_copy / "splits.json").read_text())["splits"]["test"])
    classes = (run_copy / "classes.json").read_bytes()
    for split in ("train", "test"):
        for i in range(3):
            shutil.copy(next((folder / split / "digit_0").glob("*.png")), folder / split / "digit_1" / f"new{i}.png")
        (folder / split / "digit_9").mkdir()
        shutil.copy(next((folder / split / "digit_0").glob("*.png")), folder / split / "digit_9" / "x.png")
    res = _cli("train", "--resume", run_copy, "--epochs", 3, "--data", folder)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "image(s) added to" in res.stderr and "are not used" in res.stderr
    assert "new class folder(s) digit_9" in res.stderr and "keeps its 3 classes" in res.stderr
    report = json.loads((run_copy / "report.json").read_text())
    assert report["test"]["num_samples"] == n_test and report["classes"] == ["digit_0", "digit_1", "digit_2"]
    assert (run_copy / "classes.json").read_bytes() == classes


def test_resume_refuses_when_a_recorded_file_is_gone_and_changes_nothing(finished, data, tmp_path, cli_run):
    folder = _copy(data, tmp_path / "digits")
    run_copy = _copy(finished, tmp_path / "run")
    (run_copy / "config.yaml").write_text((run_copy / "config.yaml").read_text().replace(str(data), str(folder)))
    gone = sorted((folder / "test" / "digit_2").glob("*.png"))[0]
    gone.unlink()
    before = snapshot(run_copy)
    res = cli_run("train", "--resume", run_copy, "--epochs", 3)
    _one_line_error(res, 2, "1 file(s) this run uses are gone", gone.name)
    assert snapshot(run_copy) == before


def test_each_command_that_reads_a_runs_record_says_what_works_for_it_when_a_file_is_gone(finished, data, tmp_path,
                                                                                         cli_run):
    """A recorded train file gone from the run's data folder (here a copy given with --data): train --resume,
    evaluate --split train, export --quantize int8 and audit --run, which all read train, each refuse in one line
    whose advice is their own (it was train's "start a new run" for all four); evaluate's and export's (another
    folder with --data) are then followed and work."""
    folder = _copy(data, tmp_path / "digits")
    run_copy = _copy(finished, tmp_path / "run")
    gone = sorted((folder / "train" / "digit_2").glob("*.png"))[0]
    gone.unlink()
    before = snapshot(run_copy)
    advice = {"train": "or start a new run on the folder as it is now",
              "evaluate": "or score another labelled folder with --data: one that does not hold most of the run's "
                          "files is read as it is",
              "export": "or calibrate and check int8 on another labelled folder with --data",
              "audit": "or audit the folder as it is now: audit --data DIR, without --run"}
    commands = {"train": ["train", "--resume", run_copy, "--epochs", 3],
                "evaluate": ["evaluate", run_copy, "--split", "train"],
                "export": ["export", run_copy, "--out", tmp_path / "bundle", "--quantize", "int8", "--force"],
                "audit": ["audit", "--run", run_copy, "--out", tmp_path / "audit"]}
    for name, args in commands.items():
        res = cli_run(*args, "--data", folder)
        line = _one_line_error(res, 2, "1 file(s) this run uses are gone", gone.name, "Restore them",
                               "if the folder moved, give its new place with --data", advice[name])
        assert [other for other in advice if advice[other] in line] == [name], line
    assert snapshot(run_copy) == before and not (tmp_path / "bundle").exists()
    other = write_digits_folder(tmp_path / "other", digits=(0, 1, 2), size=16, splits=())    # flat, never seen
    res = cli_run("evaluate", run_copy, "--data", other)
    assert res.returncode == 0 and "(it has no split folders)" in res.stderr, res.stderr[-3000:]
    pytest.importorskip("onnxruntime")
    res = cli_run(*commands["export"], "--data", other)
    assert res.returncode == 0 and f"of the 537 images of {other}" in res.stderr, res.stderr[-3000:]


def test_a_file_gone_from_a_split_a_command_does_not_read_is_dropped_with_one_warning(finished, data, tmp_path,
                                                                                       cli_run):
    """evaluate --split test reads the test split only, export --quantize int8 train and val: a file gone from
    another split is dropped from it, said in one warning line (it was refused: "1 file(s) this run uses are gone",
    though the score does not use it). A gone file of a split the command reads is still refused."""
    folder = _copy(data, tmp_path / "digits")
    run_copy = _copy(finished, tmp_path / "run")
    gone = sorted((folder / "train" / "digit_2").glob("*.png"))[0]
    saved = gone.read_bytes()
    gone.unlink()
    res = cli_run("evaluate", run_copy, "--data", folder, "--split", "test")
    assert res.returncode == 0, res.stderr[-3000:]
    said = [ln for ln in res.stderr.splitlines() if "not used here" in ln]
    assert len(said) == 1 and "1 file(s) the run recorded are gone" in said[0] and "1 of the train split" in said[0]
    assert gone.name in said[0]
    _one_line_error(cli_run("evaluate", run_copy, "--data", folder, "--split", "train"), 2, "1 file(s) this run uses "
                    "are gone", gone.name)
    gone.write_bytes(saved)
    gone = sorted((folder / "test" / "digit_1").glob("*.png"))[0]
    gone.unlink()
    _one_line_error(cli_run("evaluate", run_copy, "--data", folder), 2, "1 file(s) this run uses are gone", gone.name)
    pytest.importorskip("onnxruntime")
    res = cli_run("export", run_copy, "--out", tmp_path / "bundle", "--quantize", "int8", "--force", "--data", folder)
    assert res.returncode == 0, res.stderr[-3000:]
    said = [ln for ln in res.stderr.splitlines() if "not used here" in ln]
    assert len(said) == 1 and "1 of the test split" in said[0], res.stderr[-3000:]


def test_audit_run_of_a_moved_data_folder_says_to_give_data_as_evaluate_does(tmp_path, cli_run):
    """The run's data folder moved: audit --run said only "...: no such data folder"; it now says what evaluate
    says (the same check, `splits.recorded_root`): where it was, and to give its new place with --data."""
    from conftest import tiny_cfg

    from spinal_transfer.training.train import run

    folder = write_digits_folder(tmp_path / "digits", digits=(0, 1), size=16)
    run(tiny_cfg(folder, tmp_path / "run", epochs=1, limit_train_batches=1))
    folder.rename(tmp_path / "moved")
    lines = [_one_line_error(cli_run(*args), 2, "the run's data folder does not exist", f"(it was {folder}",
                             "give its new place with --data", "audit --run)")
             for args in (["audit", "--run", tmp_path / "run", "--out", tmp_path / "audit"],
                          ["evaluate", tmp_path / "run"])]
    assert lines[0] == lines[1] and not (tmp_path / "audit").exists()


def test_evaluate_on_another_folder_never_carves_a_split(finished, data, tmp_path, cli_run):
    other = write_digits_folder(tmp_path / "other", digits=(0, 1, 2), splits=("train", "val"))
    res = cli_run("evaluate", finished, "--data", other, "--split", "test")
    _one_line_error(res, 2, "has no test/ folder", "train/, val/")
    flat = write_digits_folder(tmp_path / "flat", digits=(0, 1, 2), splits=())
    res = cli_run("evaluate", finished, "--data", flat, "--split", "test")
    assert res.returncode == 0, res.stderr
    n = sum(1 for _ in flat.rglob("*.png"))
    assert f"all {n} images of {flat} (it has no split folders)" in res.stderr
    assert json.loads(res.stdout)["num_samples"] == n


def test_evaluate_labels_another_folders_classes_by_name(finished, data, tmp_path, cli_run, caplog):
    """A test-only folder holding a subset of the model's classes, listed in another order, is scored with the
    model's own label of each class name (scanned alone, digit_2 would be label 1: silently wrong)."""
    import csv

    full = write_digits_folder(tmp_path / "full", digits=(0, 1, 2), splits=("test",))
    sub = tmp_path / "sub" / "test"
    for name in ("digit_2", "digit_0"):
        shutil.copytree(full / "test" / name, sub / name)
    runs = {}
    for name, folder in (("full", full), ("sub", sub.parent)):
        res = cli_run("evaluate", finished, "--data", folder, "--split", "test", "--out", tmp_path / f"eval_{name}")
        assert res.returncode == 0, res.stderr[-2000:]
        with open(tmp_path / f"eval_{name}" / "predictions_test.csv") as f:
            runs[name] = {Path(r["path"]).relative_to(folder / "test").as_posix(): r for r in csv.DictReader(f)}
        runs[name + "_stderr"] = res.stderr
    assert f"test/ of {sub.parent}" in runs["sub_stderr"]
    assert "1 of the model's 3 classes have no image" in caplog.text and ": digit_1 (" in caplog.text
    sub_rows = runs["sub"]
    assert len(sub_rows) == sum(1 for _ in sub.rglob("*.png")) > 0
    classes = json.loads((finished / "classes.json").read_text())
    classes = classes["classes"] if isinstance(classes, dict) else classes
    for rel, row in sub_rows.items():
        folder_name = rel.split("/")[0]
        assert row["target_name"] == folder_name and classes[int(row["target"])] == folder_name
        assert row["prediction"] == runs["full"][rel]["prediction"]      # the same image, the same model


def test_evaluate_refuses_a_class_the_model_does_not_know(finished, tmp_path, cli_run):
    other = write_digits_folder(tmp_path / "other", digits=(0, 7), splits=())
    res = cli_run("evaluate", finished, "--data", other)
    _one_line_error(res, 2, "class folder(s) the model does not know: digit_7", "digit_0, digit_1, digit_2")


# --- configs validated up front, by key ----------------------------------------------------------

@pytest.mark.parametrize("line, needles", [
    ("epochs: ten", ["recipe.yaml:3", "epochs", "'ten'", "an integer >= 1"]),
    ('epochs: "2"', ["recipe.yaml:3", "epochs", "the string '2'"]),
    ("epochs: 1.7", ["recipe.yaml:3", "epochs: 1.7 is not an integer"]),
    ("stages:\n- {epochs: 2, lr: 0.1}\n- {epochs: 3}", ["recipe.yaml:5", "stages[1]", "missing lr"]),
    ("batch_size: -5", ["recipe.yaml:3", "batch_size: -5 is out of range", ">= 1"]),
    ("head: [spinal", ["recipe.yaml:", "not valid YAML"]),
    ("lr: 0.1\nlayer_wdth: 8", ["recipe.yaml:4", "unknown option 'layer_wdth'", "did you mean 'layer_width'"]),
    ("lr: 0.1\nepochs: 2\nlr: 0.5", ["recipe.yaml:5:1", "duplicate key 'lr' (first on line 3)"]),
], ids=["word", "quoted", "float", "stage-without-lr", "negative-batch", "bad-yaml", "typo", "duplicate-key"])
def test_a_bad_recipe_is_one_line_naming_file_line_and_key_before_any_scan(tmp_path, line, needles, cli_run):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"backbone: timm/test_resnet\nweights: none\n{line}\n")
    res = cli_run("train", "--recipe", recipe, "--data", tmp_path / "no_such_folder", "--out", tmp_path / "run")
    _one_line_error(res, 2, *needles)
    assert not (tmp_path / "run").exists()


def test_an_empty_recipe_and_a_bad_flag_are_refused_up_front(tmp_path, data, cli_run):
    (tmp_path / "empty.yaml").write_text("\n# nothing\n")
    _one_line_error(cli_run("train", "--recipe", tmp_path / "empty.yaml", "--data", data), 2, "the recipe is empty")
    res = cli_run("train", "--data", data, "--batch-size", "-5", "--out", tmp_path / "run")
    _one_line_error(res, 2, "--batch-size", "-5", ">= 1")
    res = cli_run("train", "--data", data, "--batch-size", "1", "--out", tmp_path / "run")   # it trained nothing,
    _one_line_error(res, 2, "batch_size 1 trains nothing", "--batch-size 2 or more")   # exit 0, no batch used
    res = cli_run("train", "--data", data, "--val-fraction", "0.6", "--test-fraction", "0.5", "--out", tmp_path / "run")
    _one_line_error(res, 2, "val_fraction + test_fraction")
    assert not (tmp_path / "run").exists()


# --- checkpoints verified ------------------------------------------------------------------------

def _break(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped":            # one bit in the largest tensor's bytes: the zip still opens, torch loads it
        import struct
        import zipfile

        with zipfile.ZipFile(path) as z:
            info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        raw = bytearray(data)
        name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        raw[at] ^= 0x10
        path.write_bytes(bytes(raw))
        torch.load(path, weights_only=True)          # still loads: only the content hash can tell


@pytest.mark.parametrize("how, needle", [("empty", "is empty (0 bytes)"), ("random", "not a torch checkpoint"),
                                         ("truncated", "truncated"), ("flipped", "is corrupted")])
def test_a_broken_last_checkpoint_is_refused_in_one_line_and_never_loaded(finished, tmp_path, how, needle, cli_run):
    run_copy = _copy(finished, tmp_path / "run")
    _break(run_copy / "checkpoints" / "last.pt", how)
    before = snapshot(run_copy)
    line = _one_line_error(cli_run("train", "--resume", run_copy, "--epochs", 3), 2, needle, "last.pt")
    assert "unsafe" not in line and "arbitrary code" not in line
    assert snapshot(run_copy) == before
    with pytest.raises(CheckpointError, match=re.escape(needle)):
        load_checkpoint(run_copy / "checkpoints" / "last.pt")


def test_program_files_where_a_checkpoint_is_expected_say_what_they_are(finished, tmp_path, cli_run):
    from spinal_transfer.models.restore import model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(finished / "checkpoints" / "best.pt"))[0]
    x = torch.zeros(1, 3, 32, 32)
    torch.jit.trace(model, x).save(str(tmp_path / "model.torchscript"))
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "model.pt2"))
    for name, what in (("model.torchscript", "TorchScript program"), ("model.pt2", "torch.export program")):
        line = _one_line_error(cli_run("evaluate", tmp_path / name), 2, what, "not a checkpoint")
        assert "weights_only" not in line


_SAVE_FOREVER = """
import sys, torch
from spinal_transfer.runs.checkpoint import atomic_save
state = {f"w{i}": torch.full((256, 1024), float(i)) for i in range(24)}      # ~24 MB per save
n = 0
while True:
    n += 1
    atomic_save({"model": state, "n": n}, sys.argv[1])
    print(n, flush=True)
"""


def test_kill_9_during_checkpoint_writes_leaves_the_previous_one_loadable_and_the_stray_file_is_removed(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    target = run_dir.last
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):                       # a few complete saves first
            proc.stdout.readline()
        time.sleep(np.random.default_rng().uniform(0.0, 0.3))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = load_checkpoint(target)               # always the old file or the new one, never a torn one
    assert ckpt["n"] >= 3 and torch.equal(ckpt["model"]["w5"], torch.full((256, 1024), 5.0))
    stray = list(target.parent.glob(".last.pt.*.tmp"))
    (target.parent / ".last.pt.leftover.tmp").write_bytes(b"half a checkpoint")     # as a kill mid-write leaves
    removed = run_dir.remove_stray_temps()
    assert set(removed) >= set(stray) | {target.parent / ".last.pt.leftover.tmp"}
    assert not list(target.parent.glob("*.tmp")) and load_checkpoint(target)["n"] == ckpt["n"]


# --- system errors in plain words ----------------------------------------------------------------

def _in_small_tmpfs(folder: Path, size_kb: int, command: list[str]) -> subprocess.CompletedProcess:
    """`command` with a size-limited tmpfs mounted on `folder`, in a user+mount namespace (no root needed)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"user namespaces are not allowed here: {probe.stderr.strip()}")
    folder.mkdir(parents=True, exist_ok=True)
    script = f"mount -t tmpfs -o size={size_kb}k tmpfs {folder} && exec \"$@\""
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *command], capture_output=True, text=True,
                          env=ENV, timeout=600)


@pytest.mark.slow      # 9-16 s; the default suite stays near 10 minutes
def test_a_full_disk_is_one_plain_line_and_the_last_good_checkpoint_stays(finished, data, tmp_path):
    ckpts = finished / "checkpoints"
    # room for everything epoch 1 writes, with the second copy of best.pt that writing the fitted temperature into it
    # needs at the end (atomic writes need two), but not for epoch 2's second copy of the larger last.pt
    size = sum(p.stat().st_size for p in finished.rglob("*") if p.is_file())
    best, last = ((ckpts / name).stat().st_size for name in ("best.pt", "last.pt"))
    assert best < last
    size_kb = (size + (best + last) // 2) // 1024
    disk = tmp_path / "disk"
    code = textwrap.dedent(f"""
        import shutil, subprocess, sys
        args = {_train(data, disk / "run", epochs=1)!r}
        first = subprocess.run([sys.executable, "-m", "spinal_transfer", *args])
        assert first.returncode == 0
        shutil.copytree("{disk / 'run'}", "{tmp_path / 'after_epoch_1'}")
        second = subprocess.run([sys.executable, "-m", "spinal_transfer", "train", "--resume", "{disk / 'run'}",
                                 "--epochs", "3"], capture_output=True, text=True)
        sys.stderr.write(second.stderr)
        shutil.copytree("{disk / 'run'}", "{tmp_path / 'after_failure'}")
        sys.exit(second.returncode)
    """)
    res = _in_small_tmpfs(disk, size_kb, [sys.executable, "-c", code])
    _one_line_error(res, 4, "no space left on device", "needs about", "MB")
    last = tmp_path / "after_failure" / "checkpoints" / "last.pt"
    assert load_checkpoint(last)["progress"]["epoch"] >= 1                # the last good one, loadable
    assert not list((tmp_path / "after_failure").rglob("*.tmp"))


def test_a_read_only_output_folder_is_one_plain_line(data, tmp_path):
    ro = tmp_path / "ro"
    code = f"mount -o remount,ro,bind {ro} 2>/dev/null || mount -t tmpfs -o ro,size=64k tmpfs {ro}; exec \"$@\""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("user namespaces are not allowed here")
    ro.mkdir()
    res = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind {ro} {ro} && {code}", "sh", sys.executable,
                          "-m", "spinal_transfer", *_train(data, ro / "run", epochs=1)],
                         capture_output=True, text=True, env=ENV, timeout=600)
    _one_line_error(res, 4, "read-only file system", str(ro / "run"))


def test_export_to_an_unwritable_out_is_one_plain_line(finished, tmp_path):
    """QA 28: export crashed with an OSError traceback (exit 1) where its --out could not be made: read-only, or a
    file standing where a folder of the path should be."""
    (tmp_path / "plain.jpg").write_bytes(b"x")
    res = _cli("export", finished, "--out", tmp_path / "plain.jpg" / "bundle")
    _one_line_error(res, 4, "a file stands where a folder of that path should be")
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("user namespaces are not allowed here")
    ro = tmp_path / "ro"
    ro.mkdir()
    res = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind {ro} {ro} && mount -o remount,ro,bind {ro} && "
                          f"exec \"$@\"", "sh", sys.executable, "-m", "spinal_transfer", "export", str(finished),
                          "--out", str(ro / "bundle")], capture_output=True, text=True, env=ENV, timeout=600)
    _one_line_error(res, 4, "read-only file system", str(ro / "bundle"))
    assert not list(ro.iterdir())


def _train(data: Path, out: Path, **kw) -> list[str]:
    return ["train", *cli_flags(**{**TINY, "data": data, "out": out, "limit_train_batches": 2, **kw})]


@pytest.mark.slow      # 9-16 s; the default suite stays near 10 minutes
def test_out_of_memory_names_the_batch_size_and_suggests_a_smaller_one(data, tmp_path):
    """The address space is capped a few GB above what the imported libraries already map, so a batch of 128
    images at 512 px cannot be allocated: host memory runs out in the first step."""
    script = textwrap.dedent(f"""
        import resource, sys
        import torch, timm, albumentations, cv2, sklearn.metrics         # the libraries' own mappings first
        import spinal_transfer.training.train, spinal_transfer.cli
        used = sum(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize')) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (used + 3 * 2**30, resource.RLIM_INFINITY))
        from spinal_transfer.cli import main
        sys.exit(main({_train(data, tmp_path / 'run', batch_size=128, img_size=512, epochs=1)!r}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=600)
    _one_line_error(res, 4, "out of memory", "--batch-size 128", "--batch-size 64 --accum-steps 2",
                    "No checkpoint was saved yet")


# --- no silent drops -----------------------------------------------------------------------------

def _png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_class_like_folders_next_to_train_and_loose_images_are_reported(tmp_path):
    from spinal_transfer.data.splits import scan

    for split in ("train", "val", "test"):
        for c in ("cat", "dog"):
            for i in range(2):
                _png(tmp_path / split / c / f"{i}.png")
    _png(tmp_path / "owl" / "0.png")                  # next to train/: not read
    _png(tmp_path / "train" / "loose.png")            # in no class folder
    _png(tmp_path / "stray.png")                      # beside the split folders: in none
    import logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("spinal_transfer").addHandler(handler)
    try:
        s = scan(tmp_path)
    finally:
        logging.getLogger("spinal_transfer").removeHandler(handler)
    assert s.classes == ["cat", "dog"]
    assert any("not read: owl/" in r for r in records), records
    assert f"1 image file(s) directly in {tmp_path / 'train'} are in no class folder and are not used (e.g. " \
           "loose.png)" in records
    assert f"1 image file(s) directly in {tmp_path} are in no split and class folder and are not used (e.g. " \
           "stray.png)" in records


def test_symlinks_are_followed_everywhere_and_a_loop_is_read_once(tmp_path):
    from spinal_transfer.data.splits import scan

    elsewhere = tmp_path / "elsewhere"
    for i in range(3):
        _png(elsewhere / "more" / f"{i}.png")
    root = tmp_path / "data"
    for c in ("cat", "dog"):
        for i in range(4):
            _png(root / c / f"{i}.png")
    os.symlink(elsewhere / "more", root / "cat" / "linked")            # a linked sub-folder: followed (store)
    os.symlink(root / "cat", root / "cat" / "loop")                    # a loop: read once, reported
    os.symlink(elsewhere / "more" / "0.png", root / "dog" / "linked.png")   # a linked file: followed (store)
    os.symlink(tmp_path / "nowhere.png", root / "dog" / "dangling.png")     # broken: reported
    s = scan(root, val_fraction=0, test_fraction=0, follow_links=True)
    cat, dog = s.classes.index("cat"), s.classes.index("dog")
    assert sum(y == cat for _, y in s.train) == 4 + 3
    assert sum(y == dog for _, y in s.train) == 4 + 1
    notes = " ".join(s.source["notes"])
    assert "already read" in notes and "broken symbolic link" in notes


def test_a_folder_with_one_class_is_an_error_and_out_may_not_sit_inside_the_data(tmp_path, cli_run):
    for i in range(4):
        _png(tmp_path / "data" / "only" / f"{i}.png")
    res = cli_run("train", "--data", tmp_path / "data", "--backbone", "timm/test_resnet", "--weights", "none",
               "--out", tmp_path / "run")
    _one_line_error(res, 2, "only one class folder", "at least two classes")
    _png(tmp_path / "data" / "other" / "0.png")
    res = cli_run("train", "--data", tmp_path / "data", "--out", tmp_path / "data" / "run")
    _one_line_error(res, 2, "is inside the data folder")
    assert not (tmp_path / "data" / "run").exists()
