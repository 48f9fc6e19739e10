"""Verified bundles: export records every file's sha256 in config.json, and config.json's own; predict, Predictor
and the ONNX runners refuse a file (config.json included) that differs, in one line naming it; --no-verify
(verify=False) uses it as it is; a bundle from before digests loads unchecked."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from spinal_transfer.errors import CheckpointError

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0"}


def _flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x10                       # inside the last tensor's bytes: the file still loads
    path.write_bytes(bytes(raw))


def _raise_a_class_bias(path: Path) -> None:
    """Add 10 to the first class's output bias in a model.safetensors, in place (the file still loads): every
    image's probabilities change, whichever images are scored (a flipped bit elsewhere may sit in a unit those
    images never use)."""
    raw = bytearray(path.read_bytes())
    size = struct.unpack_from("<Q", raw)[0]
    header = json.loads(raw[8:8 + size])
    (name,) = [k for k in header if k.endswith("fc_out.bias")]
    assert header[name]["dtype"] == "F32"
    start = 8 + size + header[name]["data_offsets"][0]
    struct.pack_into("<f", raw, start, struct.unpack_from("<f", raw, start)[0] + 10.0)
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def bundle(finished_run, tmp_path_factory) -> Path:
    from spinal_transfer.deploy.export import export

    formats = ["onnx"] if _has_onnx() else []
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    export(finished_run, out, formats)
    return out


def _has_onnx() -> bool:
    try:
        import onnx, onnxruntime, onnxscript  # noqa: F401, E401
    except ImportError:
        return False
    return True


def test_a_tampered_bundle_is_refused_by_predict_and_predictor_unless_told(bundle, three_digits, tmp_path,
                                                                           cli_run):
    from spinal_transfer.deploy.predictor import Predictor

    config = json.loads((bundle / "config.json").read_text())
    assert config["files"] == {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                               for f in sorted(bundle.iterdir()) if f.name != "config.json"}
    images = three_digits / "test" / "digit_1"
    before = Predictor(bundle, device="cpu", runner="torch").probabilities(sorted(images.iterdir())[:4])
    tampered = tmp_path / "tampered"
    subprocess.run(["cp", "-r", str(bundle), str(tampered)], check=True)
    _raise_a_class_bias(tampered / "model.safetensors")
    res = subprocess.run([sys.executable, "-m", "spinal_transfer", "predict", tampered, images, "--runner", "torch",
                          "--device", "cpu", "--out", tmp_path / "p.csv"], capture_output=True, text=True, env=ENV,
                         timeout=600)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(tampered / "model.safetensors") in errors[0] and "sha256" in errors[0]
    assert not (tmp_path / "p.csv").exists()
    with pytest.raises(CheckpointError, match="model.safetensors does not match the sha256"):
        Predictor(tampered, device="cpu", runner="torch")
    after = Predictor(tampered, device="cpu", runner="torch", verify=False).probabilities(sorted(images.iterdir())[:4])
    assert not (after == before).all()                              # the flipped bit does change predictions
    res = cli_run("predict", tampered, images, "--runner", "torch", "--device", "cpu", "--no-verify",
                  "--out", tmp_path / "q.csv")
    assert res.returncode == 0, res.stderr[-3000:]
    res = cli_run("evaluate", tampered)                             # evaluate takes runs and checkpoints only
    assert res.returncode == 2 and "not a run folder" in res.stderr


def test_a_bundle_exported_before_digests_loads_unchecked(bundle, tmp_path):
    from spinal_transfer.deploy.predictor import Predictor

    old = tmp_path / "old"
    subprocess.run(["cp", "-r", str(bundle), str(old)], check=True)
    config = json.loads((old / "config.json").read_text())
    del config["files"], config["config_sha256"]
    (old / "config.json").write_text(json.dumps({**config, "spinal_transfer_version": "0.1.0"}))
    _flip_last_byte(old / "model.safetensors")
    assert Predictor(old, device="cpu", runner="torch").classes == config["classes"]


def _edit_config(bundle: Path, to: Path, edit) -> dict:
    subprocess.run(["cp", "-r", str(bundle), str(to)], check=True)
    config = json.loads((to / "config.json").read_text())
    edit(config)
    (to / "config.json").write_text(json.dumps(config, indent=1))
    return config


def test_an_edited_config_json_is_refused_unless_told(bundle, three_digits, tmp_path, cli_run):
    """config.json names the classes: reversed, every prediction is labelled wrong with no file changed but it.
    Its own digest catches that, and a removed digest (or file list) in a bundle of this version, for every
    runner; a bundle of 0.2 (file digests, no config digest) still loads with its files checked."""
    from spinal_transfer.deploy.predictor import Predictor

    images = sorted((three_digits / "test" / "digit_1").iterdir())[:4]
    runners = ["torch", "onnx"] if (bundle / "model.onnx").is_file() else ["torch"]
    edits = {"classes": lambda c: c["classes"].reverse(), "temperature": lambda c: c.update(temperature=100.0),
             "no-digest": lambda c: c.pop("config_sha256"), "no-files": lambda c: c.pop("files")}
    for name, edit in edits.items():
        edited = tmp_path / name
        _edit_config(bundle, edited, edit)
        for runner in runners:
            with pytest.raises(CheckpointError, match="config.json was changed since export"):
                Predictor(edited, device="cpu", runner=runner)
    res = cli_run("predict", tmp_path / "classes", *images, "--out", tmp_path / "p.csv")
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and "--no-verify" in errors[0], res.stderr[-2000:]
    assert not (tmp_path / "p.csv").exists()
    plain = Predictor(bundle, device="cpu", runner="torch")
    told = Predictor(tmp_path / "classes", device="cpu", runner="torch", verify=False)
    assert told.classes == plain.classes[::-1]                       # used as it is, when told
    assert (told.probabilities(images) == plain.probabilities(images)).all()
    from spinal_transfer.deploy import serve

    settings = serve.ServeSettings(str(tmp_path / "classes"), "torch", "cpu", 8, 5.0, 10.0, 3)
    with pytest.raises(CheckpointError, match="config.json was changed since export"):
        serve.Model(settings)                                        # serve too, unless --no-verify
    assert serve.Model(dataclasses.replace(settings, verify=False)).metadata["classes"] == plain.classes[::-1]

    older = _edit_config(bundle, tmp_path / "v02", lambda c: (c.pop("config_sha256"),
                                                              c.update(spinal_transfer_version="0.2.0")))
    assert Predictor(tmp_path / "v02", device="cpu", runner="torch").classes == older["classes"]
    _flip_last_byte(tmp_path / "v02" / "model.safetensors")          # its files are still checked
    with pytest.raises(CheckpointError, match="model.safetensors does not match the sha256"):
        Predictor(tmp_path / "v02", device="cpu", runner="torch")


def test_a_config_json_of_another_model_or_broken_is_one_line(bundle, three_digits, tmp_path, cli_run):
    """With --no-verify a config.json listing another number of classes meets the model: one line, for every
    runner, instead of a traceback mid-way; a config.json that is not JSON, or lacks the backbone, likewise. The
    same content saved with a byte-order mark loads."""
    images = three_digits / "test" / "digit_1"
    wrong = _edit_config(bundle, tmp_path / "wrong", lambda c: c["classes"].append("extra"))
    for runner in ["torch", "onnx"] if (bundle / "model.onnx").is_file() else ["torch"]:
        res = cli_run("predict", tmp_path / "wrong", images, "--runner", runner, "--no-verify", "--out",
                      tmp_path / "p.csv")
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert f"{len(wrong['classes'])} classes" in errors[0] and "re-export" in errors[0]
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(bundle), str(broken)], check=True)
    text = (broken / "config.json").read_text()
    good = json.loads(text)
    no_backbone = json.dumps({k: v for k, v in good.items() if k != "backbone"})
    cases = [(text[: len(text) // 2], "is not valid JSON"), (no_backbone, "lacks backbone"),
             (json.dumps({**good, "temperature": "hot"}), "temperature must be a positive number"),
             (json.dumps({**good, "temperature": -1}), "temperature must be a positive number"),
             (json.dumps({**good, "classes": [good["classes"][0]] * len(good["classes"])}), "distinct class names"),
             (json.dumps({**good, "input": {**good["input"], "img_size": "32"}}), "input.img_size must be")]
    for content, says in cases:
        (broken / "config.json").write_text(content)
        res = cli_run("predict", broken, images, "--no-verify", "--out", tmp_path / "p.csv")
        assert res.returncode == 2 and says in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    (broken / "config.json").write_text("\ufeff" + text, encoding="utf-8")     # saved by an editor that adds a BOM
    res = cli_run("predict", broken, images, "--out", tmp_path / "p.csv")       # the same content: it verifies
    assert res.returncode == 0 and "wrote" in res.stderr, res.stderr[-2000:]


def test_a_model_file_cut_short_is_one_line_even_unverified(bundle, three_digits, tmp_path, cli_run):
    """--no-verify skips the digests, not the loading: a model.safetensors or model.onnx cut short is named in
    one line (exit 2), not an onnxruntime or safetensors traceback."""
    images = three_digits / "test" / "digit_1"
    files = {"torch": "model.safetensors", "onnx": "model.onnx"} if (bundle / "model.onnx").is_file() else \
        {"torch": "model.safetensors"}
    for runner, name in files.items():
        cut = tmp_path / runner
        subprocess.run(["cp", "-r", str(bundle), str(cut)], check=True)
        (cut / name).write_bytes((bundle / name).read_bytes()[:1000])
        res = cli_run("predict", cut, images, "--runner", runner, "--no-verify", "--out", tmp_path / "p.csv")
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert f"{name} is not a" in errors[0] and "re-export" in errors[0]


def test_the_onnx_runner_refuses_a_tampered_model_onnx(bundle, three_digits, tmp_path, cli_run):
    if not (bundle / "model.onnx").is_file():
        pytest.skip("onnx, onnxruntime and onnxscript (the extra `onnx`) are not installed")
    from spinal_transfer.deploy.predictor import Predictor

    tampered = tmp_path / "tampered"
    subprocess.run(["cp", "-r", str(bundle), str(tampered)], check=True)
    onnx_files = sorted(tampered.glob("model.onnx*"))
    _flip_last_byte(onnx_files[-1])
    res = cli_run("predict", tampered / "model.onnx", three_digits / "test" / "digit_0", "--out", tmp_path / "p.csv")
    assert res.returncode == 2 and f"{onnx_files[-1]} does not match the sha256" in res.stderr, res.stderr[-2000:]
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        Predictor(tampered, device="cpu", runner="onnx")
    Predictor(tampered, device="cpu", runner="torch")               # the other files are intact


def test_a_bundle_given_as_weights_records_its_architecture_and_classes(bundle):
    from spinal_transfer.models.surgery import build_model

    config = json.loads((bundle / "config.json").read_text())
    weights = bundle / "model.safetensors"
    with pytest.raises(CheckpointError, match=f"holds a {config['backbone']} model.*not --backbone timm/test_efficientnet"):
        build_model("timm/test_efficientnet", 3, weights=str(weights))
    head = config["head"]
    same = build_model(config["backbone"], 3, head=head["kind"], weights=str(weights), replace=head["replace"],
                       classes=config["classes"], **head["options"])
    assert f"head: restored from {weights} (same 3 classes)" in same.spinal_info.notes
    other = build_model(config["backbone"], 3, head=head["kind"], weights=str(weights), replace=head["replace"],
                        classes=["x", "y", "z"], **head["options"])
    assert f"head: new ({weights}'s classes differ)" in other.spinal_info.notes
    assert same.spinal_info.weights_file["head_restored"] and not other.spinal_info.weights_file["head_restored"]
