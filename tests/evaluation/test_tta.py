"""Test-time augmentation: identity-only TTA is plain evaluation, flip-TTA is the mean of two softmaxes."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cfg

from spinal_transfer.cli import main as cli
from spinal_transfer.data.loaders import ShardSampler, make_loader
from spinal_transfer.data.splits import scan
from spinal_transfer.data.transforms import build_transforms
from spinal_transfer.errors import ConfigError
from spinal_transfer.evaluation.evaluate import TTA, evaluate, predict_logits, predict_logits_tta, tta_views
from spinal_transfer.models.preprocess import resolve_data_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_and_batches(digits_folder):
    from spinal_transfer.models.surgery import build_model

    torch.manual_seed(0)
    model = build_model("timm/test_resnet", 10, head="spinal", weights="none", layer_width=32, preset="vgg").eval()
    dc = resolve_data_config("timm/test_resnet", "none", model, img_size=32)
    test = scan(digits_folder).test[:96]
    loader = make_loader(test, build_transforms(dc), 32, 0, CPU, ShardSampler(len(test)))
    return model, [(x, y, i) for x, y, i, _ in loader]


def test_identity_only_tta_equals_plain_evaluation_exactly(model_and_batches):
    model, batches = model_and_batches
    plain = predict_logits(model, batches, CPU)
    ident = predict_logits(model, batches, CPU, tta=TTA(flip=False, crops=0))
    assert torch.equal(plain.logits, ident.logits) and torch.equal(plain.index, ident.index)


def test_flip_tta_is_the_mean_of_the_two_softmaxes_by_hand(model_and_batches):
    model, batches = model_and_batches
    out = predict_logits(model, batches, CPU, tta=TTA(flip=True))
    with torch.no_grad():
        x = torch.cat([b[0] for b in batches])
        by_hand = (model(x).softmax(1) + model(torch.flip(x, dims=[3])).softmax(1)) / 2
    assert torch.allclose(out.logits.softmax(1), by_hand, atol=1e-6)
    assert torch.allclose(out.logits.exp().sum(1), torch.ones(len(x)), atol=1e-5)    # log-probabilities
    plain = predict_logits(model, batches, CPU).logits.softmax(1)
    assert not torch.allclose(out.logits.softmax(1), plain, atol=1e-4)                   # the mirror does count


def test_crops_are_corners_and_centre_resized_back():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    views = tta_views(x, TTA(flip=False, crops=5))
    assert len(views) == 6 and torch.equal(views[0], x) and all(v.shape == x.shape for v in views)
    centre = F.interpolate(x[..., 1:15, 1:15], size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(views[5], centre)
    assert views[1][..., 0, 0].tolist() == x[..., 0, 0].tolist()                     # top-left corner kept
    assert len(tta_views(x, TTA(flip=True, crops=5))) == TTA(crops=5).num_views == 12
    with pytest.raises(ConfigError, match=r"^tta_crops=3 is not one of \(0, 5\)"):
        TTA(crops=3)


def test_one_pass_gives_plain_and_tta_outputs(model_and_batches):
    model, batches = model_and_batches
    tta = TTA(flip=True, crops=5)
    plain, with_tta = predict_logits_tta(model, batches, CPU, tta)
    assert torch.equal(plain.logits, predict_logits(model, batches, CPU).logits)
    assert torch.allclose(with_tta.logits, predict_logits(model, batches, CPU, tta=tta).logits, atol=1e-6)


@pytest.fixture(scope="module")
def short_run(digits_folder, tmp_path_factory):
    from spinal_transfer.training.train import run

    out = tmp_path_factory.mktemp("tta") / "run"
    return out, run(tiny_cfg(digits_folder, out, epochs=2, limit_train_batches=8, scheduler="cosine"))


def test_evaluate_prints_and_records_the_metric_with_and_without_tta(short_run, capsys, tmp_path):
    out, report = short_run
    assert cli(["evaluate", str(out), "--tta", "--device", "cpu", "--out", str(tmp_path / "ev")]) == 0
    captured = capsys.readouterr()
    shown = json.loads(captured.out)
    assert shown["without_tta"]["top1"] == pytest.approx(report["test"]["top1"], abs=1e-12)
    assert shown["with_tta"]["tta"] == {"flip": True, "crops": 0, "crop_fraction": 0.875, "views": 2}
    assert "without TTA" in captured.err and "with TTA" in captured.err
    saved = json.loads((tmp_path / "ev" / "metrics_test.json").read_text())
    assert saved["tta"]["views"] == 2 and saved["without_tta"]["top1"] == shown["without_tta"]["top1"]
    assert saved["top1"] == shown["with_tta"]["top1"]
    page = (tmp_path / "ev" / "report.html").read_text()
    assert "test metrics, with test-time augmentation (the mean softmax of 2 views of each image; column" in page
    assert "<th class=\"n\">without TTA</th>" in page
    ident = evaluate(out, split="test", device="cpu", tta=TTA(flip=False))
    assert ident.metrics["top1"] == report["test"]["top1"] and ident.metrics["tta"]["views"] == 1
    assert evaluate(out, device="cpu", tta=True).metrics["top1"] == saved["top1"]      # True: image and mirror
    assert cli(["evaluate", str(out), "--tta-crops", "5"]) == 2


def test_predict_with_tta(short_run, digits_folder):
    from spinal_transfer.deploy.predict import predict

    out, _ = short_run
    folder = digits_folder / "test" / "digit_3"
    plain = predict(out, [folder], workers=0, device="cpu")
    ident = predict(out, [folder], workers=0, device="cpu", tta=TTA(flip=False))
    flip = predict(out, [folder], workers=0, device="cpu", tta=TTA(flip=True))
    assert torch.equal(plain.probs, ident.probs) and plain.tta is None and flip.tta["views"] == 2
    assert plain.paths == flip.paths and not torch.allclose(plain.probs, flip.probs)
    assert torch.allclose(flip.probs.sum(1), torch.ones(len(flip.paths), dtype=torch.float64))


def test_calibration_scales_the_tta_average_and_never_changes_a_class(short_run, digits_folder):
    """Under TTA the views' plain softmaxes are averaged (as train's TTA does) and T scales that average:
    evaluate's calibrated TTA logits are the uncalibrated ones / T, and predict's probabilities are
    softmax(log(mean plain softmax) / T). Averaging each view's calibrated softmax instead moved classes and
    accuracy with calibration (evaluate RUN --tta did not reproduce report.json)."""
    from spinal_transfer.deploy.predict import predict

    out, report = short_run
    T = report["calibration"]["temperature"]
    assert T is not None and abs(T - 1) > 0.05
    cal, plain = (evaluate(out, device="cpu", tta=True, calibrated=c) for c in (True, False))
    assert torch.allclose(cal.outputs.logits, plain.outputs.logits / T, atol=1e-5)
    assert torch.equal(cal.outputs.logits.argmax(1), plain.outputs.logits.argmax(1))
    assert {k: cal.metrics[k] for k in ("top1", "top5", "macro_f1")} == \
        {k: plain.metrics[k] for k in ("top1", "top5", "macro_f1")}
    folder = digits_folder / "test" / "digit_3"
    got = predict(out, [folder], workers=0, device="cpu", tta=TTA(flip=True))
    mean = predict(out, [folder], workers=0, device="cpu", tta=TTA(flip=True), calibrated=False).probs
    assert torch.allclose(got.probs, torch.softmax(mean.log() / T, dim=1), atol=1e-9)


def test_a_run_trained_without_flips_gets_no_mirror_view(digits_folder, tmp_path):
    """--hflip 0 says a mirrored image is not of the same class (digits, text): train's final TTA, evaluate,
    predict and Predictor then average no mirror view (it lowered accuracy), and say so."""
    from spinal_transfer.deploy.predict import predict
    from spinal_transfer.deploy.predictor import Predictor
    from spinal_transfer.training.train import run

    out = tmp_path / "noflip"
    report = run(tiny_cfg(digits_folder, out, epochs=1, limit_train_batches=2, hflip=0.0, tta=True, tta_crops=5))
    assert report["test"]["tta"] == {"flip": False, "crops": 5, "crop_fraction": 0.875, "views": 6}
    assert "TTA: no mirror view: the model was trained with --hflip 0" in (out / "train.log").read_text()
    ev = evaluate(out, device="cpu", tta=True)
    assert ev.tta == TTA(flip=False) and ev.metrics["tta"]["views"] == 1
    assert ev.metrics["top1"] == ev.plain_metrics["top1"] == report["test_without_tta"]["top1"]
    folder = digits_folder / "test" / "digit_3"
    assert predict(out, [folder], workers=0, device="cpu", tta=TTA(flip=True, crops=5)).tta["views"] == 6
    assert Predictor(out, device="cpu", tta=True).tta == TTA(flip=False)
