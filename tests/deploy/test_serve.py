"""Serving: `Predictor` (one shared decode + preprocessing with `predict`), `export --quantize int8` with its
accuracy guard, and `predict --runner`. The model is the `finished_run` fixture (timm test_resnet + spinal head
trained on digits 0-2 at 32 px), exported via the CLI with its int8 ONNX file."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from spinal_transfer.data.splits import list_images  # noqa: E402
from spinal_transfer.deploy.export import INT8_FILE  # noqa: E402
from spinal_transfer.deploy.predict import predict  # noqa: E402
from spinal_transfer.deploy.predictor import Predictor  # noqa: E402
from spinal_transfer.errors import CheckpointError, ConfigError, DataError  # noqa: E402
from spinal_transfer.utils.runtime import torch_threads  # noqa: E402

NUMBERS = r"int8 top-1 \d+\.\d\d% vs fp32 \d+\.\d\d%: a drop of -?\d+\.\d\d points"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """32-px images gain nothing from intra-op threads; on 2 shared cores they cost several times."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def bundle(finished_run, tmp_path_factory) -> Path:
    """The run exported with ONNX and int8 kept by --force at the tightest bound (0 points), so the int8 file is
    there whatever this small model's drop."""
    from spinal_transfer.cli import main

    out = tmp_path_factory.mktemp("serve") / "bundle"
    assert main(["export", str(finished_run), "--out", str(out), "--format", "onnx", "--quantize", "int8",
                 "--max-accuracy-drop", "0", "--force"]) == 0
    return out


@pytest.fixture(scope="module")
def images(three_digits) -> list[str]:
    return list_images([three_digits / "test"])[::3]         # 36 images, all three classes


def _same(top_a, top_b, tol=1e-6):
    assert [[c for c, _ in row] for row in top_a] == [[c for c, _ in row] for row in top_b]
    for a, b in zip(top_a, top_b):
        assert [p for _, p in a] == pytest.approx([p for _, p in b], abs=tol)


@pytest.mark.parametrize("which, runner, tta", [("bundle", "auto", False), ("bundle", "torch", False),
                                                ("bundle", "torch", True), ("run", "auto", False),
                                                ("onnx", "auto", False)])
def test_predictor_matches_predict(which, runner, tta, bundle, finished_run, images):
    from spinal_transfer.evaluation.evaluate import TTA

    source = {"bundle": bundle, "run": finished_run, "onnx": bundle / "model.onnx"}[which]
    p = Predictor(source, device="cpu", runner=runner, tta=tta, tta_crops=5 if tta else 0)
    preds = predict(source, images, workers=0, device="cpu", runner=runner,
                    tta=TTA(flip=True, crops=5) if tta else None)
    assert p.runner == preds.runner == {"bundle": "onnx-int8" if runner == "auto" else runner, "run": "torch",
                                        "onnx": "onnx"}[which]
    assert p.classes == preds.classes == ["digit_0", "digit_1", "digit_2"] and preds.paths == images
    ours = p.predict(images, topk=2)
    assert len(ours) == len(images) and all(len(row) == 2 for row in ours)
    _same(ours, preds.top(2))
    assert preds.seconds > 0 and preds.images_per_second > 0


def test_predictor_takes_paths_pil_images_and_arrays(bundle, images):
    p = Predictor(bundle, device="cpu", runner="torch")
    from_paths = p.predict(images[:5], topk=3)
    pil = [Image.open(f) for f in images[:5]]
    arrays = [np.asarray(im.convert("RGB")) for im in pil]
    _same(p.predict(pil, topk=3), from_paths, tol=0)
    _same(p.predict(arrays, topk=3), from_paths, tol=0)
    _same(p.predict(arrays[0], topk=1), [from_paths[0][:1]])          # one image alone (batch of 1: ~1e-9)
    assert sum(prob for _, prob in from_paths[0]) == pytest.approx(1.0)
    for bad in (np.zeros((8, 8), np.uint8), np.zeros((0, 0, 3), np.uint8), 3, None):
        with pytest.raises(DataError, match="HxWx3 uint8"):
            p.predict([bad])
        with pytest.raises(DataError, match="HxWx3 uint8"):
            p.predict(bad)                                            # alone too: not iterated as a sequence
    with pytest.raises(ConfigError, match=r"^batch_size=0 is out of range: it must be a whole number >= 1$"):
        Predictor(bundle, device="cpu", runner="torch", batch_size=0)     # not replaced by the default unsaid
    with pytest.raises(ConfigError, match=r"^batch_size='8' is out of range"):
        Predictor(bundle, device="cpu", runner="torch", batch_size="8")
    with pytest.raises(ConfigError, match=r"^topk=2.5 is out of range"):
        p.predict(images[:1], topk=2.5)


def test_a_pil_image_fresh_from_its_file_predicts_as_its_path(bundle, tmp_path):
    """A large JPEG path is decoded at libjpeg's reduced scale, as training decoded it; the same JPEG opened by
    the caller with PIL goes the same way, so a web app's probabilities equal predict's and serve's."""
    from sklearn.datasets import load_sample_images

    p = Predictor(bundle, device="cpu", runner="torch")
    jpeg = tmp_path / "photo.jpg"
    Image.fromarray(load_sample_images().images[0]).save(jpeg, quality=90)    # 640x427: decoded at 1/8 scale
    from_path = p.probabilities(jpeg)
    assert torch.equal(p.probabilities(Image.open(jpeg)), from_path)
    assert torch.equal(p.probabilities(jpeg.read_bytes()), from_path)
    decoded = Image.open(jpeg).convert("RGB")           # decoded by the caller: taken at its full resolution
    assert p.probabilities(decoded).shape == from_path.shape


def test_a_pil_image_moved_to_a_later_frame_predicts_that_frame(bundle, tmp_path):
    """A multi-frame TIFF after `seek(1)` is its second frame, not the file's first."""
    from sklearn.datasets import load_sample_images

    p = Predictor(bundle, device="cpu", runner="torch")
    frames = [Image.fromarray(im).resize((64, 48)) for im in load_sample_images().images]
    tif = tmp_path / "two.tif"
    frames[0].save(tif, save_all=True, append_images=frames[1:])
    im = Image.open(tif)
    im.seek(1)
    assert torch.equal(p.probabilities(im), p.probabilities(np.asarray(frames[1])))
    assert not torch.equal(p.probabilities(frames[0]), p.probabilities(frames[1]))      # the frames tell apart


def test_quantized_bundle_records_both_numbers(bundle, finished_run):
    from spinal_transfer.runs.rundir import RunDir

    config = json.loads((bundle / "config.json").read_text())
    q = config["formats"]["onnx-int8"]
    run = RunDir(finished_run)
    splits = run.read_json(run.splits)["splits"]
    assert q["file"] == INT8_FILE and (bundle / INT8_FILE).is_file() and "onnx" in config["formats"]
    assert q["calibration_images"] == min(512, len(splits["train"]))
    assert (q["eval_split"], q["eval_images"]) == ("val", len(splits["val"]))
    assert q["top1_drop_points"] == pytest.approx(100 * (q["top1_fp32"] - q["top1_int8"]))
    assert q["forced"] is (q["top1_drop_points"] > 1e-9) and q["max_accuracy_drop"] == 0
    report = run.read_report()
    # fp32 ONNX is the trained model: its val top-1 is the run's own (within one image of rounding)
    assert q["top1_fp32"] == pytest.approx(report["val"]["top1"], abs=1.5 / len(splits["val"]))
    card = (bundle / "README.md").read_text()
    assert f"int8 {100 * q['top1_int8']:.2f}% vs fp32 {100 * q['top1_fp32']:.2f}%" in card


def test_accuracy_guard_refuses_int8_and_changes_nothing(finished_run, tmp_path, cli_run, monkeypatch):
    """An int8 model that scores 50 points below fp32 (its measured top-1 lowered: this small model's real drop
    may be 0) is refused after the fallback's tries, in one line with both numbers, and nothing is written."""
    from spinal_transfer.deploy import quantize

    measured = quantize.compare_onnx

    def int8_loses_50_points(paths, batches, threads=None):
        cmp = measured(paths, batches, threads)
        cmp["top1"] = [cmp["top1"][0]] + [max(0.0, cmp["top1"][0] - 0.5)] * (len(paths) - 1)
        return cmp
    monkeypatch.setattr(quantize, "compare_onnx", int8_loses_50_points)
    out = tmp_path / "bundle"
    res = cli_run("export", finished_run, "--out", out, "--format", "onnx", "--quantize", "int8")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr
    assert re.search(NUMBERS, lines[0]) and "--force" in lines[0] and "--max-accuracy-drop" in lines[0]
    assert not (out / INT8_FILE).exists() and not (out / "config.json").exists()


def test_int8_export_of_a_run_whose_data_folder_moved_takes_data(three_digits, tmp_path, cli_run):
    """int8 calibrates on the run's train images and checks on its val images: after the data folder moved,
    `export --quantize int8` says to give --data, and with it finds the images at their new place."""
    from conftest import tiny_cfg

    from spinal_transfer.training.train import run

    data = tmp_path / "data"
    for folder in sorted(three_digits.glob("*/*")):                # 8 images a class and split
        (data / folder.relative_to(three_digits)).mkdir(parents=True)
        for f in sorted(folder.glob("*.png"))[:8]:
            shutil.copy(f, data / f.relative_to(three_digits))
    run(tiny_cfg(data, tmp_path / "run", epochs=1))
    data.rename(tmp_path / "moved")
    args = ["export", tmp_path / "run", "--out", tmp_path / "bundle", "--quantize", "int8", "--force"]
    res = cli_run(*args)
    assert res.returncode == 2 and "give its new place with --data" in res.stderr, res.stderr[-2000:]
    res = cli_run(*args, "--data", tmp_path / "moved")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "bundle" / INT8_FILE).is_file()


def _small_copy(three_digits: Path, data: Path, per_folder: int) -> Path:
    """The first `per_folder` images of each class and split of `three_digits`, at their places under `data`."""
    for folder in sorted(three_digits.glob("*/*")):
        (data / folder.relative_to(three_digits)).mkdir(parents=True)
        for f in sorted(folder.glob("*.png"))[:per_folder]:
            shutil.copy(f, data / f.relative_to(three_digits))
    return data


@pytest.mark.slow      # 9-16 s; the default suite stays near 10 minutes
def test_int8_export_on_another_folder_calibrates_and_guards_on_disjoint_images(three_digits, tmp_path, cli_run,
                                                                                monkeypatch):
    """`export --quantize int8 --data OTHER`, OTHER not the run's folder: the accuracy guard never scores an image
    int8 was calibrated on. A flat OTHER (it was: calibrated on up to 512 of all its images, the guard scored all
    of them) is split stratified by class with seed 0, half for the guard; one with train/ and test/ but no val/
    (it was: refused, "no val/ folder; choose --split", an option export has not) calibrates on train/ and is
    guarded on test/, less the test/ files that are byte-identical copies of train/ ones (under other names). The
    stderr line says which images did what; the run's own folder is unchanged (other tests)."""
    import math

    import spinal_transfer.deploy.export as export_module
    from conftest import tiny_cfg

    from spinal_transfer.training.train import run

    run(tiny_cfg(_small_copy(three_digits, tmp_path / "data", 8), tmp_path / "run", epochs=1))
    flat = tmp_path / "flat"                          # images the run never saw: the test/ images past the 8th
    for d in sorted((three_digits / "test").iterdir()):
        (flat / d.name).mkdir(parents=True)
        for f in sorted(d.glob("*.png"))[8:]:
            shutil.copy(f, flat / d.name)
    split = tmp_path / "split"
    for part in ("train", "test"):
        for d in sorted((three_digits / part).iterdir()):
            shutil.copytree(d, split / part / d.name, ignore=lambda _, names: sorted(names)[:8])
    copied = tmp_path / "copied"                      # split, and 3 of its train/ images again in test/, renamed
    shutil.copytree(split, copied)
    copies = [shutil.copy(f, copied / "test" / f.parent.name / f"again_{f.name}")
              for f in sorted((copied / "train" / "digit_1").glob("*.png"))[:3]]
    read: list[list[str]] = []
    real = export_module.make_loader
    monkeypatch.setattr(export_module, "make_loader", lambda samples, *a, **k: (
        read.append([p for p, _ in samples]), real(samples, *a, **k))[1])
    for other in (flat, split, copied):
        read.clear()
        bundle = tmp_path / f"bundle_{other.name}"
        res = cli_run("export", tmp_path / "run", "--out", bundle, "--quantize", "int8", "--force", "--data", other)
        assert res.returncode == 0, res.stderr[-2000:]
        (calibration, guard), everything = read[-2:], sorted(map(str, other.rglob("*.png")))
        assert not set(calibration) & set(guard) and len(set(calibration)) == len(calibration)
        q = json.loads((bundle / "config.json").read_text())["formats"]["onnx-int8"]
        assert (q["calibration_images"], q["eval_images"]) == (len(calibration), len(guard))
        line = next(x for x in res.stderr.splitlines() if x.startswith("int8: calibrated on"))
        if other is flat:                         # n images: ceil(n / 2) guard, the rest calibrate (n < 1024)
            n = len(everything)
            assert (len(guard), len(calibration)) == (math.ceil(n / 2), n - math.ceil(n / 2))
            assert sorted(calibration + guard) == everything and q["eval_split"] == "held-out"
            for c in ("digit_0", "digit_1", "digit_2"):        # stratified: each class halved
                assert abs(sum(f"/{c}/" in p for p in guard) - sum(f"/{c}/" in p for p in calibration)) <= 1
            assert f"{len(calibration)} of the {n} images of {flat}" in line and "seed 0" in line
            assert f"guard scored {len(guard)} others (the other {len(guard)} of the {n} images" in line
            coarse = next(x for x in res.stderr.splitlines() if "the accuracy guard measured only" in x)
            assert "give a bigger --data folder (or one with train/ and val/ folders)" in coarse   # not a run's val
            assert "val split" not in coarse and "are not measured" not in res.stderr
        else:
            left_out = set(map(str, copies)) if other is copied else set()
            assert sorted(calibration) == sorted(map(str, (other / "train").rglob("*.png")))
            assert sorted(guard) == sorted(set(map(str, (other / "test").rglob("*.png"))) - left_out)
            assert q["eval_split"] == "test" and f"train/ of {other}" in line and f"test/ of {other}" in line
            assert ("3 of them left out: byte-identical copies" in line) == (other is copied)


def test_int8_export_on_another_folder_too_small_or_with_an_unknown_class_says_what_works(finished_run, three_digits,
                                                                                         tmp_path, cli_run):
    """`export --quantize int8 --data OTHER` refuses in one line that says what works: OTHER with one image a class
    (it was: a warning that "val metrics are not measured", a split export does not have, then an error saying
    what was found only), and OTHER with a class folder the model does not know (it said "move them out to
    evaluate the rest", evaluate's words)."""
    one = tmp_path / "one"
    for d in sorted((three_digits / "test").iterdir()):
        (one / d.name).mkdir(parents=True)
        shutil.copy(sorted(d.glob("*.png"))[0], one / d.name)
    args = ["export", finished_run, "--out", tmp_path / "bundle", "--format", "onnx", "--quantize", "int8", "--data"]
    res = cli_run(*args, one)
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "needs at least 2 images of a class (one to calibrate, one for the guard), or train/ and val/ (or " \
           "test/) folders" in errors[0] and "the 3 images of" in errors[0]
    assert "not measured" not in res.stderr and "val/ split" not in res.stderr
    shutil.copytree(one / "digit_0", one / "bird")
    res = cli_run(*args, one)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].endswith("move them out, or give a folder without them")
    assert not (tmp_path / "bundle").exists()


def test_predict_runner_onnx_int8_agrees_with_predictor(bundle, images, tmp_path, cli_run):
    folder = tmp_path / "photos"
    folder.mkdir()
    for f in images:
        shutil.copy(f, folder / Path(f).name)
    out = tmp_path / "preds.csv"
    res = cli_run("predict", bundle, folder, "--runner", "onnx-int8", "--device", "cpu", "--workers", "0",
                  "--topk", "1", "--out", out)
    assert res.returncode == 0, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"{len(images)} images in \d+\.\d\d s with onnx-int8: \d+\.\d images/s", last), last
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    files = [r[0] for r in rows]
    ours = Predictor(bundle, device="cpu", runner="onnx-int8").predict(files, topk=1)
    assert [r[1] for r in rows] == [top[0][0] for top in ours]
    assert [float(r[2]) for r in rows] == pytest.approx([top[0][1] for top in ours], abs=1e-6)


def test_runner_choices_and_errors(bundle, finished_run, images, tmp_path, cli_run):
    assert Predictor(bundle / INT8_FILE, device="cpu").runner == "onnx-int8"
    assert Predictor(bundle, device="cpu", runner="onnx").runner == "onnx"
    assert Predictor(bundle / "model.onnx", device="cpu", runner="torch").runner == "torch"
    # a file named runs as itself; a --runner of another kind runs that kind of the same bundle
    assert Predictor(bundle / INT8_FILE, device="cpu", runner="onnx").runner == "onnx"
    assert Predictor(bundle / "model.onnx", device="cpu", runner="onnx-int8").runner == "onnx-int8"
    assert Predictor(bundle / "model.safetensors", device="cpu").runner == "torch"
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    shutil.copy(bundle / "model.safetensors", weights_only)
    with pytest.raises(CheckpointError, match="has model.safetensors but no config.json"):
        Predictor(weights_only, device="cpu")
    with pytest.raises(ConfigError, match="runner=onnx-int8 needs a bundle"):
        Predictor(finished_run, device="cpu", runner="onnx-int8")
    only_onnx = tmp_path / "only_onnx"
    shutil.copytree(bundle, only_onnx)
    (only_onnx / INT8_FILE).unlink()
    assert Predictor(only_onnx, device="cpu").runner == "onnx"
    res = cli_run("predict", only_onnx, images[0], "--runner", "onnx-int8", "--out", tmp_path / "p.csv")
    assert res.returncode == 2 and f"has no {INT8_FILE} for --runner onnx-int8" in res.stderr
    assert "--quantize int8" in res.stderr and "Traceback" not in res.stderr
    res = cli_run("export", finished_run, "--out", tmp_path / "b", "--force")
    assert res.returncode == 2 and "--quantize int8 only" in res.stderr


def test_help_lists_the_new_options(cli_run, capsys):
    for command, options in (("export", ["--quantize", "--max-accuracy-drop", "--force"]),
                             ("predict", ["--runner"])):
        with pytest.raises(SystemExit):
            cli_run(command, "--help")
        text = capsys.readouterr().out
        examples = text[text.index("examples:"):]
        for option in options:
            assert option in text[:text.index("examples:")] and option in examples, (command, option)


def test_auto_says_when_a_model_file_config_json_lists_is_gone(bundle, tmp_path, caplog):
    """QA 28: with model.int8.onnx deleted from a bundle, --runner auto quietly ran model.onnx (other
    probabilities than the int8 ones it gave before). It still runs what is there, and says the file is gone."""
    from spinal_transfer.deploy.predict import resolve_runner

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    with caplog.at_level("WARNING", logger="spinal_transfer"):
        assert resolve_runner(copy, "auto", torch.device("cpu")) == ("onnx-int8", copy / INT8_FILE)
    assert not caplog.records
    (copy / INT8_FILE).unlink()
    with caplog.at_level("WARNING", logger="spinal_transfer"):
        assert resolve_runner(copy, "auto", torch.device("cpu")) == ("onnx", copy / "model.onnx")
    assert [r.getMessage() for r in caplog.records] == [
        f"{INT8_FILE} of {copy} is missing though config.json lists it (removed since export); --runner auto runs "
        f"what is there"]
