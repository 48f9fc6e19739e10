"""The bundle's predict_onnx.py: run without spinal-transfer importable, it gives `Predictor`'s probabilities for
the same files (decoding paths of every kind: large JPEGs decoded at a reduced scale, greyscale, CMYK, EXIF
rotation, alpha, palette transparency, 16-bit, WebP, an image smaller than the input), and its preprocessing
equals the evaluation transform bit for bit under every eval resize mode."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import TINY, bomb_png, save_oriented, write_digits_folder
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
skd = pytest.importorskip("skimage.data")

from spinal_transfer import Predictor                                       # noqa: E402
from spinal_transfer.cli import main as cli                                 # noqa: E402
from spinal_transfer.config import TrainConfig                              # noqa: E402
from spinal_transfer.data import images as package_images                   # noqa: E402
from spinal_transfer.deploy import predict_onnx as standalone               # noqa: E402
from spinal_transfer.deploy.export import STANDALONE, eval_transform        # noqa: E402
from spinal_transfer.deploy.predict import predict                         # noqa: E402
from spinal_transfer.training.train import run                              # noqa: E402

BLOCKED = ("import runpy, sys; sys.modules['spinal_transfer'] = None; sys.argv = sys.argv[1:]; "
           "runpy.run_path(sys.argv[0], run_name='__main__')")    # `import spinal_transfer` raises in there


def _images(folder: Path) -> list[Path]:
    """Real photographs written in the formats and modes a user's folder holds."""
    folder.mkdir()
    chelsea, coffee, camera = (Image.fromarray(a) for a in (skd.chelsea(), skd.coffee(), skd.camera()))
    files = {"chelsea.jpg": (chelsea, {"quality": 90}), "coffee_grey.jpg": (coffee.convert("L"), {}),
             "chelsea_cmyk.jpg": (chelsea.convert("CMYK"), {}), "small.png": (coffee.resize((30, 20)), {}),
             "coffee.webp": (coffee, {"quality": 80}), "camera.png": (camera, {})}
    exif = Image.Exif()
    exif[0x0112] = 6                                         # orientation: rotate 90 degrees on display
    files["rotated.jpg"] = (coffee, {"exif": exif.tobytes()})                 # OpenCV's path
    files["rotated_cmyk.jpg"] = (chelsea.convert("CMYK"), {"exif": exif.tobytes()})    # Pillow's
    rgba = chelsea.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(chelsea.size))
    files["alpha.png"] = (rgba, {})
    palette = coffee.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    files["palette.png"] = (palette, {"transparency": 0})
    files["deep.png"] = (Image.fromarray(skd.camera().astype(np.uint16) * 257), {})          # 16-bit greyscale
    for name, (im, kw) in files.items():
        im.save(folder / name, **kw)
    assert Image.open(folder / "deep.png").mode.startswith("I")
    cv2.imwrite(str(folder / "deep.pgm"), skd.camera().astype(np.uint16) * 257)    # 16-bit PGM: PIL mode I
    assert Image.open(folder / "deep.pgm").mode == "I"
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("standalone")
    data = write_digits_folder(root / "digits", digits=(0, 1, 2), size=16)
    run(TrainConfig(**TINY, data=str(data), out=str(root / "run"), epochs=1))
    assert cli(["export", str(root / "run"), "--out", str(root / "bundle"), "--format", "onnx"]) == 0
    return root / "bundle"


def test_predict_onnx_gives_predictors_probabilities_without_the_package(bundle, tmp_path):
    files = _images(tmp_path / "photos")
    config = json.loads((bundle / "config.json").read_text())
    assert STANDALONE.name in config["files"] and STANDALONE.name in (bundle / "README.md").read_text()
    res = subprocess.run([sys.executable, "-c", BLOCKED, str(bundle / STANDALONE.name), *map(str, files), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    theirs = np.array(out["probabilities"])
    ours = Predictor(bundle, runner="onnx", device="cpu").probabilities([str(f) for f in files]).numpy()
    assert out["classes"] == config["classes"] and theirs.shape == ours.shape == (len(files), len(config["classes"]))
    assert np.abs(theirs - ours).max() < 1e-5
    assert (theirs.argmax(1) == ours.argmax(1)).all()
    top = subprocess.run([sys.executable, "-c", BLOCKED, str(bundle / STANDALONE.name), str(files[0]), "--topk", "2"],
                         capture_output=True, text=True, timeout=300)
    best = config["classes"][int(ours[0].argmax())]
    assert top.returncode == 0 and top.stdout.startswith(f"{files[0]}: {best} {ours[0].max():.4f}, ")


@pytest.mark.parametrize("eval_resize, resize_size", [("center_crop", 36), ("center_crop", [40, 34]),
                                                      ("resize", 36)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_standalone_preprocessing_equals_the_eval_transform(eval_resize, resize_size, interpolation):
    inp = {"img_size": 32, "resize_size": resize_size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
           "interpolation": interpolation, "crop_pct": 0.9, "eval_resize": eval_resize}
    ours = eval_transform({"input": inp})
    assert standalone.decode_size(inp) == ours.decode_min_size
    rng = np.random.default_rng(0)
    for h, w in ((20, 30), (33, 32), (36, 36), (300, 451), (451, 300), (64, 200)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert np.array_equal(standalone.preprocess(img, inp), ours(img).numpy()), (h, w)


def test_the_readmes_predict_onnx_lines_parse():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    lines = re.findall(r"^python \S+/predict_onnx\.py .*$", readme, re.M)
    assert lines
    for line in lines:
        standalone.parser().parse_args(shlex.split(line.split("  #")[0])[2:])


@pytest.mark.parametrize("eval_resize, resize_size, words", [
    ("center_crop", 36, "resize the shorter side to 36, center-crop 32"),
    ("center_crop", [40, 34], "resize to 40x34 (height x width), center-crop 32"),   # SVHN's non-square resize
    ("resize", 36, "resize to 32x32")])
def test_the_model_card_says_the_resize_the_transform_does(eval_resize, resize_size, words):
    from spinal_transfer.deploy.export import _resize_words

    assert _resize_words({"img_size": 32, "resize_size": resize_size, "eval_resize": eval_resize}) == words


def test_a_later_export_without_onnx_removes_it(bundle, tmp_path):
    out = tmp_path / "bundle"
    assert cli(["export", str(bundle.parent / "run"), "--out", str(out), "--format", "onnx"]) == 0
    assert (out / STANDALONE.name).is_file()
    assert cli(["export", str(bundle.parent / "run"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_predict_onnx_skips_and_names_unreadable_files(bundle, tmp_path):
    good = tmp_path / "cat.png"
    Image.fromarray(skd.chelsea()).save(good)
    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32), mode="F").save(tmp_path / "f.tif")
    Image.fromarray(np.arange(32 * 32, dtype=np.int32).reshape(32, 32) * 3000, mode="I").save(tmp_path / "i.tif")
    args = [str(good), str(tmp_path / "notes.jpg"), str(tmp_path / "empty.png"), str(tmp_path / "f.tif"),
            str(tmp_path / "i.tif")]
    res = subprocess.run([sys.executable, "-c", BLOCKED, str(bundle / STANDALONE.name), *args, "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert out["images"] == [str(good)]
    assert out["skipped"][:2] == [[args[1], "not an image (unrecognised format)"], [args[2], "empty file (0 bytes)"]]
    # 32-bit float and integer TIFFs: skipped for the reason predict gives, not guessed into colours
    skipped_by_predict = dict(predict(bundle, args[3:], workers=0, device="cpu", runner="onnx").skipped)
    assert dict(out["skipped"][2:]) == skipped_by_predict and len(skipped_by_predict) == 2
    assert f"skipped {args[1]}: not an image (unrecognised format)" in res.stderr
    ours = Predictor(bundle, runner="onnx", device="cpu").probabilities([str(good)]).numpy()
    assert np.abs(np.array(out["probabilities"]) - ours).max() < 1e-5


def test_predict_onnx_reads_folders_takes_a_model_path_and_fails_when_nothing_reads(bundle, tmp_path):
    """A folder is searched for images as predict does; --model may be a path from where the user stands; a model
    that is not there, and inputs none of which can be read, end in one line and a non-zero status."""
    import shutil

    photos = tmp_path / "photos"
    files = _images(photos)
    (photos / ".hidden.png").write_bytes((files[0]).read_bytes())
    (photos / "notes.txt").write_text("not an image")
    script = [sys.executable, "-c", BLOCKED, str(bundle / STANDALONE.name)]
    shutil.copy(bundle / "model.onnx", tmp_path / "copy.onnx")
    res = subprocess.run([*script, "photos", "--model", "copy.onnx", "--json"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["images"] == sorted(str(f.relative_to(tmp_path)) for f in files)
    missing = subprocess.run([*script, str(files[0]), "--model", "nope.onnx"], capture_output=True, text=True,
                             timeout=300, cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].endswith(
        f"error: --model nope.onnx: no such file, here or beside {STANDALONE.name} ({bundle})")
    (tmp_path / "broken.jpg").write_text("not an image")
    none = subprocess.run([*script, str(tmp_path / "broken.jpg"), str(tmp_path / "gone.png")], capture_output=True,
                          text=True, timeout=300)
    assert none.returncode == 2 and none.stdout == "" and "Traceback" not in none.stderr
    assert none.stderr.strip().splitlines()[-1] == "error: none of the 2 image file(s) could be read"


def test_predict_onnx_skips_what_predict_refuses_unread(bundle, tmp_path):
    """A header claiming 100000x100000 px (past twice Pillow's bound, where Pillow raises), one claiming 10000x10000
    (its warning zone, where Pillow alone decodes all 100 M pixels) and a real 4000x20 PNG (beyond 100:1): `predict`
    refuses each at the header; predict_onnx.py skips each in one stderr line with predict's reason, no traceback,
    and predicts the rest. Its limit is the package's."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(skd.chelsea()).save(photos / "cat.png")
    (photos / "hard_bomb.png").write_bytes(bomb_png(100_000))
    (photos / "bomb.png").write_bytes(bomb_png(10_000))
    Image.new("L", (4000, 20), 128).save(photos / "sliver.png")
    res = subprocess.run([sys.executable, "-c", BLOCKED, str(bundle / STANDALONE.name), str(photos), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert out["images"] == [str(photos / "cat.png")]
    ours = predict(bundle, [photos], workers=0, device="cpu", runner="onnx")
    assert len(ours.skipped) == 3 and dict(out["skipped"]) == dict(ours.skipped)
    assert "over PIL's decompression-bomb bound" in dict(ours.skipped)[str(photos / "bomb.png")]
    assert dict(ours.skipped)[str(photos / "sliver.png")].startswith("4000x20 px, an aspect ratio beyond 100:1")
    for path, why in out["skipped"]:
        assert [line for line in res.stderr.splitlines() if path in line] == [f"skipped {path}: {why}"]
    assert ours.paths == out["images"] and np.abs(np.array(out["probabilities"]) - ours.probs.numpy()).max() < 1e-5
    assert standalone.MAX_ASPECT_RATIO == package_images.MAX_ASPECT_RATIO      # held in step
    assert standalone.EXTENSIONS == package_images.IMG_EXTENSIONS


def test_an_orientation_kept_only_in_xmp_turns_the_picture_on_every_path(bundle, tmp_path):
    """Pillow's exif_transpose reads XMP's tiff:Orientation where EXIF has none; OpenCV reads EXIF only. A photo with
    XMP orientation 6 decodes, on every path, to exactly the pixels of the same photo with EXIF orientation 6: the
    package's decoder (OpenCV for RGB/grey JPEG and PNG, at full and reduced scale; Pillow for CMYK and WebP), bytes
    (serve), an already decoded PIL image (Predictor) and the bundle's predict_onnx.py; so are the probabilities."""
    chelsea = Image.fromarray(skd.chelsea())                                 # 451 wide, 300 high
    need = standalone.decode_size(json.loads((bundle / "config.json").read_text())["input"])
    xmp, exif = [], []
    for name, im in (("rgb.jpg", chelsea), ("grey.jpg", chelsea.convert("L")), ("cmyk.jpg", chelsea.convert("CMYK")),
                     ("rgb.webp", chelsea), ("rgb.png", chelsea)):
        xmp.append(save_oriented(im, tmp_path / f"xmp_{name}", 6, "xmp"))
        exif.append(save_oriented(im, tmp_path / f"exif_{name}", 6, "exif"))
        upright = package_images.load_image(exif[-1])
        assert upright.shape == (451, 300, 3), name
        for min_size in (None, need):
            assert np.array_equal(package_images.load_image(xmp[-1], min_size),
                                  package_images.load_image(exif[-1], min_size)), (name, min_size)
        assert np.array_equal(package_images.decode_image(xmp[-1].read_bytes()), upright), name
        given = Image.open(xmp[-1])
        given.load()
        assert np.array_equal(package_images.pil_to_rgb(given), upright), name
        assert np.array_equal(standalone.decode(xmp[-1], need), package_images.load_image(exif[-1], need)), name
    predictor = Predictor(bundle, runner="onnx", device="cpu")
    ours = predictor.probabilities([str(f) for f in exif]).numpy()
    for given in ([str(f) for f in xmp], [f.read_bytes() for f in xmp]):
        assert np.abs(predictor.probabilities(given).numpy() - ours).max() < 1e-12
    decoded = {"xmp": [Image.open(f) for f in xmp], "exif": [Image.open(f) for f in exif]}     # full scale: as given
    for im in decoded["xmp"] + decoded["exif"]:
        im.load()
    assert np.abs(predictor.probabilities(decoded["xmp"]).numpy()
                  - predictor.probabilities(decoded["exif"]).numpy()).max() < 1e-12
    res = subprocess.run([sys.executable, "-c", BLOCKED, str(bundle / STANDALONE.name), *map(str, xmp), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert np.abs(np.array(json.loads(res.stdout)["probabilities"]) - ours).max() < 1e-5


def test_predict_onnx_refuses_an_edited_bundle_and_bad_arguments_in_one_line(bundle, tmp_path):
    """QA 28: predict_onnx.py read an edited config.json (renamed classes) or another bundle's model.onnx without a
    word while `predict` refuses them; --topk 0 printed nothing, --batch-size 0, a non-ONNX --model and a missing
    config.json ended in tracebacks; an empty folder read as 'none of the 0 files'; a broken link was dropped
    unnamed. --no-verify reads an edited bundle as it is."""
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    image = _images(tmp_path / "photos")[0]
    script = [sys.executable, "-c", BLOCKED, str(copy / STANDALONE.name)]

    def call(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*script, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)

    def refused(res: subprocess.CompletedProcess, needle: str) -> None:
        assert res.returncode == 2 and "Traceback" not in res.stderr and res.stdout == "", res.stderr[-2000:]
        assert needle in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]

    config = json.loads((copy / "config.json").read_text())
    edited = {**config, "classes": config["classes"][::-1]}
    (copy / "config.json").write_text(json.dumps(edited))
    refused(call(str(image)), "config.json was changed since export")
    ok = call(str(image), "--no-verify", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["classes"] == config["classes"][::-1]
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "model.onnx").write_bytes((copy / "model.onnx").read_bytes() + b"\0")   # another model's bytes
    refused(call(str(image)), "is not a model of this bundle")
    shutil.copy(bundle / "model.onnx", copy / "model.onnx")
    refused(call(str(image), "--topk", "0"), "--topk: expected a whole number >= 1, got '0'")
    refused(call(str(image), "--batch-size", "0"), "--batch-size: expected a whole number >= 1, got '0'")
    (tmp_path / "not.onnx").write_text("not a model")
    refused(call(str(image), "--model", str(tmp_path / "not.onnx"), "--no-verify"), "is not an ONNX model")
    (tmp_path / "empty").mkdir()
    refused(call(str(tmp_path / "empty")), "no images found in")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    shutil.copy(image, tmp_path / "links" / "a.png")
    res = call(str(tmp_path / "links"))
    assert res.returncode == 0 and "skipped " + str(tmp_path / "links" / "gone.png") in res.stderr, res.stderr
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(STANDALONE, lone / STANDALONE.name)
    shutil.copy(bundle / "model.onnx", lone / "model.onnx")
    res = subprocess.run([sys.executable, "-c", BLOCKED, str(lone / STANDALONE.name), str(image)],
                         capture_output=True, text=True, timeout=300)
    refused(res, "config.json is missing or unreadable")
