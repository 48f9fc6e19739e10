"""`compare` end to end on a real transfer task (digits 5-9 from a digits 0-4 checkpoint, as a frozen-backbone
screen): the three result files, McNemar checked against an independent computation from the per-image
predictions, features computed once for all runs, rerun/resume/lock behaviour, and two processes sharing one
folder; and the default mode, fine-tune as train does, on a tiny random-init model."""
from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import cli_flags, signal_after, write_digits_folder
from scipy.stats import binom

import spinal_transfer.training.train as train
from spinal_transfer.cli import main as cli
from spinal_transfer.config import TrainConfig
from spinal_transfer.errors import ConfigError
from spinal_transfer.experiments import compare as cmp
from spinal_transfer.experiments.multirun import DEFAULT_MODE, MODE_NAMES
from spinal_transfer.models.heads_spec import HeadSpecError, parse_head_spec, parse_head_specs

SIZE = 16


def _options(data: Path, weights: Path) -> dict:
    return dict(data=data, backbone="timm/test_resnet", weights=weights, img_size=SIZE, batch_size=64, workers=0,
                augment="none", lr=0.05, scheduler="none", epochs=2, log_interval=1000, device="cpu", layer_width=16)


# --- head specs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,text,fields", [
    ("linear", "linear", {"head": "linear"}),
    ("mlp", "mlp", {"head": "mlp"}),
    ("mlp:hidden=1024", "mlp:hidden=1024", {"head": "mlp", "mlp_hidden": [1024]}),
    ("mlp:hidden=1024-512,dropout=0.2", "mlp:hidden=1024-512,dropout=0.2",
     {"head": "mlp", "mlp_hidden": [1024, 512], "head_dropout": 0.2}),
    ("spinal", "spinal", {"head": "spinal"}),
    ("spinal:vgg", "spinal:vgg", {"head": "spinal", "head_preset": "vgg"}),
    ("spinal:preset=vgg", "spinal:vgg", {"head": "spinal", "head_preset": "vgg"}),
    (" spinal:width=256, layers=6", "spinal:width=256,layers=6",
     {"head": "spinal", "layer_width": 256, "num_layers": 6}),
    ("spinal:vgg:width=1024,splits=4,shared=true,dropout=0.3", "spinal:vgg,width=1024,splits=4,shared=true,dropout=0.3",
     {"head": "spinal", "head_preset": "vgg", "layer_width": 1024, "num_splits": 4, "shared_weights": True,
      "head_dropout": 0.3}),
])
def test_head_specs(spec, text, fields):
    h = parse_head_spec(spec)
    assert h.text == text and h.config_fields() == fields
    assert parse_head_spec(h.text).config_fields() == fields            # the canonical text reads back the same
    cfg = TrainConfig.from_dict({**h.config_fields()})                  # every value is a valid TrainConfig value
    assert all(getattr(cfg, k) == v for k, v in fields.items())


def test_every_documented_spec_parses():
    """The grammar in heads_spec's docstring is the code's: each example there parses."""
    import spinal_transfer.models.heads_spec as hs

    examples = [line.split()[0] for line in hs.__doc__.splitlines()
                if line.startswith("    ") and line.split() and line.split()[0].split(":")[0] in hs.KINDS]
    assert len(examples) >= 8
    for spec in examples:
        parse_head_spec(spec)


@pytest.mark.parametrize("spec,message", [
    ("conv", "unknown head kind 'conv'"),
    ("spinal:width=abc", "width=abc is not an integer"),
    ("spinal:width=0", "width=0 is out of range (expected an integer >= 1)"),
    ("spinal:width=-3", "width=-3 is out of range (expected an integer >= 1)"),
    ("spinal:layers=-1", "layers=-1 is out of range"),
    ("mlp:hidden=-5", "hidden=-5 is not integers joined by"),
    ("spinal:dropout=1.5", "dropout=1.5 is out of range"),
    ("spinal:depth=3", "unknown option 'depth' for a spinal head; spinal takes preset, width, layers"),
    ("spinal:foo", "'foo' is neither a preset (resnet or vgg) nor an option=value pair"),
    ("spinal:width", "'width' needs a value"),
    ("spinal:shared=maybe", "shared=maybe is not true or false"),
    ("spinal:width=3,width=4", "option 'width' is given twice"),
    ("linear:width=3", "linear takes no options"),
    ("mlp:hidden=10-x", "hidden=10-x is not integers joined by '-'"),
])
def test_bad_head_specs_say_what_is_wrong(spec, message):
    with pytest.raises(HeadSpecError) as e:
        parse_head_spec(spec)
    assert message in str(e.value) and str(e.value).startswith(f"head spec {spec!r}: ")
    assert isinstance(e.value, ConfigError) and "\n" not in str(e.value)


def test_the_same_head_twice_is_refused(tmp_path):
    with pytest.raises(HeadSpecError, match="name the same head"):
        parse_head_specs(["linear", "spinal:vgg", "spinal:preset=vgg"])
    base = TrainConfig(data=str(tmp_path))              # spinal's default preset is resnet: the same run
    with pytest.raises(cmp.CompareError, match="'spinal' and 'spinal:resnet' are the same head"):
        cmp.plan(base, parse_head_specs(["linear", "spinal", "spinal:resnet"]), 2, "frozen", tmp_path / "out")
    # the width the rule gives, spelled out: the same head once it is resolved on the backbone's features (QA 27)
    from spinal_transfer.models.heads import create_head

    base = TrainConfig(data=str(tmp_path), backbone="timm/test_resnet", weights="none", img_size=32)
    width = create_head("spinal", 96, 3).layer_width              # timm/test_resnet: 96 features
    specs = parse_head_specs(["linear", "spinal", f"spinal:width={width}"])
    with pytest.raises(cmp.CompareError, match=f"'spinal' and 'spinal:width={width}' are the same head on "
                                               f"timm/test_resnet's 96 features"):
        cmp.check_heads(cmp.plan(base, specs, 1, "frozen", tmp_path / "out"), 3)
    cmp.check_heads(cmp.plan(base, parse_head_specs(["linear", "spinal", f"spinal:width={width + 8}"]), 1,
                             "frozen", tmp_path / "out"), 3)
    with pytest.raises(cmp.CompareError, match="at least two heads"):
        cmp.plan(base, parse_head_specs(["spinal"]), 2, "frozen", tmp_path / "out")


def test_plan_shares_everything_but_head_and_seed(tmp_path):
    base = TrainConfig(data=str(tmp_path), split_seed=7, lr=0.01, layer_width=64)
    runs = cmp.plan(base, parse_head_specs(["linear", "spinal:width=32", "mlp"]), 3, "frozen", tmp_path / "o")
    assert [(p.head.text, p.seed) for p in runs][:4] == [("linear", 0), ("spinal:width=32", 0), ("mlp", 0),
                                                         ("linear", 1)]
    assert {p.cfg.cache_dir for p in runs} == {str((tmp_path / "o" / "feature-cache").resolve())}   # one cache
    assert all(p.cfg.freeze_backbone and p.cfg.cache_features and p.cfg.split_seed == 7 and p.cfg.lr == 0.01
               for p in runs)
    assert [p.cfg.layer_width for p in runs[:2]] == [64, 32] and len({p.cfg.out for p in runs}) == 9
    ft = cmp.plan(base, parse_head_specs(["linear", "spinal"]), 1, "finetune", tmp_path / "o")
    assert not any(p.cfg.freeze_backbone or p.cfg.cache_features for p in ft)


def test_random_init_backbones_of_different_seeds_do_not_share_features():
    """weights none: each seed initialises another backbone, so its features get another cache entry; the same
    seed (whatever the head) shares one."""
    from spinal_transfer.data.transforms import build_transforms
    from spinal_transfer.models.preprocess import resolve_data_config
    from spinal_transfer.models.surgery import build_model
    from spinal_transfer.training.features import fingerprint

    def entry(seed: int, head: str) -> str:
        torch.manual_seed(seed)
        model = build_model("timm/test_resnet", 5, head=head, weights="none")
        dc = resolve_data_config("timm/test_resnet", "none", model, img_size=SIZE)
        return fingerprint(model, "none", build_transforms(dc, train=False), [], None, False)

    assert entry(0, "linear") == entry(0, "spinal") != entry(1, "linear")


def test_bad_head_spec_on_the_command_line_is_one_line(tmp_path, capsys):
    assert cli(["compare", "--data", str(tmp_path), "--heads", "linear", "spinal:width=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: head spec 'spinal:width=abc': width=abc is not an integer"


# --- end to end ----------------------------------------------------------------------------------

def _independent_mcnemar(reference: Path, other: Path) -> tuple[int, int, float]:
    """b, c and the exact two-sided p-value straight from two test_predictions.csv files."""
    with open(reference / "test_predictions.csv") as f1, open(other / "test_predictions.csv") as f2:
        r, o = list(csv.DictReader(f1)), list(csv.DictReader(f2))
    assert [x["path"] for x in r] == [y["path"] for y in o] and len(r) > 100
    b = sum(x["prediction"] == x["target"] != y["prediction"] for x, y in zip(r, o))
    c = sum(y["prediction"] == y["target"] != x["prediction"] for x, y in zip(r, o))
    return b, c, (1.0 if b + c == 0 else min(1.0, 2 * binom.cdf(min(b, c), b + c, 0.5)))


def _expected_verdict(tests: list[tuple[int, int, float]], head: str) -> str:
    signs = {("better" if c > b else "worse") if p < 0.05 else "none" for b, c, p in tests}
    if len(signs) > 1:
        return "mixed"
    sign = signs.pop()
    verdict = f"{head} {sign} (p<0.05)" if sign != "none" else "no significant difference"
    return f"{verdict} in each of the {len(tests)} seeds"


def _computing_lines(out: Path) -> dict[str, int]:
    """Per run folder, the log lines of the backbone computing features (features.cached_split)."""
    return {str(p.parent.relative_to(out / "runs")): p.read_text().count("computing ")
            for p in sorted((out / "runs").glob("*/seed*/train.log"))}


def _cache(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "feature-cache").glob("*.npy"))}


def _hold_lock(run: Path, until: Path) -> subprocess.Popen:
    """Another process holding a run folder's lock, as one training it would: it takes the lock, and once `until`
    exists it "finishes" the run (puts back its report and predictions, kept aside as *.held) and lets go."""
    code = ("import fcntl, os, sys, time\n"
            "run, until = sys.argv[1], sys.argv[2]\n"
            "fd = os.open(os.path.join(run, '.lock'), os.O_RDWR | os.O_CREAT)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "while not os.path.exists(until): time.sleep(0.05)\n"
            "for name in ('test_predictions.csv', 'report.json'):\n"
            "    os.replace(os.path.join(run, name + '.held'), os.path.join(run, name))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run), str(until)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.slow      # 9-16 s; the default suite stays near 10 minutes
def test_compare_frozen_two_heads_two_seeds(digits_transfer, tmp_path, monkeypatch, one_thread, capsys):
    data, weights = digits_transfer
    out = tmp_path / "cmp"
    args = ["compare", *cli_flags(**_options(data, weights)), "--heads", "linear", "spinal", "--seeds", "2",
            "--mode", "frozen", "--out", str(out)]
    real_run = train.run
    calls: list[tuple[str, bool]] = []

    def recording(cfg, resume=None, overwrite=False, on_epoch=None, track_as=None):
        calls.append((Path(cfg.out).relative_to(out / "runs").as_posix(), resume is not None))
        return real_run(cfg, resume, overwrite, on_epoch, track_as)

    monkeypatch.setattr(train, "run", recording)
    assert cli(args) == 0
    assert calls == [("linear/seed0", False), ("spinal/seed0", False), ("linear/seed1", False), ("spinal/seed1", False)]
    for name in cmp.RESULT_FILES:
        assert (out / name).is_file()

    # The backbone ran once for all four runs: three cache entries (train/val/test), all computed by the first run.
    cache = _cache(out)
    assert len(cache) == 3
    assert _computing_lines(out) == {"linear/seed0": 3, "linear/seed1": 0, "spinal/seed0": 0, "spinal/seed1": 0}
    runs = {(h, s): out / "runs" / h / f"seed{s}" for h in ("linear", "spinal") for s in (0, 1)}
    for d in runs.values():
        cfg = TrainConfig.from_yaml(d / "config.yaml")
        assert cfg.freeze_backbone and cfg.cache_features and cfg.cache_dir == str(out / "feature-cache")

    # The split really is shared: every run recorded the same files.
    recorded = {json.dumps(json.loads((d / "splits.json").read_text())["splits"]) for d in runs.values()}
    assert len(recorded) == 1

    with open(out / "compare.csv") as f:
        rows = {r["head"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["linear", "spinal"]
    assert {r["mode"] for r in rows.values()} == {MODE_NAMES["frozen"]}
    for head in ("linear", "spinal"):
        reports = [json.loads((runs[head, s] / "report.json").read_text()) for s in (0, 1)]
        row = rows[head]
        assert row["finished_seeds"] == "0;1" and row["same_split"] == "yes"
        for key in ("top1", "balanced_accuracy", "macro_f1"):
            values = [100 * r["test"][key] for r in reports]
            assert float(row[f"test_{key}_mean"]) == pytest.approx(statistics.mean(values))
            assert float(row[f"test_{key}_std"]) == pytest.approx(statistics.stdev(values))
        seconds = [sum(json.loads(r)["seconds"] for r in (runs[head, s] / "metrics.jsonl").read_text().splitlines())
                   for s in (0, 1)]
        assert float(row["train_seconds_mean"]) == pytest.approx(statistics.mean(seconds))
        width = reports[0]["head"]["feature_width"]
        params = 5 * (width + 1) if head == "linear" else 4 * (width // 2) * 16 + 3 * 16 ** 2 + 4 * 16 + 4 * 16 * 5 + 5
        assert int(row["head_params"]) == params                   # README's closed form for 2 halves, width 16

    # McNemar per seed, against an independent computation from the per-image predictions.
    expected = [_independent_mcnemar(runs["linear", s], runs["spinal", s]) for s in (0, 1)]
    spinal = rows["spinal"]
    assert rows["linear"]["mcnemar_b"] == "" and spinal["reference"] == "linear" and spinal["mcnemar_seeds"] == "0;1"
    assert [int(x) for x in spinal["mcnemar_b"].split(";")] == [e[0] for e in expected]
    assert [int(x) for x in spinal["mcnemar_c"].split(";")] == [e[1] for e in expected]
    assert [float(x) for x in spinal["mcnemar_p"].split(";")] == pytest.approx([e[2] for e in expected], rel=1e-9)
    assert spinal["verdict"].startswith(_expected_verdict(expected, "spinal"))

    md, page = (out / "compare.md").read_text(), (out / "compare.html").read_text()
    for text in (md, page):
        assert "all 4 runs recorded the same split" in text
        assert "Mode: frozen-backbone screen (features cached; not what train does)." in text
        assert "Reference head: linear. 2 McNemar tests made so far, of 2 planned (1 head x 2 seeds)" in text
        assert f"seed0: b={expected[0][0]} c={expected[0][1]}" in text and spinal["verdict"] in text
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "<link" not in page and "src=" not in page
    err = capsys.readouterr().err
    assert "all 4 runs recorded the same split" in err and f"mode: {MODE_NAMES['frozen']}" in err

    # Rerun: nothing trains, the features are not recomputed.
    calls.clear()
    assert cli(args) == 0 and calls == [] and _cache(out) == cache

    # One run killed after its last checkpoint (no report): it resumes. Another unfinished one that a second
    # process holds: it is left to that process and waited for, and the table ends with both.
    for name in ("report.json", "test_predictions.csv"):
        (runs["spinal", 1] / name).unlink()
        os.replace(runs["linear", 1] / name, runs["linear", 1] / f"{name}.held")
    holder = _hold_lock(runs["linear", 1], until=runs["spinal", 1] / "report.json")
    try:
        assert cli(args) == 0
    finally:
        holder.kill()
        holder.wait()
    assert calls == [("spinal/seed1", True)]
    err = capsys.readouterr().err
    assert "linear seed 1: being trained by another process, left to it" in err and "waiting for 1 run(s)" in err
    with open(out / "compare.csv") as f:
        again = {r["head"]: r for r in csv.DictReader(f)}
    assert again == rows                       # the resumed runs re-tested their chosen weights: same numbers
    assert _cache(out) == cache and sum(_computing_lines(out).values()) == 3

    # Fewer seeds in the same folder: the table is the one asked for, and the runs it leaves out are said.
    calls.clear()
    one_seed = args[:args.index("--seeds") + 1] + ["1"] + args[args.index("--seeds") + 2:]
    assert cli(one_seed) == 0 and calls == []
    err = capsys.readouterr().err
    assert "note: 2 finished run(s)" in err and "the tables show only the heads and seeds asked for" in err

    # A run that recorded another split (a test file touched between runs): its seed's paired test is left out,
    # as the sentence says (QA 27: the sentence said refused, the table kept the test and counted it)
    doc = json.loads((runs["spinal", 1] / "splits.json").read_text())
    doc["splits"]["test"][0][3] += 1
    (runs["spinal", 1] / "splits.json").write_text(json.dumps(doc))
    base = TrainConfig(**{k: str(v) if isinstance(v, Path) else v for k, v in _options(data, weights).items()})
    res = cmp.collect(cmp.plan(base, parse_head_specs(["linear", "spinal"]), 2, "frozen", out), "frozen")
    assert [t.seed for t in res.heads[1].tests] == [0]
    assert res.heads[1].note == "seed 1 not paired: its runs recorded different splits"
    assert res.splits.sentence().startswith("SPLITS DIFFER: 1 of 4 runs recorded another split than the first")


def test_compare_fine_tunes_as_train_by_default(three_digits, tmp_path, one_thread, capsys):
    """Without --mode: every run is what `train` does with these options (here a frozen first epoch, then the whole
    network; no feature cache), and every output names the mode."""
    out = tmp_path / "ft"
    weights = tmp_path / "backbone.pt"          # a weights file: --weights none would skip the frozen first epoch
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    flags = cli_flags(data=three_digits, backbone="timm/test_resnet", weights=weights, img_size=32, batch_size=32,
                      workers=0, augment="none", epochs=2, limit_train_batches=2, log_interval=1000, device="cpu",
                      layer_width=16, freeze_epochs=1)
    assert DEFAULT_MODE == "finetune"
    assert cli(["compare", *flags, "--heads", "linear", "spinal", "--seeds", "1", "--out", str(out)]) == 0
    assert not (out / "feature-cache").exists()
    for head in ("linear", "spinal"):
        run = out / "runs" / head / "seed0"
        cfg = TrainConfig.from_yaml(run / "config.yaml")
        assert not cfg.freeze_backbone and not cfg.cache_features and cfg.freeze_epochs == 1
        epochs = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
        assert [e["frozen"] for e in epochs] == [True, False]                 # train's frozen first epoch
        assert "computing " not in (run / "train.log").read_text()
    with open(out / "compare.csv") as f:
        assert [r["mode"] for r in csv.DictReader(f)] == ["fine-tune (as train)"] * 2
    for name in ("compare.md", "compare.html"):
        text = (out / name).read_text()
        assert "Mode: fine-tune (as train). " in text
        assert "backbone frozen for the first 1 epoch(s), as train does" in text
    assert "mode: fine-tune (as train)" in capsys.readouterr().err


def test_a_folder_of_other_settings_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    base = TrainConfig(data=str(tmp_path / "data"), lr=0.05)
    heads = parse_head_specs(["linear", "spinal"])
    out = tmp_path / "cmp"
    first = cmp.plan(base, heads, 1, "frozen", out)[0]
    first.run.path.mkdir(parents=True)
    first.run.write_text(first.run.config, first.cfg.to_yaml())         # as a run started with lr 0.05 leaves it
    with pytest.raises(cmp.CompareError, match=r"was run with other settings \(lr: 0.05 there, 0.01 asked for\)"):
        cmp.compare(TrainConfig(**{**base.to_dict(), "lr": 0.01}), heads, 1, "frozen", out)
    moved = dict(first.cfg.to_dict(), workers=3, log_interval=5)          # how a run runs is not the experiment
    first.run.write_text(first.run.config, TrainConfig.from_dict(moved).to_yaml())
    cmp.check_settings(first)


def test_a_run_of_another_split_is_refused(tmp_path):
    """QA 29: images added to the data folder between two compare commands into one --out: the second trained its
    new seeds on another split and the table averaged test sets of other images (SPLITS DIFFER said after the
    fact). A finished or interrupted run whose recorded split is not the one the folder gives now is refused."""
    import shutil

    from spinal_transfer.data.splits import config_splits, fingerprints, record

    data = write_digits_folder(tmp_path / "data", digits=(0, 1), splits=())
    base = TrainConfig(data=str(data), lr=0.05)
    first = cmp.plan(base, parse_head_specs(["linear", "spinal"]), 1, "frozen", tmp_path / "cmp")[0]
    first.run.path.mkdir(parents=True)
    first.run.write_json(first.run.splits, record(config_splits(first.cfg)))      # as the run recorded it
    cmp.check_split(first, fingerprints(config_splits(first.cfg)))                  # the same folder: goes on
    for f in sorted(next(data.iterdir()).iterdir())[:3]:
        shutil.copy(f, f.with_name("new_" + f.name))
    with pytest.raises(cmp.CompareError, match=r"seed0 was run on another train/val/test split of .*data \(images "
                                               r"were added, removed or renamed since\)"):
        cmp.check_split(first, fingerprints(config_splits(first.cfg)))


@pytest.mark.slow      # two processes: ~20 s
def test_two_compare_processes_share_one_folder(digits_transfer, tmp_path):
    """Started together on one --out: each run is trained once, by one of them (each trains one); the backbone
    runs once; both end with the whole table."""
    data, weights = digits_transfer
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "spinal_transfer", "compare", *cli_flags(**_options(data, weights)),
           "--heads", "linear", "mlp:hidden=32", "--seeds", "1", "--mode", "frozen", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    logs = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        logs.append(err)
    trained = [[line.split("] ", 1)[1] for line in log.splitlines() if line.endswith(": trained")] for log in logs]
    assert sorted(trained[0] + trained[1]) == ["linear seed 0: trained", "mlp:hidden=32 seed 0: trained"]
    assert trained[0] and trained[1], "one process did all the work: they did not run side by side"
    for d in sorted((out / "runs").glob("*/seed*")):
        log = (d / "train.log").read_text()
        assert log.count("run folder ") == 1 and log.count("best epoch ") == 1, d
        assert len((d / "metrics.jsonl").read_text().splitlines()) == 2
    assert len(_cache(out)) == 3 and sum(_computing_lines(out).values()) == 3
    with open(out / "compare.csv") as f:
        assert [r["finished_seeds"] for r in csv.DictReader(f)] == ["0", "0"]


@pytest.mark.slow      # ~10 s: four real runs and an MLflow store read back; the default suite stays ~10 min
def test_every_run_is_in_one_mlflow_store_under_out_named_by_head_and_seed(three_digits, tmp_path, one_thread):
    """compare's runs all go to OUT/mlruns.db (not one store per head), named `<head>/seed<k>`; a plain train run
    keeps its store beside its folder, named after it."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "cmp"
    flags = cli_flags(data=three_digits, backbone="timm/test_resnet", weights="none", img_size=16, batch_size=64,
                      workers=0, augment="none", epochs=1, limit_train_batches=1, log_interval=1000, device="cpu",
                      layer_width=8, log_to="mlflow")
    assert cli(["compare", *flags, "--heads", "linear", "spinal", "--seeds", "1", "--out", str(out)]) == 0
    assert cli(["train", *flags, "--out", str(tmp_path / "plain" / "r1")]) == 0
    names = {}
    for db in (out / "mlruns.db", tmp_path / "plain" / "mlruns.db"):
        client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        names[db] = {r.info.run_name: r.data.tags["run_dir"]
                     for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    assert names[out / "mlruns.db"] == {f"{h}/seed0": str(out / "runs" / h / "seed0") for h in ("linear", "spinal")}
    assert names[tmp_path / "plain" / "mlruns.db"] == {"r1": str(tmp_path / "plain" / "r1")}
    assert not list((out / "runs").rglob("mlruns.db"))


@pytest.mark.slow      # ~10 s: two runs and an MLflow store read back; the default suite stays ~10 min
def test_a_compare_run_resumed_by_train_continues_in_compares_store(three_digits, tmp_path, one_thread, monkeypatch):
    """A run of compare (train.run with multirun.tracked_as, as compare calls it) stopped after its first epoch and
    resumed by hand with `train --resume RUN` keeps tracking in OUT/mlruns.db, in the same MLflow run named
    `<head>/seed<k>` (RUN/tracking.json records where), not in a second store beside the run folder holding a
    second MLflow run with only the resumed epochs."""
    pytest.importorskip("mlflow")
    from conftest import tiny_cfg
    from mlflow.tracking import MlflowClient

    from spinal_transfer.errors import Interrupted
    from spinal_transfer.experiments.multirun import tracked_as

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "cmp"
    run_dir = out / "runs" / "linear" / "seed0"
    cfg = tiny_cfg(three_digits, run_dir, head="linear", img_size=16, epochs=2, limit_train_batches=1,
                   device="cpu", log_to="mlflow")

    def stop(row: dict) -> None:
        raise Interrupted("stopped after epoch 1")      # after last.pt, as a signal would stop it

    with pytest.raises(Interrupted):
        train.run(cfg, on_epoch=stop, track_as=tracked_as(run_dir))
    assert cli(["train", "--resume", str(run_dir)]) == 0
    assert sorted(tmp_path.rglob("mlruns.db")) == [out / "mlruns.db"], "nothing in a store beside the run folder"
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert (run.info.run_name, run.info.status) == ("linear/seed0", "FINISHED")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")] == [1, 2]
    assert "final/test/top1" in run.data.metrics


def test_a_runs_folder_holding_what_compare_did_not_make_is_refused(three_digits, tmp_path, cli_run):
    """OUT/runs/ holds compare's run folders, runs/<head>/seed<k>/: one holding anything else (a file, a folder
    of another shape, a seed<k> folder without a run's files or lock) is refused in one line before any work
    and left as it was. compare's own go on: runs, a run being started (its lock only, or its folders before
    the lock file), and anything beside compare's own compare.csv."""
    from spinal_transfer.experiments.multirun import refuse_others_in

    out = tmp_path / "out"
    flags = ["--data", three_digits, "--backbone", "timm/test_resnet", "--weights", "none", "--img-size", "16",
             "--workers", "0", "--epochs", "1", "--heads", "linear", "spinal", "--seeds", "1", "--out", out]
    for stray in ("mine.txt", "linear/notes/a.txt", "linear/seed0/a.txt", "linear/seed0x/config.yaml"):
        runs = out / "runs"
        (runs / stray).parent.mkdir(parents=True)
        (runs / stray).write_text("mine")
        res = cli_run("compare", *flags)
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert res.returncode == 2 and "Traceback" not in res.stderr and len(errors) == 1, res.stderr[-2000:]
        first = runs / "/".join(stray.split("/")[:2])           # the entry that is not compare's
        assert f"{first} is not one of this command's run folders" in errors[0] and "give another --out" in errors[0]
        assert os.listdir(out) == ["runs"] and sorted(p for p in runs.rglob("*") if p.is_file()) == [runs / stray]
        shutil.rmtree(out)
    ours = {"linear/seed0/config.yaml": "head: linear\n", "spinal/seed0/.lock": "", "spinal/seed1/.lock": None,
            "mlp/seed2/checkpoints/last.pt": ""}
    for name, text in ours.items():
        (out / "runs" / name).parent.mkdir(parents=True, exist_ok=True)
        if text is not None:
            (out / "runs" / name).write_text(text)
    (out / "runs" / "empty").mkdir()

    refuse_others_in(out, cmp.RESULT_FILES, cmp.CSV_COLUMNS)
    (out / "runs" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt is not one of this command's run folders"):
        refuse_others_in(out, cmp.RESULT_FILES, cmp.CSV_COLUMNS)
    (out / "compare.csv").write_text(",".join(cmp.CSV_COLUMNS) + "\n")
    refuse_others_in(out, cmp.RESULT_FILES, cmp.CSV_COLUMNS)


def _compare_until(data: Path, weights: Path, out: Path, line: str) -> tuple[int, str]:
    """`compare` of two heads in a real process, SIGTERM the moment stderr shows `line` (timed on what the
    command logs, not on a sleep): (exit code, stderr)."""
    import signal

    cmd = [sys.executable, "-m", "spinal_transfer", "compare", *cli_flags(**_options(data, weights)),
           "--heads", "linear", "mlp:hidden=32", "--seeds", "1", "--mode", "frozen", "--out", str(out)]
    return signal_after(cmd, line, signal.SIGTERM, {**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


@pytest.mark.parametrize("line,finishing", [
    ("calibration: temperature", True),      # run 1 is testing its best epoch and writing its report
    ("seed 0: trained", False),              # run 1 is done, run 2 not started: the old code had no handler
])
def test_a_signal_during_a_report_or_between_runs_stops_compare_resumably(digits_transfer, tmp_path, line,
                                                                          finishing):
    """The old code went on to train run 2 and exited 0 after a SIGTERM during run 1's report (it said
    'finishing that, then exiting'), and was killed with 143 and no message by one between the runs. Now both
    exit 75 with the usual line, run 1 finished, run 2 never started; the same command then finishes it."""
    from spinal_transfer.errors import EXIT_INTERRUPTED

    data, weights = digits_transfer
    out = tmp_path / "cmp"
    code, err = _compare_until(data, weights, out, line)
    assert code == EXIT_INTERRUPTED, err[-3000:]
    assert ("finishing that (seconds), then exiting" in err) == finishing, err[-3000:]
    assert "stopped: SIGTERM received" in err and "the same compare command resumes it" in err, err[-3000:]
    assert "Traceback" not in err and "[2/2]" not in err
    assert [d.parent.parent.name for d in sorted((out / "runs").glob("*/seed0/report.json"))] == ["linear"]
    assert (out / "compare.csv").is_file()                 # the tables are written on the way out


def test_a_folder_train_refuses_is_refused_before_any_table_lock_or_run_is_written(tmp_path, cli_run):
    """One class folder: compare said so only from its first run, after writing empty compare.{csv,md,html} ("0/1"
    rows) and its lock into OUT."""
    write_digits_folder(tmp_path / "one", digits=(3,), splits=())
    res = cli_run("compare", "--data", tmp_path / "one", "--heads", "linear", "spinal", "--backbone",
                  "timm/test_resnet", "--weights", "none", "--epochs", "1", "--out", tmp_path / "cmp")
    assert res.returncode == 2 and res.stderr.splitlines()[-1].startswith("error: ") and "only one class" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "cmp").exists()


def test_a_head_the_backbone_cannot_take_is_refused_before_any_run_trains(tmp_path, cli_run):
    """spinal:splits=99 on test_resnet's 96 features failed only when its first run started, after the linear
    reference had trained (a whole fine-tune on a real backbone)."""
    write_digits_folder(tmp_path / "two", digits=(3, 4), splits=())
    res = cli_run("compare", "--data", tmp_path / "two", "--heads", "linear", "spinal:splits=99", "--backbone",
                  "timm/test_resnet", "--weights", "none", "--epochs", "1", "--img-size", "32", "--out", tmp_path / "c")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.splitlines()[-1] == (
        "error: head 'spinal:splits=99' cannot be built on timm/test_resnet's 96 features: num_splits must be in "
        "[1, in_features=96], got 99; change it (`spinal-transfer describe timm/test_resnet --num-classes 2` shows "
        "what it takes)")
    assert not (tmp_path / "c").exists()


def test_the_settings_line_says_what_each_head_did_with_the_batchnorm_statistics():
    """--bn-stats auto keeps them for a photo folder but re-estimates them under a head with dropout: the table's
    settings line names the heads apart instead of saying nothing (or 'kept' of both)."""
    assert cmp._bn_words({"linear": {"update"}, "spinal": {"update"}}) == ""
    assert cmp._bn_words({"linear": {"frozen"}, "spinal": {"frozen"}}) == ", its BatchNorm statistics kept as loaded"
    mixed = cmp._bn_words({"linear": {"frozen"}, "spinal:preset=vgg": {"update"}})
    assert "kept as loaded for linear and re-estimated for spinal:preset=vgg" in mixed
