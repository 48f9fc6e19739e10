"""Export and predict end to end: a tiny model fine-tuned on the digits folder becomes a bundle plus
torch.export, TorchScript and ONNX files; each is reloaded and compared with the trained model on real
preprocessed images, and `predict` runs through the CLI on a folder with a corrupt file. The head uses
the spinal VGG preset (BatchNorm1d + dropout 0.5), so a format traced in train mode would not match."""
from __future__ import annotations

import csv
import json
import pickle
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_digits_folder
from safetensors.torch import load_file
from torch import nn

import spinal_transfer
from spinal_transfer.cli import main as cli
from spinal_transfer.config import TrainConfig
from spinal_transfer.data.images import load_image
from spinal_transfer.deploy.export import FORMAT_FILES, READERS, ExportError, eval_transform, export
from spinal_transfer.errors import MissingDependency, UnsafeCheckpointError
from spinal_transfer.evaluation.metrics import classification_metrics
from spinal_transfer.models.heads import head_options
from spinal_transfer.models.preprocess import resolve_data_config
from spinal_transfer.models.restore import model_from_checkpoint
from spinal_transfer.models.surgery import build_model
from spinal_transfer.runs.checkpoint import atomic_save, checkpoint_meta
from spinal_transfer.runs.rundir import load_run_checkpoint
from spinal_transfer.training.train import run
from spinal_transfer.utils.runtime import torch_threads

TINY = dict(backbone="timm/test_resnet", weights="none", head="spinal", head_preset="vgg", layer_width=16,
            img_size=16, batch_size=32, workers=0, augment="none", optimizer="sgd", lr=0.05, scheduler="none",
            epochs=1, limit_train_batches=4, device="cpu", log_interval=1000)
DIGITS = (0, 1, 2, 3, 4)            # half the digits: ~900 images keep the file's runtime low
CLASSES = [f"digit_{k}" for k in DIGITS]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """16-px images are too small to gain from intra-op threads; on shared cores they cost 2-3x."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    return write_digits_folder(tmp_path_factory.mktemp("digits"), digits=DIGITS, size=16)


@pytest.fixture(scope="module")
def exported(digits_folder, tmp_path_factory):
    """(run dir, bundle dir, report) of a tiny run exported in every format via the CLI."""
    root = tmp_path_factory.mktemp("export")
    report = run(TrainConfig(**TINY, data=str(digits_folder), out=str(root / "run")))
    assert cli(["export", str(root / "run"), "--out", str(root / "bundle"),
                "--format", "export", "torchscript", "--format", "onnx"]) == 0
    return root / "run", root / "bundle", report


def _images(folder: Path, n: int) -> list[Path]:
    return sorted(folder.rglob("*.png"))[:n]


def _batch(config: dict, paths: list[Path]) -> torch.Tensor:
    """Real images through the bundle's evaluation preprocessing."""
    tf = eval_transform(config)
    return torch.stack([tf(image=load_image(p))["image"] for p in paths])


def test_bundle_reloads_offline_with_the_trained_logits(exported, digits_folder, monkeypatch):
    run_dir, bundle, report = exported
    config = json.loads((bundle / "config.json").read_text())
    assert config["backbone"] == "timm/test_resnet" and config["classes"] == CLASSES
    assert config["head"]["kind"] == "spinal" and config["head"]["options"]["preset"] == "vgg"
    assert config["input"]["img_size"] == 16 and len(config["input"]["mean"]) == 3 and len(config["input"]["std"]) == 3
    assert config["input"]["interpolation"] and config["input"]["eval_resize"] == "center_crop"
    assert config["spinal_transfer_version"] == spinal_transfer.__version__
    assert set(config["formats"]) == {"export", "torchscript", "onnx"}
    assert all(f["max_abs_diff"] <= 1e-4 for f in config["formats"].values())
    card = (bundle / "README.md").read_text()
    assert f"{report['test']['top1']:.4f}" in card and "timm/test_resnet" in card and "model.onnx" in card
    cal = report["calibration"]                  # the card says how well val pinned T down and what it did on test
    lo, hi = cal["temperature_interval"]
    assert f"T = {cal['temperature']:.4f}" in card and f"95% bootstrap interval of T {lo:.2f}-{hi:.2f}" in card
    assert f"went from {cal['test']['ece_before']:.3f} to {cal['test']['ece_after']:.3f}" in card
    assert "| loss (plain softmax) |" in card    # report.json's loss is the plain softmax's, not predict's

    def no_network(*args, **kwargs):
        raise AssertionError("load() tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = spinal_transfer.load(bundle)
    kinds = {type(m) for m in model.modules()}
    assert nn.BatchNorm1d in kinds and nn.Dropout in kinds and not model.training
    trained = model_from_checkpoint(load_run_checkpoint(run_dir))[0]      # the weights training ended with
    assert set(load_file(str(bundle / "model.safetensors"))) == set(trained.state_dict())

    # The whole test split through the bundle reproduces the run's report.
    test_paths = sorted((digits_folder / "test").rglob("*.png"))
    x = _batch(config, test_paths)
    y = torch.tensor([CLASSES.index(p.parent.name) for p in test_paths])
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(logits, trained(x))
    m = classification_metrics(logits, y, CLASSES)
    assert m["top1"] == pytest.approx(report["test"]["top1"], abs=1e-9)
    assert m["loss"] == pytest.approx(report["test"]["loss"], rel=1e-5)

    # Every format, read back from its file, on 37 real images (a batch size never used at export time).
    for fmt, name in FORMAT_FILES.items():
        out = READERS[fmt](bundle / name)(x[:37])
        assert (out - logits[:37]).abs().max() <= 1e-4, fmt


def test_predict_csv_skip_list_and_onnx_agree(exported, digits_folder, tmp_path, capsys):
    run_dir, bundle, _ = exported
    folder = tmp_path / "photos"
    for i, p in enumerate(_images(digits_folder / "val", 11)):
        dest = folder / ("nested" if i % 2 else "") / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (folder / "notes.txt").write_text("not an image, ignored in folders")
    good = sorted(str(p) for p in folder.rglob("*.png") if p.name != "broken.png")

    def predict(source: Path, out: Path, *extra: str) -> list[list[str]]:
        assert cli(["predict", str(source), str(folder), "--topk", "3", "--batch-size", "4", "--out", str(out),
                    "--device", "cpu", *extra]) == 0
        with out.open() as f:
            return list(csv.reader(f))

    rows = predict(bundle, tmp_path / "bundle.csv", "--workers", "1")
    assert "broken.png" in capsys.readouterr().err
    assert rows[0] == ["path", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3"]
    assert sorted(r[0] for r in rows[1:]) == good
    for r in rows[1:]:
        labels, probs = r[1::2], [float(p) for p in r[2::2]]
        assert set(labels) <= set(CLASSES) and len(set(labels)) == 3
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
    skipped = (tmp_path / "bundle.csv.skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in skipped] == [str(folder / "broken.png")]

    # Same preprocessing as evaluation: the CSV's top-1 is the model's own on eval-transformed images, its
    # probability softmax(logits / T) with the bundle's temperature.
    model = spinal_transfer.load(bundle)
    config = json.loads((bundle / "config.json").read_text())
    with torch.no_grad():
        probs = torch.softmax(model(_batch(config, [Path(r[0]) for r in rows[1:]])).double() / config["temperature"], 1)
    for r, p in zip(rows[1:], probs):
        assert r[1] == CLASSES[int(p.argmax())] and float(r[2]) == pytest.approx(float(p.max()), abs=1e-6)

    for source in (bundle / "model.onnx", run_dir):
        other = predict(source, tmp_path / "other.csv", "--workers", "0")
        assert [[r[0], *r[1::2]] for r in other] == [[r[0], *r[1::2]] for r in rows], source   # paths, labels
        for a, b in zip(other[1:], rows[1:]):
            assert [float(v) for v in a[2::2]] == pytest.approx([float(v) for v in b[2::2]], abs=1e-5)


class _Payload:
    """Unpickling this calls open(marker, "w"): a file appears iff the loader executed code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_checkpoint_is_refused_without_running_code(writer, digits_folder, tmp_path, capsys):
    marker = tmp_path / "pwned"
    proof = tmp_path / "payload_is_live"
    pickle.loads(pickle.dumps(_Payload(proof))).close()
    assert proof.exists()                                         # unsafely unpickled, it does run
    evil = tmp_path / "evil.pt"
    payload = {"model": _Payload(marker), "config": {}}
    if writer == "pickle":
        evil.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, evil)

    commands = [["evaluate", str(evil), "--data", str(digits_folder)],
                ["predict", str(evil), str(digits_folder / "test"), "--out", str(tmp_path / "p.csv")],
                ["export", str(evil), "--out", str(tmp_path / "bundle")]]
    for argv in commands:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert "refusing to load" in err and "arbitrary code" in err, argv
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        build_model("timm/test_resnet", len(CLASSES), weights=str(evil))
    assert not marker.exists()
    assert not (tmp_path / "bundle" / "config.json").exists() and not (tmp_path / "p.csv").exists()


def test_failed_check_fails_loudly_and_keeps_nothing(exported, tmp_path, monkeypatch):
    run_dir, _, _ = exported
    off_by_a_bit = {fmt: (lambda read: lambda path: (lambda x: read(path)(x) + 1e-3))(read)
                    for fmt, read in READERS.items()}
    monkeypatch.setattr("spinal_transfer.deploy.export.READERS", off_by_a_bit)
    with pytest.raises(ExportError, match=r"script: max abs logit difference 0.001 > 0.0001[\s\S]*trace:"):
        export(run_dir, tmp_path / "bundle", ["torchscript"])
    assert not (tmp_path / "bundle").exists()                     # not even the folder it would have made

    monkeypatch.setitem(sys.modules, "onnxruntime", None)            # as if the extra were not installed
    with pytest.raises(MissingDependency, match=r'pip install -e "\.\[onnx\]"'):
        export(run_dir, tmp_path / "bundle", "onnx")                 # one format as a string: not o, n, n, x


@pytest.mark.slow
def test_googlenet_exports_in_eval_mode(tmp_path):
    """GoogLeNet returns (logits, aux2, aux1) in train mode, and scripted it returns that tuple even in
    eval mode: every format must still give plain logits (TorchScript falls back to tracing)."""
    cfg = TrainConfig(backbone="torchvision/googlenet", weights="none", img_size=64, layer_width=16, head_preset="vgg")
    model = build_model(cfg.backbone, 3, weights=None, **head_options(cfg))
    dc = resolve_data_config(cfg.backbone, cfg.weights, model, img_size=cfg.img_size)
    ckpt = {"model": model.state_dict(), "epoch": 1, **checkpoint_meta(cfg.to_dict(), ["a", "b", "c"], dc,
                                                                       model.spinal_info)}
    atomic_save(ckpt, tmp_path / "googlenet.pt")
    config = export(tmp_path / "googlenet.pt", tmp_path / "bundle", list(FORMAT_FILES))
    assert config["formats"]["torchscript"]["method"] == "trace"
    assert "No report.json" in (tmp_path / "bundle" / "README.md").read_text()


def test_a_best_pt_from_another_run_is_refused_in_its_folder_and_gets_no_metrics_as_a_file(finished_run, other_run,
                                                                                          tmp_path, cli_run, caplog):
    """QA 28: a run folder whose best.pt was copied from another run exported (exit 0) a bundle titled with that
    model, whose card quoted this run's test top-1, temperature interval and ECE. A run folder's checkpoint must
    be its own (split fingerprints against splits.json) for export, evaluate and predict; the checkpoint file
    passed itself exports, its card without the folder's metrics."""
    other_data, other = other_run
    mixed = tmp_path / "mixed"
    shutil.copytree(finished_run, mixed)
    shutil.copy(other / "checkpoints" / "best.pt", mixed / "checkpoints" / "best.pt")
    for argv in (("export", mixed, "--out", tmp_path / "b"), ("evaluate", mixed),
                 ("predict", mixed, other_data / "test")):
        res = cli_run(*argv)
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, (argv, res.stderr[-2000:])
        assert "best.pt comes from another run (its split fingerprints differ" in lines[0], lines
    assert not (tmp_path / "b").exists()
    shutil.copy(other / "checkpoints" / "best.pt", mixed / "checkpoints" / "theirs.pt")
    with caplog.at_level("WARNING", logger="spinal_transfer"):       # the log's stream depends on earlier tests
        res = cli_run("export", mixed / "checkpoints" / "theirs.pt", "--out", tmp_path / "b")
    assert res.returncode == 0, res.stderr[-2000:]
    assert any("the model card leaves out" in r.getMessage() for r in caplog.records)
    card = (tmp_path / "b" / "README.md").read_text()
    theirs = json.loads((finished_run / "report.json").read_text())["test"]["top1"]
    assert f"{100 * theirs:.2f}%" not in card and "bootstrap" not in card
