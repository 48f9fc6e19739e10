"""What train adds around the loop: --lr auto, plots/batch.png, TTA in the final evaluation, the spinal width
rule written into the run, and flags that do not apply said once."""
from __future__ import annotations

import dataclasses
import json
import logging
import re

import numpy as np
import pytest
import yaml
from conftest import tiny_cfg
from PIL import Image

from spinal_transfer.config import resolve_config
from spinal_transfer.training import train


@pytest.fixture(scope="module")
def auto_run(three_digits, tmp_path_factory):
    """A run with --lr auto, --tta, light augmentation, the spinal width left to the rule."""
    out = tmp_path_factory.mktemp("auto") / "run"
    cfg = tiny_cfg(three_digits, out, lr="auto", tta=True, augment="light", layer_width=None, epochs=2,
                   limit_train_batches=4)
    return out, train.run(cfg)


def test_lr_auto_runs_the_range_test_and_trains_with_its_suggestion(auto_run):
    out, report = auto_run
    found = json.loads((out / "lr_find.json").read_text())
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert isinstance(cfg["lr"], float) and cfg["lr"] == pytest.approx(found["suggestion"])
    assert found["lrs"][0] <= cfg["lr"] <= found["lrs"][-1]
    assert report["lr_find"]["suggestion"] == found["suggestion"] and report["lr_find"]["rule"] == "valley"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] <= cfg["lr"] * (1 + 1e-9)            # the schedule starts from the found lr
    assert (out / "plots" / "lr_find.png").is_file()


def test_the_requeued_command_of_an_lr_auto_run_resumes_it(auto_run, three_digits, tmp_path):
    """QA 28: `train ... --lr auto --resume-if-exists` run again (a requeued job) was refused: "--lr auto (the run
    has 0.0027) would make the resumed run a different experiment". --lr auto on resume means the lr the run
    found (its lr_find.json); a run that did not find its lr still refuses it."""
    import shutil

    from spinal_transfer.errors import ConfigError

    out, _ = auto_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    found = yaml.safe_load((out / "config.yaml").read_text())["lr"]
    same = tiny_cfg(three_digits, copy, lr="auto", tta=True, augment="light", layer_width=None, epochs=3,
                    limit_train_batches=4)
    report = train.run(same, resume=copy)
    assert report["epochs_trained"] == 3 and len(report["resumes"]) == 1
    assert yaml.safe_load((copy / "config.yaml").read_text())["lr"] == found
    (copy / "lr_find.json").unlink()
    with pytest.raises(ConfigError, match="would make the resumed run a different experiment"):
        train.run(dataclasses.replace(same, epochs=4), resume=copy)


def test_a_signal_in_the_lr_auto_sweep_stops_it_at_the_next_step(three_digits, tmp_path, monkeypatch):
    """A sweep of 100 steps is minutes on a CPU, longer than a scheduler waits after its SIGTERM: the signal
    stopped nothing until the sweep had ended. Now the sweep stops at its next step (SIGTERM after step 3: 3 steps
    taken), with no checkpoint (nothing was trained) and no lr_find.json; the same command then starts over."""
    import os
    import signal

    from spinal_transfer.errors import Interrupted
    from spinal_transfer.training import lr_find

    real, taken = lr_find._step_lr, []

    def step(*args, **kw):
        taken.append(1)
        if len(taken) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kw)

    monkeypatch.setattr(lr_find, "_step_lr", step)
    out = tmp_path / "run"
    cfg = tiny_cfg(three_digits, out, lr="auto", epochs=1, limit_train_batches=2)
    with pytest.raises(Interrupted, match=r"^SIGTERM received: stopped in --lr auto's range test, before training "
                                          r"began; nothing to resume: the same command starts the run over$") as e:
        train.run(cfg)
    assert e.value.exit_code == 75 and len(taken) == 3
    assert not (out / "lr_find.json").exists() and not any((out / "checkpoints").glob("*.pt"))
    monkeypatch.setattr(lr_find, "_step_lr", real)
    report = train.run(cfg)                                     # the same command: a new run, its own sweep
    assert report["epochs_trained"] == 1 and (out / "lr_find.json").is_file()


def test_evaluate_of_a_tta_run_gives_report_jsons_metrics_by_default(auto_run, cli_run):
    """QA 28: `evaluate RUN` of a run trained with --tta printed the metrics without TTA while its help promises
    report.json's top-1 (a TTA one). Without --tta it now evaluates as the run was tested; --tta false without."""
    out, report = auto_run
    res = cli_run("evaluate", out)
    assert res.returncode == 0, res.stderr[-2000:]
    shown = json.loads(res.stdout)
    assert shown["with_tta"]["top1"] == pytest.approx(report["test"]["top1"], abs=1e-9)
    assert shown["without_tta"]["top1"] == pytest.approx(report["test_without_tta"]["top1"], abs=1e-9)
    assert "as the run was tested (--tta false: without)" in res.stderr
    plain = cli_run("evaluate", out, "--tta", "false")
    assert plain.returncode == 0 and json.loads(plain.stdout)["top1"] == pytest.approx(
        report["test_without_tta"]["top1"], abs=1e-9)


def test_a_tta_run_page_says_its_test_metrics_are_with_tta_beside_those_without(auto_run):
    """report.json's test metrics of a run trained with --tta are TTA ones: the page said nothing of it (its
    headline looked like a contradiction of evaluate without --tta)."""
    import re

    out, report = auto_run
    page = (out / "report.html").read_text()
    heading = re.search(r'<section id="metrics"><h2>(.*?)</h2>', page).group(1)
    assert heading == ("test metrics, with test-time augmentation (the mean softmax of 2 views of each image; "
                       "column &#x27;without TTA&#x27;: the same images without it)")
    table = page[page.index('<section id="metrics">'):page.index("</section>", page.index('<section id="metrics">'))]
    assert "<th class=\"n\">without TTA</th>" in table
    for metrics in (report["test_without_tta"], report["test"]):
        assert f"{100 * metrics['top1']:.2f}%" in table
    assert "grey band" not in page and "dotted line" not in page     # nothing frozen, one stage: not drawn, not said


def test_width_rule_is_written_into_the_run(auto_run):
    out, _ = auto_run
    from spinal_transfer.models.heads import default_layer_width

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    feature_width = json.loads((out / "report.json").read_text())["head"]["feature_width"]
    assert cfg["layer_width"] == default_layer_width(feature_width, 3) == 32


def test_final_evaluation_with_tta_keeps_the_plain_metrics(auto_run, cli_run):
    out, report = auto_run
    assert report["test"]["tta"]["views"] == 2 and "test_without_tta" in report
    r = cli_run("evaluate", out, "--device", "cpu", "--tta", "false")    # plain evaluation of the same weights
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["top1"] == pytest.approx(report["test_without_tta"]["top1"])


def test_batch_png_is_the_runs_first_batch(auto_run, tmp_path):
    out, _ = auto_run
    from spinal_transfer.config import TrainConfig
    from spinal_transfer.training.preview import show_batch

    cfg = TrainConfig.from_yaml(out / "config.yaml")
    again = show_batch(cfg, tmp_path / "again.png")
    assert np.array_equal(np.asarray(Image.open(out / "plots" / "batch.png")), np.asarray(Image.open(again.path)))


def test_flag_that_does_not_apply_is_said_once(caplog):
    with caplog.at_level(logging.WARNING, logger="spinal_transfer"):
        cfg = resolve_config(None, {"head": "linear", "layer_width": 64, "data": "x"})
    assert cfg.head == "linear"
    assert [r.getMessage() for r in caplog.records] == [
        "--layer-width has no effect here: it applies only with --head spinal"]


@pytest.mark.parametrize("weights, said", [("none", True), ("bundled", True), ("w.pt", False)])
def test_weights_partial_without_a_file_is_said(caplog, weights, said):
    with caplog.at_level(logging.WARNING, logger="spinal_transfer"):
        resolve_config(None, {"weights": weights, "weights_partial": True, "data": "x"})
    assert [r.getMessage() for r in caplog.records] == (
        [f"--weights-partial has no effect here: it applies only with --weights FILE (not {weights})"] if said else [])


def test_lr_auto_refuses_a_multi_stage_recipe():
    from spinal_transfer.errors import ConfigError

    base = resolve_config(None, {"stages": [{"epochs": 1, "lr": 0.1}, {"epochs": 1, "lr": 0.01}]})
    with pytest.raises(ConfigError, match="lr: auto"):
        resolve_config(base, {"lr": "auto"})


def test_without_epochs_a_small_folder_trains_until_min_steps_and_a_resume_keeps_that_length(three_digits,
                                                                                            tmp_path):
    """Epochs follow the data: max(min_epochs, ceil(min_steps / steps per epoch)), steps counted as the run takes
    them (here 1 batch an epoch); recorded in config.yaml, so a resume trains the same epochs. --epochs N: exactly
    N."""
    from spinal_transfer.config import TrainConfig

    def epochs_trained(out):
        return [json.loads(ln)["epoch"] for ln in (out / "metrics.jsonl").read_text().splitlines()
                if "epoch" in json.loads(ln)]

    cfg = tiny_cfg(three_digits, tmp_path / "run", epochs=None, min_epochs=10, min_steps=13, limit_train_batches=1)
    report = train.run(cfg)
    assert epochs_trained(tmp_path / "run") == list(range(1, 14))                   # ceil(13 / 1) > 10
    recorded = TrainConfig.from_dict(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()))
    assert (recorded.epochs, recorded.steps_per_epoch, recorded.total_epochs()) == (None, 1, 13)
    assert "13 epochs at lr" in (tmp_path / "run" / "report.html").read_text()
    assert train.run(resume=tmp_path / "run") == report                             # finished: nothing to add
    train.run(tiny_cfg(three_digits, tmp_path / "fixed", epochs=2, min_steps=13, limit_train_batches=1))
    assert epochs_trained(tmp_path / "fixed") == [1, 2]                             # --epochs is what it says
    big = TrainConfig(min_steps=300, steps_per_epoch=40)
    assert big.total_epochs() == TrainConfig().min_epochs == 20
    assert TrainConfig(min_steps=300, steps_per_epoch=7).total_epochs() == 43


def test_the_length_rule_trains_exactly_as_epochs_of_that_length(three_digits, tmp_path):
    """A run without --epochs trains as `--epochs N` with the N its rule gives: bench_defaults shares one record
    between settings that come to the same length (as_trained), e.g. --min-steps 600 and the defaults on digits100."""
    common = dict(limit_train_batches=2, seed=1, scheduler="cosine", warmup_epochs=1.0)    # the schedule spans the run
    ruled = train.run(tiny_cfg(three_digits, tmp_path / "ruled", epochs=None, min_epochs=3, min_steps=2, **common))
    fixed = train.run(tiny_cfg(three_digits, tmp_path / "fixed", epochs=3, **common))
    rows = {name: [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("ruled", "fixed")}
    assert len(rows["ruled"]) == len(rows["fixed"]) >= 3 and len({r["lr"] for r in rows["ruled"] if "lr" in r}) == 3
    for a, b in zip(rows["ruled"], rows["fixed"]):
        assert (a.get("epoch"), a.get("train_loss"), a.get("val")) == (b.get("epoch"), b.get("train_loss"), b.get("val"))
    assert ruled["test"] == fixed["test"]


def _saved_as_before(out, edit) -> dict:
    """Run folder `out` as an earlier version wrote it: `edit` (a function of a config mapping) applied to
    config.yaml and to both checkpoints' configs. Returns the config.yaml mapping."""
    from spinal_transfer.runs.checkpoint import atomic_save, load_checkpoint

    saved = yaml.safe_load((out / "config.yaml").read_text())
    edit(saved)
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(out / "checkpoints" / name)
        edit(ckpt["config"])
        atomic_save(ckpt, out / "checkpoints" / name)
    return saved


def _saved_without(out, option: str) -> dict:
    """Run folder `out` as a version before `option` existed wrote it: the key gone from all three configs."""
    return _saved_as_before(out, lambda d: d.pop(option))


def test_a_run_saved_before_min_epochs_existed_keeps_its_ten_epoch_floor(three_digits, tmp_path):
    """The floor of a run without --epochs was a fixed 10 before --min-epochs (now 20) existed (config.ADDED_SINCE):
    such a run, resumed, is finished at its 10 epochs instead of being stretched to 20."""
    from spinal_transfer.config import TrainConfig
    from spinal_transfer.runs.rundir import RunDir

    out = tmp_path / "run"
    report = train.run(tiny_cfg(three_digits, out, epochs=None, min_epochs=10, min_steps=3, limit_train_batches=1))
    saved = _saved_without(out, "min_epochs")
    assert RunDir(out).read_config().total_epochs() == 10
    assert TrainConfig.from_dict(saved).total_epochs() == 20                 # a new run gets the new floor
    assert train.run(resume=out) == report                                  # finished: nothing to add
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "epoch" in r] == list(range(1, 11))


def test_a_run_saved_before_select_metric_existed_resumes_selecting_by_top1(three_digits, tmp_path):
    """The default selection became val loss after runs were saved selecting by top-1 (config.ADDED_SINCE): such
    a run, extended with --resume, keeps choosing as it began; a new run or recipe gets the new default."""
    from spinal_transfer.cli import main as cli
    from spinal_transfer.config import TrainConfig
    from spinal_transfer.runs.rundir import RunDir

    out = tmp_path / "run"
    train.run(tiny_cfg(three_digits, out, epochs=2, limit_train_batches=1, select_metric="top1"))
    saved = _saved_without(out, "select_metric")
    assert RunDir(out).read_config().select_metric == "top1"
    assert TrainConfig.from_dict(saved).select_metric == "loss" == TrainConfig().select_metric
    assert cli(["train", "--resume", str(out), "--epochs", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert report["selected_by"] == "top1"
    assert report["best_epoch"] == max(rows, key=lambda r: r["val"]["top1"])["epoch"]


def test_a_run_records_its_crop_scale_and_one_saved_before_keeps_the_old_35_percent(three_digits, tmp_path):
    """randaugment's default crops went from 35-100% to timm's 8-100% (RESULTS.md, defaults): a run now writes the
    scale in force into config.yaml and its checkpoints, and a run saved with it unset (as every earlier
    randaugment run was) resumes with the 35-100% it trained with (config.UNSET_BEFORE), not today's default."""
    from spinal_transfer.cli import main as cli
    from spinal_transfer.config import TrainConfig
    from spinal_transfer.data.augment import DEFAULT_CROP_SCALE, Augmentation
    from spinal_transfer.runs.rundir import RunDir

    out = tmp_path / "run"
    train.run(tiny_cfg(three_digits, out, epochs=1, limit_train_batches=1, augment="randaugment"))
    assert yaml.safe_load((out / "config.yaml").read_text())["rrc_scale"] == list(DEFAULT_CROP_SCALE["randaugment"])
    assert RunDir(out).read_config().rrc_scale == [0.08, 1.0]

    saved = _saved_as_before(out, lambda d: d.update(rrc_scale=None))      # as a run before the change wrote it
    assert Augmentation.from_config(RunDir(out).read_config()).crop_scale() == (0.35, 1.0)
    assert cli(["train", "--resume", str(out), "--epochs", "2"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["rrc_scale"] == [0.35, 1.0]
    light = TrainConfig.from_dict({**saved, "augment": "light"}, saved=True)    # a policy whose default did not change
    assert light.rrc_scale is None and Augmentation.from_config(light).crop_scale() == DEFAULT_CROP_SCALE["light"]


@pytest.mark.parametrize("bad, says", [({"epochs": 0}, "epochs: 0 is out of range"),
                                       ({"head_dropout": -0.5}, "head_dropout: -0.5 is out of range"),
                                       ({"batch_size": -5}, "batch_size: -5 is out of range"),
                                       # an average of decay 1 stays at the first step's weights: training thrown away
                                       ({"ema_decay": 1.0}, "ema_decay: 1.0 is out of range (expected a number > 0 "
                                                            "and < 1)")])
def test_a_config_built_by_hand_is_checked_before_any_work(three_digits, tmp_path, bad, says):
    """TrainConfig(...) is not checked when made; train.run checks it as a loaded one, so epochs=0 no longer trains
    20 epochs and then fails reading its own config.yaml, leaving a folder it cannot resume."""
    from conftest import tiny_cfg

    from spinal_transfer.errors import ConfigError
    from spinal_transfer.training.train import run

    with pytest.raises(ConfigError, match=f"^{re.escape(says)}"):
        run(tiny_cfg(three_digits, tmp_path / "run", **bad))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"^train.run takes a TrainConfig, not a dict"):
        run({"data": str(three_digits)})


def test_a_config_without_data_names_the_option_as_the_caller_writes_it(tmp_path, cli_run):
    """From Python the missing folder is `data='DIR'` (it said `--data DIR`), from the CLI `--data DIR`: the words
    the caller types."""
    from spinal_transfer.config import TrainConfig
    from spinal_transfer.errors import DataError
    from spinal_transfer.training.train import run

    with pytest.raises(DataError, match=re.escape("no data folder given (data='DIR')")):
        run(TrainConfig(out=str(tmp_path / "run"), weights="none"))
    r = cli_run("train", "--out", str(tmp_path / "cli"), "--weights", "none")
    assert r.returncode == 2 and "--data DIR is required" in r.stderr and "Traceback" not in r.stderr


def test_bn_stats_is_recorded_as_the_run_trains_and_said_where_the_run_is_described(three_digits, tmp_path):
    """--bn-stats frozen with --weights none: the random backbone has no statistics to keep, they update, and
    config.yaml says 'update' (it said 'frozen', so a resume with --bn-stats update was refused as 'a different
    experiment'; QA 26). Where it is in force, the report page's and the model card's schedule say it."""
    from spinal_transfer.config import TrainConfig
    from spinal_transfer.evaluation.report_page import schedule_words

    train.run(tiny_cfg(three_digits, tmp_path / "run", epochs=1, bn_stats="frozen"))
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["bn_stats"] == "update"
    assert "bn_stats frozen -> update: with --weights none the backbone is random" in (
        tmp_path / "run" / "train.log").read_text()
    train.run(tiny_cfg(three_digits, tmp_path / "run", epochs=2, bn_stats="update"),     # the same run: accepted
              resume=tmp_path / "run")
    cfg = {**TrainConfig(weights="bundled", bn_stats="frozen").to_dict(), "epochs": 3}
    assert "backbone BatchNorm statistics kept as loaded" in schedule_words(cfg)
    assert "BatchNorm" not in schedule_words({**cfg, "bn_stats": "update"})
