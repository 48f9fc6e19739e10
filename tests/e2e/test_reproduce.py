"""`reproduce` end to end on tiny stand-in recipes over the digits folder: results, paired test, resume."""
from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path

import pytest
import yaml
from scipy.stats import binom

import spinal_transfer.training.train as train
from spinal_transfer.cli import main as cli
from spinal_transfer.experiments import reproduce as rp

# A recipe pair shaped like the paper's, small enough for CPU: random-init tiny ResNet, 16 px.
TINY = dict(backbone="timm/test_resnet", weights="none", img_size=16, batch_size=64, workers=0, augment="none",
            optimizer="sgd", scheduler="none", device="cpu", log_interval=1000, stages=[{"epochs": 2, "lr": 0.05}])
HEADS = {"default": dict(head="linear"), "spinal": dict(head="spinal", layer_width=8)}
PAPER = """recipe,dataset,backbone,head,preset,layer_width,top1,split,selected_on_same_split,source
digits_tiny_spinal,digits,tiny,spinal,resnet,8,50.00,test,true,first number
digits_tiny_spinal,digits,tiny,spinal,resnet,8,60.00,val,false,second number
"""
SMOKE = ["--seeds", "2", "--epochs", "1", "--limit-train-batches", "2"]


@pytest.mark.parametrize("b,c", [(10, 2), (2, 10), (0, 6), (7, 7), (0, 0), (1, 30)])
def test_mcnemar_exact_two_sided(b, c):
    expected = 1.0 if b + c == 0 else min(1.0, 2 * binom.cdf(min(b, c), b + c, 0.5))
    assert rp.mcnemar_p(b, c) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_known_values_and_verdicts():
    assert rp.mcnemar_p(10, 2) == pytest.approx(2 * 79 / 4096)          # 2 * (1 + 12 + 66) / 2**12
    assert rp.mcnemar_p(7, 7) == 1.0
    better, worse, none = rp.PairedTest(0, 2, 10, 0.039), rp.PairedTest(1, 10, 2, 0.039), rp.PairedTest(2, 3, 4, 1.0)
    assert better.verdict("spinal") == "spinal better (p<0.05)"
    assert worse.verdict("spinal") == "spinal worse (p<0.05)"
    assert rp.overall_verdict([better, better], "spinal") == "spinal better (p<0.05) in each of the 2 seeds"
    assert rp.overall_verdict([better, none], "spinal").startswith("mixed:")


def test_discordant_refuses_different_images():
    a = [("test/x/1.png", 0, 0), ("test/x/2.png", 1, 0)]
    assert rp.discordant(a, [("test/x/1.png", 0, 1), ("test/x/2.png", 1, 1)]) == (1, 1)
    with pytest.raises(rp.PairingError):
        rp.discordant(a, [("test/x/1.png", 0, 0), ("test/x/3.png", 1, 0)])
    with pytest.raises(rp.PairingError):
        rp.discordant(a, a[:1])


def _write_recipes(folder: Path, data_name: str) -> Path:
    folder.mkdir()
    for head, kw in HEADS.items():
        (folder / f"digits_tiny_{head}.yaml").write_text(yaml.safe_dump({"data": data_name, **TINY, **kw}))
    (folder / rp.PAPER_RESULTS).write_text(PAPER)
    return folder


def _independent_mcnemar(default: Path, spinal: Path) -> tuple[int, int, float]:
    with open(default / "test_predictions.csv") as f1, open(spinal / "test_predictions.csv") as f2:
        d, s = list(csv.DictReader(f1)), list(csv.DictReader(f2))
    assert [r["path"] for r in d] == [r["path"] for r in s] and all(r["path"] for r in d)
    b = sum(x["prediction"] == x["target"] != y["prediction"] for x, y in zip(d, s))
    c = sum(y["prediction"] == y["target"] != x["prediction"] for x, y in zip(d, s))
    return b, c, (1.0 if b + c == 0 else min(1.0, 2 * binom.cdf(min(b, c), b + c, 0.5)))


@pytest.mark.slow      # ~30 s; test_reproduce_under_both_protocols runs reproduce end to end by default
def test_reproduce_end_to_end_with_interruption(digits_folder, tmp_path, monkeypatch, one_thread, capsys):
    recipes_dir = _write_recipes(tmp_path / "recipes", digits_folder.name)
    out = tmp_path / "out"
    real_run = train.run
    calls: list[tuple[str, bool]] = []

    def killed_in_second_run(cfg, resume=None, overwrite=False, track_as=None):
        calls.append((cfg.out, resume is not None))
        report = real_run(cfg, resume, overwrite, track_as=track_as)
        if len(calls) == 2:     # killed after the last checkpoint, before the report: must resume, not restart
            (Path(cfg.out) / "report.json").unlink()
            (Path(cfg.out) / "test_predictions.csv").unlink()
            raise KeyboardInterrupt
        return report

    monkeypatch.setattr(train, "run", killed_in_second_run)
    recipes = rp.find_recipes(str(recipes_dir / "*_spinal.yaml"))          # brings its default partner along
    assert [r.name for r in recipes] == ["digits_tiny_default", "digits_tiny_spinal"]
    with pytest.raises(KeyboardInterrupt):
        rp.reproduce(recipes, digits_folder.parent, out, seeds=2, overrides={"epochs": 1, "limit_train_batches": 2},
                     log=print)
    first = rp.run_dir(out, "digits_tiny_default", 0)
    assert first.state() == "finished"
    assert rp.run_dir(out, "digits_tiny_spinal", 0).state() == "interrupted"
    with open(out / "results.csv") as f:       # written on the way out of the interruption
        assert [r["finished_seeds"] for r in csv.DictReader(f)] == ["0", ""]
    mtime = first.report.stat().st_mtime_ns

    # Another protocol into the same folder is refused before anything trains.
    calls.clear()
    args = ["reproduce", "--recipes", str(recipes_dir / "*.yaml"), "--data-root", str(digits_folder.parent),
            "--out", str(out), *SMOKE]
    assert cli(args + ["--select-on", "test"]) == 2 and calls == []

    def recording(cfg, resume=None, overwrite=False, track_as=None):
        calls.append((cfg.out, resume is not None))
        return real_run(cfg, resume, overwrite, track_as=track_as)

    monkeypatch.setattr(train, "run", recording)
    assert cli(args) == 0
    dirs = {(name, s): str(rp.run_dir(out, name, s).path) for name in ("digits_tiny_default", "digits_tiny_spinal")
            for s in (0, 1)}
    assert calls == [(dirs["digits_tiny_spinal", 0], True), (dirs["digits_tiny_default", 1], False),
                     (dirs["digits_tiny_spinal", 1], False)]
    assert first.report.stat().st_mtime_ns == mtime

    with open(out / "results.csv") as f:
        rows = {r["recipe"]: r for r in csv.DictReader(f)}
    default, spinal = rows["digits_tiny_default"], rows["digits_tiny_spinal"]
    assert default["paper_top1"] == "not reported" and spinal["paper_top1"] == "50.00;60.00"
    for name, row in rows.items():
        top1 = [100 * json.loads(Path(dirs[name, s], "report.json").read_text())["test"]["top1"] for s in (0, 1)]
        assert row["finished_seeds"] == "0;1" and row["selected_on"] == "val" and row["seeds"] == "2"
        assert (row["dataset"], row["backbone"]) == ("digits", TINY["backbone"])     # the recipe's, not "tiny"
        assert row["overrides"] == "epochs=1, limit_train_batches=2"
        assert float(row["ours_top1_mean"]) == pytest.approx(statistics.mean(top1))
        assert float(row["ours_top1_std"]) == pytest.approx(statistics.stdev(top1))
    assert float(spinal["diff_vs_paper"].split(";")[1]) == pytest.approx(float(spinal["ours_top1_mean"]) - 60.0)
    assert default["mcnemar_b"] == "" and spinal["compared_with"] == "digits_tiny_default"
    expected = [_independent_mcnemar(Path(dirs["digits_tiny_default", s]), Path(dirs["digits_tiny_spinal", s]))
                for s in (0, 1)]
    assert spinal["mcnemar_seeds"] == "0;1"
    assert [int(x) for x in spinal["mcnemar_b"].split(";")] == [e[0] for e in expected]
    assert [int(x) for x in spinal["mcnemar_c"].split(";")] == [e[1] for e in expected]
    assert [float(x) for x in spinal["mcnemar_p"].split(";")] == pytest.approx([e[2] for e in expected])
    assert spinal["verdict"]

    md, page = (out / "results.md").read_text(), (out / "results.html").read_text()
    for text in (md, page):
        assert "digits_tiny_spinal" in text and "b=" in text and "not reported" in text
    assert "McNemar" in md.splitlines()[2]
    assert page.startswith("<!DOCTYPE html>") and 'class="smoke"' in page
    assert "<script" not in page and "<link" not in page and "src=" not in page     # self-contained
    assert not any(n.endswith(".tmp") for n in os.listdir(out))

    # Everything finished: a rerun trains nothing and rewrites the same table.
    calls.clear()
    assert cli(args) == 0 and calls == []
    # --collect without --seeds keeps the 2 seeds OUT was made with (it rewrote the table as 2 of 3 seeds, exit 3)
    table = (out / "results.csv").read_bytes()
    assert SMOKE[:2] == ["--seeds", "2"]
    assert cli([*args[:-len(SMOKE)], *SMOKE[2:], "--collect"]) == 0
    assert (out / "results.csv").read_bytes() == table and calls == []
    # --collect without the runs' --epochs 1: they are refused with what to give (QA 29: "Use another --out")
    capsys.readouterr()
    assert cli([*args[:-len(SMOKE)], "--collect"]) == 2 and calls == []
    assert "--collect reads the runs as they were made: give it the overrides they were made with (e.g. --epochs)" \
        in capsys.readouterr().err


@pytest.mark.slow      # 9-16 s; the default suite stays near 10 minutes
def test_reproduce_under_both_protocols_says_which_and_how_many_training_images(digits_folder, tmp_path, one_thread):
    recipes_dir = tmp_path / "recipes"
    recipes_dir.mkdir()
    for head, kw in HEADS.items():           # stand-ins for recipes whose authors chose the epoch on test
        (recipes_dir / f"digits_tiny_{head}.yaml").write_text(yaml.safe_dump(
            {"data": digits_folder.name, **TINY, **kw, "paper_select_on": "test"}))
    recipes = rp.find_recipes(str(recipes_dir / "*.yaml"))
    n = {s: sum(1 for _ in (digits_folder / s).rglob("*.png")) for s in ("train", "val", "test")}
    for protocol, train_images, selected in (("honest", n["train"], "val"), ("paper", n["train"] + n["val"], "test")):
        out = tmp_path / protocol
        rp.reproduce(recipes, digits_folder.parent, out, seeds=1, log=print,
                     overrides={"protocol": protocol, "epochs": 1, "limit_train_batches": 2})
        with open(out / "results.csv") as f:
            rows = list(csv.DictReader(f))
        assert [(r["protocol"], r["train_images"], r["selected_on"]) for r in rows] == \
               [(protocol, str(train_images), selected)] * 2
        assert [(r["dataset"], r["backbone"]) for r in rows] == [("digits", TINY["backbone"])] * 2   # not "tiny"
        report = json.loads((rp.run_dir(out, "digits_tiny_spinal", 0).report).read_text())
        assert report["protocol"] == protocol and report["num_images"]["train"] == train_images
        assert (report["val"] is None) == (protocol == "paper")
        md = (out / "results.md").read_text()
        assert f"| {protocol} | {train_images:,} |" in md


def test_tracking_flags_reach_every_run_and_stay_out_of_the_table(tmp_path):
    recipe = tmp_path / "tiny_spinal.yaml"
    recipe.write_text(yaml.safe_dump({"data": "digits", "backbone": "timm/test_resnet", "weights": "none",
                                      "head": "spinal", "layer_width": 32, "paper_select_on": "val"}))
    over = {"log_to": "tensorboard,mlflow", "tracking_uri": "sqlite:///x.db", "experiment": "paper"}
    cfg = rp.recipe_config(rp.Recipe(recipe), tmp_path / "data", tmp_path / "out", 0, over)
    assert (cfg.log_to, cfg.tracking_uri, cfg.experiment) == ("tensorboard,mlflow", "sqlite:///x.db", "paper")
    assert rp._overrides(cfg, rp.recipe_config(rp.Recipe(recipe), tmp_path / "data", tmp_path / "out", 0)) == "none"
    assert not {"log_to", "tracking_uri", "experiment"} & set(rp.PROTOCOL)


def test_a_dataset_not_prepared_is_named_with_its_prepare_command_before_any_run(tmp_path):
    (tmp_path / "digits").mkdir()
    with pytest.raises(rp.ReproduceError, match=r"not prepared under .*: cifar10, stl10; prepare each first: "
                                                r"`spinal-transfer prepare cifar10 --root .* --download` fetches "
                                                r"each of cifar10, stl10 \(the network once\)$"):
        rp.check_prepared([str(tmp_path / "stl10"), str(tmp_path / "digits"), str(tmp_path / "cifar10")], tmp_path)
    with pytest.raises(rp.ReproduceError, match=r": bird225, svhn; prepare each first: `spinal-transfer prepare svhn "
                                                r"--root .* --download` fetches it \(the network once\); "
                                                r"`spinal-transfer prepare bird225 --root .*` says where to get the "
                                                r"raw files of it \(prepare cannot download them\)$"):
        rp.check_prepared([str(tmp_path / "bird225"), str(tmp_path / "svhn")], tmp_path)     # Kaggle's: no --download
    rp.check_prepared([str(tmp_path / "digits")], tmp_path)          # prepared: nothing to say
    with pytest.raises(rp.ReproduceError, match=r": photos, svhn; prepare each first: `spinal-transfer prepare svhn "
                                                r"--root .* --download` fetches it \(the network once\); "
                                                r"`spinal-transfer prepare photos --root .*` makes it from images "
                                                r"installed packages ship \(nothing to fetch\)$"):
        rp.check_prepared([str(tmp_path / "photos"), str(tmp_path / "svhn")], tmp_path)    # photos: no raw files


def _mlflow_runs(db: Path) -> dict[str, str]:
    """Run name -> run folder of every MLflow run in the SQLite store `db`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {r.info.run_name: r.data.tags["run_dir"] for r in runs}


@pytest.mark.slow      # ~9 s: real runs and an MLflow store read back; the default suite stays ~10 min
def test_every_run_is_in_one_mlflow_store_under_out_named_by_recipe_and_seed(digits_folder, tmp_path, one_thread):
    """The default MLflow store of reproduce is OUT/mlruns.db for all its runs (not one per recipe beside its
    seeds), each run named `<recipe>/seed<k>` (not a `seed0` that every recipe has)."""
    pytest.importorskip("mlflow")
    recipes = rp.find_recipes(str(_write_recipes(tmp_path / "recipes", digits_folder.name) / "*.yaml"))
    out = tmp_path / "rep1"
    rp.reproduce(recipes, digits_folder.parent, out, seeds=1, log=print,
                 overrides={"epochs": 1, "limit_train_batches": 1, "log_to": "mlflow"})
    expected = {f"digits_tiny_{h}/seed0": str(rp.run_dir(out, f"digits_tiny_{h}", 0).path) for h in HEADS}
    assert _mlflow_runs(out / "mlruns.db") == expected
    assert not list((out / "runs").rglob("mlruns.db"))


def test_a_runs_folder_holding_what_reproduce_did_not_make_is_refused_before_any_run(digits_folder, tmp_path,
                                                                                    monkeypatch):
    """reproduce's OUT/runs/ is checked as compare's is (multirun.refuse_others_in): a user's own file there is
    refused in one line before a run starts, by `reproduce` and by `collect`, and left as it was."""
    recipes = rp.find_recipes(str(_write_recipes(tmp_path / "recipes", digits_folder.name) / "*_spinal.yaml"))
    out = tmp_path / "out"
    (out / "runs" / "digits_tiny_default" / "seed0").mkdir(parents=True)
    (out / "runs" / "digits_tiny_default" / "seed0" / "notes.txt").write_text("mine")
    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("a run started"))
    for command in (rp.reproduce, rp.collect):
        with pytest.raises(rp.UserError, match=r"seed0 is not one of this command's run folders.*give another --out"):
            command(recipes, digits_folder.parent, out, seeds=1, log=print)
    assert [p.name for p in out.rglob("*") if p.is_file()] == ["notes.txt"]
