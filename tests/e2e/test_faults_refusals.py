"""Refusals leave nothing behind: a start refused for offline weights, another run's lock or data too small to
split leaves --out byte for byte as it was (not created when it did not exist)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, cli_flags, truncated_jpeg
from PIL import Image

from spinal_transfer.config import TrainConfig


REPO = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0", "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch")}


def _train(tmp_path: Path, data: Path, out: Path, **kw) -> subprocess.CompletedProcess:
    args = cli_flags(**{**TINY, "data": data, "out": out, "epochs": 1, "limit_train_batches": 1, **kw})
    return subprocess.run([sys.executable, "-m", "spinal_transfer", "train", *args], capture_output=True, text=True,
                          env=_env(tmp_path), timeout=600)


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file and folder below `folder`, the lock file included, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


def _refused(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert all(n in errors[0] for n in needles), errors[0]
    return errors[0]


@pytest.mark.slow      # 9-16 s; the default suite stays near 10 minutes
def test_offline_weights_leave_no_folder_and_an_existing_one_unchanged(three_digits, tmp_path):
    out = tmp_path / "new" / "run"
    _refused(_train(tmp_path, three_digits, out, weights="default"), "cannot load timm/test_resnet")
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    before = _tree(existing)
    _refused(_train(tmp_path, three_digits, existing, weights="default"))
    assert _tree(existing) == before


_HOLD = """
import sys
from spinal_transfer.runs.rundir import RunDir
with RunDir(sys.argv[1]).lock():
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_another_runs_lock_leaves_its_folder_as_it_was(three_digits, tmp_path):
    out = tmp_path / "busy"         # held by another process (reading .lock here would drop this process's lock)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=_env(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _tree(out)
        _refused(_train(tmp_path, three_digits, out), "is in use by", f"pid {holder.pid}")
        assert _tree(out) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_one_image_per_class_is_refused_in_one_line_before_anything_is_written(tmp_path):
    for c, value in (("cat", 10), ("dog", 200)):
        (tmp_path / "data" / c).mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(tmp_path / "data" / c / "0.png")
    res = _train(tmp_path, tmp_path / "data", tmp_path / "run")
    _refused(res, "the val and test splits are empty", "train 2, val 0, test 0")
    assert "2 class(es) have no test image (too few images to hold one out): cat (1 image), dog (1 image)" in res.stderr
    assert res.returncode == 2 and not (tmp_path / "run").exists()


TINY_FLAGS = ("--backbone", "timm/test_resnet", "--weights", "none", "--img-size", "16")


def _float_tiff(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).random((32, 32), dtype=np.float32), mode="F").save(path)


@pytest.mark.parametrize("bad", [
    lambda d, i: truncated_jpeg(d / f"{i}.jpg", seed=i),       # pass the header check, fail to decode
    lambda d, i: _float_tiff(d / f"{i}.tif"),
    lambda d, i: (d / f"{i}.png").write_bytes(b""),            # fail the header check
    lambda d, i: (d / f"{i}.png").write_text("not a picture")], ids=["truncated-jpeg", "float-tiff", "empty", "text"])
def test_a_class_whose_every_train_file_is_unreadable_is_refused_before_training(three_digits, tmp_path, cli_run,
                                                                                 bad):
    """A class folder whose every file is unreadable, whether the scan's header check sees it (0 bytes, text) or
    only decoding does (a truncated JPEG, float pixels), is refused in one line naming it, exit 2, before the run
    folder is made: the model could never learn it (before, the decode failures trained to the end, exit 0, with a
    warning that counted them as 'too few images to hold one out'). Audit's lenient scan reports both alike."""
    import shutil

    from spinal_transfer.data.splits import scan

    data = tmp_path / "data"
    for d in sorted((three_digits / "train").iterdir())[:2]:
        shutil.copytree(d, data / d.name, ignore=lambda folder, names: sorted(names)[12:])
    (data / "rocket").mkdir()
    for i in range(2):
        bad(data / "rocket", i)
    res = cli_run("train", "--data", data, "--out", tmp_path / "run", *TINY_FLAGS, "--epochs", "1", "--workers", "0")
    line = _refused(res, "rocket", "without a", "remove")
    assert res.returncode == 2 and not (tmp_path / "run").exists(), line
    assert "too few images to hold one out" not in res.stderr
    assert [(f.kind, f.split, f.label) for f in scan(data, lenient=True).problems] == [("empty_class", "train",
                                                                                         "rocket")]


@pytest.mark.parametrize("split", ["val", "test"])
def test_a_class_whose_every_val_or_test_file_fails_to_decode_is_refused_before_training(three_digits, tmp_path,
                                                                                         cli_run, split):
    """The same for a val/ or test/ class folder: a test class none of whose files decodes trained to the end
    and was named only in a warning under test metrics that said nothing of it (a val one, selection blind to
    it). One line naming the split and the class, exit 2, no run folder; audit's lenient scan reports it."""
    import shutil

    from spinal_transfer.data.splits import scan

    data = tmp_path / "data"
    shutil.copytree(three_digits, data)
    for i, f in enumerate(sorted((data / split / "digit_1").iterdir())):
        f.unlink()
        truncated_jpeg(data / split / "digit_1" / f"{i}.jpg", seed=i)
    res = cli_run("train", "--data", data, "--out", tmp_path / "run", *TINY_FLAGS, "--epochs", "1", "--workers", "0")
    line = _refused(res, "without an image that can be decoded in a split: digit_1 in " + split,
                    "metrics would say nothing")
    assert res.returncode == 2 and not (tmp_path / "run").exists(), line
    assert [(f.kind, f.split, f.label, f.path) for f in scan(data, lenient=True).problems] == [
        ("empty_class", split, "digit_1", str(data / split / "digit_1"))]


def test_outputs_never_replace_what_the_command_did_not_write(finished_run, three_digits, tmp_path, cli_run):
    """--out of predict, report, evaluate and export: a file of another kind (an input image, notes), a run's
    own folder, or a folder of the user's files is refused before the work, in one line, and left as it was; an
    earlier output of the same command is replaced, and the command says so."""
    import shutil

    image = tmp_path / "keep.png"
    shutil.copyfile(next((three_digits / "test" / "digit_1").iterdir()), image)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my readme")
    training_image = next((three_digits / "train" / "digit_0").iterdir())     # a PNG: the kind these write
    labels, page = tmp_path / "labels.csv", tmp_path / "page.html"            # the kinds predict and report write
    labels.write_text("id,label\n1,cat\n")
    page.write_text("<!DOCTYPE html><html><head><title>my page</title></head></html>")
    before = {p: p.read_bytes() for p in (image, notes, mine / "README.md", training_image, labels, page)}
    run_page = (finished_run / "report.html").read_bytes()
    refused = [
        (("predict", finished_run, image, "--out", image), "is not a .csv file"),
        (("predict", finished_run, image, "--out", tmp_path), "is a folder"),
        (("report", finished_run, "--out", notes), "is not a .html or .htm file"),
        (("evaluate", finished_run, "--out", finished_run), "is a run folder"),
        (("evaluate", finished_run, "--out", notes), "is a file"),
        (("export", finished_run, "--out", notes), "is a file"),
        (("export", finished_run, "--out", mine), "README.md that no export wrote"),
        (("export", finished_run, "--out", finished_run), "is a run folder"),
        (("export", finished_run, "--out", three_digits), "holds other files (test, train, val) and no earlier bundle"),
        (("predict", finished_run, image, "--out", tmp_path / "preds.txt"), "give a name ending in .csv"),
        (("predict", finished_run, image, "--out", image / "preds.csv"), "keep.png is a file, not a folder"),
        (("report", finished_run, "--screenshot", tmp_path / "page.jpg"), "writes a PNG file; give a name ending"),
        (("show-batch", "--data", three_digits, "--out", tmp_path / "batch.jpg"), "ending in .png"),
        (("show-batch", "--data", three_digits, *TINY_FLAGS, "--out", training_image), "is not a .png file this"),
        (("show-batch", "--data", three_digits, *TINY_FLAGS, "--out", training_image.parent / "batch.png"),
         "inside the data folder"),                 # a new file there: it would be read as a training image
        (("lr-find", "--data", three_digits, *TINY_FLAGS, "--out", training_image.parent / "lr.png"),
         "inside the data folder"),
        (("show-batch", "--data", three_digits, *TINY_FLAGS, "--out", image), "is not a .png file this command wrote"),
        (("lr-find", "--data", three_digits, *TINY_FLAGS, "--out", image), "is not a .png file this command wrote"),
        (("report", finished_run, "--screenshot", image), "is not a .png file this command wrote"),
        (("predict", finished_run, image, "--out", labels), "is not a .csv file this command wrote"),
        (("report", finished_run, "--out", page), "is not a .html or .htm file this command wrote"),
    ]
    for args, says in refused:
        res = cli_run(*args)
        _refused(res, says)
        assert res.returncode == 2
    assert {p: p.read_bytes() for p in before} == before and (finished_run / "report.html").read_bytes() == run_page
    assert not (training_image.parent / "batch.png").exists() and not (training_image.parent / "lr.png").exists()

    bundle = tmp_path / "bundle"
    assert cli_run("export", finished_run, "--out", bundle).returncode == 0
    (bundle / "model.onnx").write_bytes(b"a stale format of the earlier export")
    res = cli_run("export", finished_run, "--out", bundle)
    assert res.returncode == 0 and "replaced the earlier bundle" in res.stdout and "model.onnx" in res.stdout
    assert not (bundle / "model.onnx").exists()
    csv = tmp_path / "p.csv"
    for _ in range(2):
        res = cli_run("predict", bundle, image, "--out", csv)
    assert res.returncode == 0 and "replacing the file that was there" in res.stderr
    for _ in range(2):
        res = cli_run("evaluate", finished_run, "--out", tmp_path / "eval")
    assert res.returncode == 0 and "(replacing the metrics_test.json, predictions_test.csv, report.html" in res.stderr


def test_a_commands_out_folder_keeps_the_users_own_files_of_its_output_names(finished_run, three_digits, tmp_path,
                                                                             cli_run):
    """audit, compare, tune, reproduce and evaluate write fixed names into their --out folder: a file there of
    one of those names that spinal-transfer did not write (no mark; a CSV without the command's header) is
    refused, in one line naming it, before any work (no feature cache, run or study appears), and left as it was.
    Their own files from an earlier run are replaced (the reruns in test_audit, test_compare, test_tune and
    test_outputs_never_replace_what_the_command_did_not_write)."""
    tiny = ["--data", three_digits, *TINY_FLAGS, "--workers", "0", "--epochs", "1"]
    cases = [(("audit", "--data", three_digits, *TINY_FLAGS, "--workers", "0"), "audit.csv", "my,own,notes\n"),
             (("audit", "--data", three_digits, *TINY_FLAGS, "--workers", "0"), "audit.html", "<html>mine</html>"),
             (("compare", *tiny, "--heads", "linear", "spinal", "--mode", "frozen"), "compare.csv", "head,mine\n"),
             (("compare", *tiny, "--heads", "linear", "spinal"), "compare.md", "# my notes\n"),
             (("tune", *tiny, "--mode", "frozen", "--trials", "1"), "best.yaml", "lr: 0.1\n"),
             (("tune", *tiny, "--trials", "1"), "trials.csv", "number,state\n"),
             (("reproduce", "--recipes", "recipes/smoke/*.yaml", "--data-root", tmp_path, "--seeds", "1"),
              "results.html", "<!DOCTYPE html><html>mine</html>"),
             (("reproduce", "--recipes", "recipes/smoke/*.yaml", "--collect"), "results.csv", "recipe\n"),
             (("evaluate", finished_run), "report.html", "<!DOCTYPE html><html>mine</html>"),
             (("evaluate", finished_run), "metrics_test.json", '{"top1": 1.0}')]
    for i, (args, name, text) in enumerate(cases):
        out = tmp_path / f"out{i}" / "Q"
        out.mkdir(parents=True)
        (out / name).write_text(text)
        res = cli_run(*args, "--out", out)
        _refused(res, str(out / name), "is not a file spinal-transfer wrote", "give another --out, or move the file")
        assert res.returncode == 2, args
        assert os.listdir(out.parent) == ["Q"] and os.listdir(out) == [name] and (out / name).read_text() == text


def test_predict_writes_a_file_name_that_is_not_utf8_as_its_own_bytes(finished_run, three_digits, tmp_path, cli_run):
    """A file name that is not valid UTF-8 (Python holds it with surrogate escapes) is written to the CSV as the
    bytes the file system has, instead of failing after inference with UnicodeEncodeError."""
    import shutil

    folder = tmp_path / "names"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/bad\xff.png"
    shutil.copyfile(next((three_digits / "test" / "digit_1").iterdir()), raw)
    res = cli_run("predict", finished_run, folder, "--out", tmp_path / "p.csv")
    assert res.returncode == 0, res.stderr[-2000:]
    assert raw in (tmp_path / "p.csv").read_bytes()


def _named(folder: Path, raw_name: bytes) -> str:
    """The path (as Python holds it: surrogate escapes) of a file in `folder` whose name is the bytes `raw_name`."""
    return os.fsdecode(os.path.join(os.fsencode(folder), raw_name))


def test_train_and_evaluate_keep_a_file_name_that_is_not_utf8_as_its_own_bytes(three_digits, tmp_path, cli_run):
    """A file name that is not valid UTF-8 (Python holds it with surrogate escapes) is trained on, tested and
    listed like any other: splits.json, the split fingerprints, skipped_files.txt, the predictions CSVs and the
    report pages write it as the bytes the file system has, and each reads back to the same file (before, train
    died hashing the splits, UnicodeEncodeError, and evaluate --data reading its own CSV back, UnicodeDecodeError).
    train.log: tests/utils/test_runtime.py."""
    import shutil

    from spinal_transfer.data.skiplog import SkipLog
    from spinal_transfer.evaluation.interpret import read_predictions

    data = tmp_path / "data"
    for d in sorted((three_digits / "train").iterdir())[:2]:           # 2 classes, 12 images per split each
        for split in ("train", "val", "test"):
            shutil.copytree(three_digits / split / d.name, data / split / d.name,
                            ignore=lambda folder, names: sorted(names)[12:])
    image = next((three_digits / "test" / "digit_1").iterdir())
    trained = _named(data / "train" / "digit_0", b"bad\xff\xfeutf8.png")     # a real image: trained on
    tested = _named(data / "test" / "digit_1", b"t\xfe.png")
    cut = _named(data / "train" / "digit_1", b"cut\xff.jpg")                 # fails to decode: listed as skipped
    for path in (trained, tested):
        shutil.copyfile(image, path)
    truncated_jpeg(Path(cut))
    run = tmp_path / "run"
    res = cli_run("train", "--data", data, "--out", run, *TINY_FLAGS, "--epochs", "1", "--workers", "0")
    assert res.returncode == 0, res.stderr[-2000:]
    record = json.loads((run / "splits.json").read_text())
    train_files = [str(data / rel) for rel, *_ in record["splits"]["train"]]
    assert trained in train_files and os.path.exists(train_files[train_files.index(trained)])
    assert list(SkipLog(run / "skipped_files.txt").entries) == [cut] and os.path.exists(cut)
    assert os.fsencode(cut) in (run / "skipped_files.txt").read_bytes()
    tested_rows = [r.path for r in read_predictions(run / "test_predictions.csv") if r.path == tested]
    assert tested_rows == [tested] and os.path.exists(tested_rows[0])
    assert os.fsencode(tested) in (run / "test_predictions.csv").read_bytes()
    assert os.fsencode(cut) in (run / "report.html").read_bytes()                 # the page's skipped files
    assert cli_run("report", run).returncode == 0                                 # reads the CSV back

    other = tmp_path / "other" / "digit_1"
    shutil.copytree(three_digits / "test" / "digit_1", other, ignore=lambda folder, names: sorted(names)[4:])
    named = _named(other, b"e\xff.png")
    shutil.copyfile(image, named)
    res = cli_run("evaluate", run, "--data", other.parent, "--out", tmp_path / "eval", "--workers", "0")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = read_predictions(tmp_path / "eval" / "predictions_test.csv")
    assert len(rows) == 5 and named in [r.path for r in rows] and all(os.path.exists(r.path) for r in rows)
    assert os.fsencode(named) in (tmp_path / "eval" / "predictions_test.csv").read_bytes()


def test_predict_with_no_readable_image_fails_and_writes_nothing(finished_run, tmp_path, cli_run):
    empty, text = tmp_path / "zero.jpg", tmp_path / "note.png"
    empty.write_bytes(b"")
    text.write_text("not an image")
    res = cli_run("predict", finished_run, empty, text, "--out", tmp_path / "p.csv")
    _refused(res, "none of the 2 image file(s) could be read")
    assert res.returncode == 2 and not (tmp_path / "p.csv").exists()
    assert str(empty) in res.stderr and str(text) in res.stderr           # each named, with its reason


def test_compare_and_tune_refuse_a_bad_out_or_flag_before_writing_anything(three_digits, finished_run, tmp_path,
                                                                             cli_run):
    """An --out inside the data folder (its files would be read as a class by the next train), or that is a file;
    a seed Optuna cannot take; a multi-stage schedule a trial could not record: one line, exit 2, and nothing
    written, inside the data folder least of all."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(three_digits, data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    afile = tmp_path / "afile"
    afile.write_text("mine")
    tiny = ["--data", data, "--backbone", "timm/test_resnet", "--weights", "none", "--img-size", "16", "--epochs", "1"]
    cases = [(("compare", *tiny, "--heads", "linear", "spinal", "--out", data / "results"), "inside the data folder"),
             (("tune", *tiny, "--out", data / "tune"), "inside the data folder"),
             (("compare", *tiny, "--heads", "linear", "spinal", "--out", afile), "is a file"),
             (("tune", *tiny, "--out", afile), "is a file"),
             (("compare", *tiny, "--heads", "linear", "spinal", "--out", finished_run), "is the folder of a train run"),
             (("tune", *tiny, "--out", finished_run), "is the folder of a train run"),
             (("tune", *tiny, "--stages", "[{epochs: 1, lr: 0.01}, {epochs: 1, lr: 0.001}]", "--out", tmp_path / "t"),
              "remove it")]
    for args, says in cases:
        res = cli_run(*args)
        _refused(res, says)
        assert res.returncode == 2, args
    res = cli_run("tune", *tiny, "--sampler-seed", "-5", "--out", tmp_path / "t")    # argparse's refusal (Optuna
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1            # raised a ValueError)
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before and afile.read_text() == "mine"
    assert not (tmp_path / "t").exists() and not (finished_run / "runs").exists()


def test_report_and_evaluate_say_when_a_run_is_unfinished_or_its_images_moved(finished_run, tmp_path, cli_run):
    """report on a run whose data folder moved would replace its page with one of placeholders: refused, or
    written elsewhere with a note; on an unfinished run it says so and how to finish it, and evaluate notes that
    its numbers are the best epoch so far, uncalibrated."""
    import csv
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(finished_run, moved)
    rows = list(csv.DictReader((moved / "test_predictions.csv").open(newline="")))
    for row in rows:
        row["path"] = str(tmp_path / "gone" / Path(row["path"]).name)
    with (moved / "test_predictions.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    page = (moved / "report.html").read_bytes()
    res = cli_run("report", moved)
    _refused(res, f"{len(rows)} of the test images", "--out")
    assert res.returncode == 2 and (moved / "report.html").read_bytes() == page
    res = cli_run("report", moved, "--out", tmp_path / "elsewhere.html")
    assert res.returncode == 0 and "placeholders" in res.stderr and (tmp_path / "elsewhere.html").is_file()

    unfinished = tmp_path / "unfinished"
    shutil.copytree(finished_run, unfinished)
    (unfinished / "report.json").unlink()                  # last.pt stays: a run stopped after its last epoch
    res = cli_run("report", unfinished)
    _refused(res, "has not finished (2 of 2 epochs done)", f"train --resume {unfinished}")
    res = cli_run("evaluate", unfinished)
    assert res.returncode == 0 and "note: " in res.stderr and "best epoch so far, uncalibrated" in res.stderr


def test_a_run_records_its_data_folder_absolute_and_resume_stays_in_its_own_folder(three_digits, finished_run,
                                                                                  tmp_path, cli_run, monkeypatch):
    """--data as typed (relative) would be read against the directory a later --resume is started from: another
    folder named data there would be trained and tested on. And --resume with another --out was ignored."""
    import shutil

    shutil.copytree(three_digits, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    res = cli_run("train", *cli_flags(**{**TINY, "data": "data", "out": "run", "epochs": 1, "limit_train_batches": 1}))
    assert res.returncode == 0, res.stderr[-2000:]
    assert TrainConfig.from_yaml(tmp_path / "run" / "config.yaml").data == str(tmp_path / "data")
    res = cli_run("train", "--resume", finished_run, "--epochs", "3", "--out", tmp_path / "elsewhere")
    _refused(res, "a run continues in its own folder")
    assert res.returncode == 2 and not (tmp_path / "elsewhere").exists()
    _refused(cli_run("train", "--resume", tmp_path / "nothing"), "it does not exist")


def test_a_timm_backbone_of_fixed_input_size_trains_at_another_size_and_a_torchvision_one_is_refused(
        three_digits, tmp_path, cli_run):
    """A timm ViT built for 160 px (timm/test_vit) is built for the asked 32 px, as timm's img_size= does (it was
    refused), and that size travels with it: evaluate rebuilds it, export's bundle runs the same logits. A
    torchvision ViT, whose weights fix its size, fails inside its first training step at 32 px: it is refused
    before the run folder is written, naming the size it takes."""
    run = tmp_path / "vit"
    res = cli_run("train", *cli_flags(**{**TINY, "data": three_digits, "out": run, "epochs": 1,
                                         "backbone": "timm/test_vit", "limit_train_batches": 1}))
    assert res.returncode == 0, res.stderr[-2000:]
    res = cli_run("evaluate", run)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["top1"] == json.loads((run / "report.json").read_text())["test"]["top1"]
    res = cli_run("export", run, "--out", tmp_path / "bundle", "--format", "onnx")
    assert res.returncode == 0, res.stderr[-2000:]
    res = cli_run("train", "--data", three_digits, "--backbone", "torchvision/vit_b_16", "--weights", "none",
                  "--img-size", "32", "--epochs", "1", "--out", tmp_path / "run")
    _refused(res, "torchvision/vit_b_16 does not run on 32 px images (Wrong image height! Expected 224 but got 32!); "
                  "use --img-size 224 (its own size), or another backbone")
    assert res.returncode == 2 and not (tmp_path / "run").exists()
