"""`tune` on digits 5-9 from a digits 0-4 backbone, fine-tuned (the default mode) or as a frozen screen on cached
features: the documented search space, the untuned defaults as the first trial and the recipe never worse than
them on val, pruning through train.run's per-epoch hook, the test split evaluated once (chosen trial), a recipe
that `train --recipe` reproduces to the same val metric, a study that continues, and two processes on one SQLite
study and one feature cache."""
from __future__ import annotations

import csv
import html
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import optuna
import pytest
from conftest import cli_flags, signal_after

import spinal_transfer.training.train as train
from spinal_transfer.cli import main as cli
from spinal_transfer.cli.tune import CONTROLLED
from spinal_transfer.config import TrainConfig, resolve_config
from spinal_transfer.data.augment import Augmentation
from spinal_transfer.errors import ConfigError
from spinal_transfer.experiments import tune
from spinal_transfer.experiments.multirun import DEFAULT_MODE, MODE_NAMES, mode_fields
from spinal_transfer.runs.rundir import RunDir

FLAGS = dict(backbone="timm/test_resnet", img_size=16, batch_size=64, workers=0, augment="none", scheduler="none",
             epochs=3, log_interval=1000, device="cpu", deterministic="true")
README = Path(__file__).resolve().parents[2] / "README.md"


def _study(out: Path) -> optuna.Study:
    return optuna.load_study(study_name=tune.DEFAULT_STUDY, storage=tune.default_storage(out))


def _cache(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "feature-cache").glob("*.npy"))}


# --- the search space ----------------------------------------------------------------------------

def _when(kind: str) -> set[str]:
    """The parameters SPACE samples for a head kind, when --epochs is given."""
    return {p for p, _, when in tune.SPACE if when == "always" or when.startswith("with --epochs") or kind in when}


def test_search_space_is_the_documented_one():
    """Each head kind samples exactly its rows of SPACE, within the ranges it states; SPACE is in the README."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seen: dict[str, list[dict]] = {"linear": [], "mlp": [], "spinal": []}

    def objective(trial):
        fields = tune.suggest(trial, 9)
        assert set(trial.params) == _when(fields["head"])
        cfg = TrainConfig.from_dict(fields)               # every sample is a valid config
        seen[cfg.head].append(trial.params)
        return 0.0

    optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).optimize(objective, n_trials=150)
    assert all(len(v) > 20 for v in seen.values())
    every = [p for v in seen.values() for p in v]
    ranges = {"layer_width": (16, 1024), "num_layers": (2, 8), "num_splits": (2, 4), "mlp_width": (64, 2048),
              "mlp_layers": (1, 2), "head_dropout": (0.0, 0.5), "lr": (1e-4, 1e-1), "weight_decay": (1e-5, 1e-1),
              "label_smoothing": (0.0, 0.2), "epochs": (3, 9)}
    for name, (lo, hi) in ranges.items():
        values = [p[name] for p in every if name in p]
        assert values and lo <= min(values) and max(values) <= hi, name
        assert max(values) - min(values) > 0.5 * (hi - lo) or name in ("lr", "weight_decay"), name
    assert {p["head_preset"] for p in seen["spinal"]} == {"resnet", "vgg"}
    assert {p["shared_weights"] for p in seen["spinal"]} == {False, True}

    fixed = optuna.trial.FixedTrial({"head": "mlp", "mlp_width": 256, "mlp_layers": 2, "head_dropout": 0.1, "lr": 0.01,
                                     "weight_decay": 1e-4, "label_smoothing": 0.1, "epochs": 4})
    assert tune.suggest(fixed, 9) == {"head": "mlp", "mlp_hidden": [256, 256], "head_dropout": 0.1, "lr": 0.01,
                                      "weight_decay": 1e-4, "label_smoothing": 0.1, "epochs": 4}
    # the fields the search sets are SEARCHED (and epochs), which the command line takes no flag for
    searched = {f for v in seen.values() for p in v for f in tune.suggest(optuna.trial.FixedTrial(p), 9)}
    assert searched - {"epochs"} == set(tune.SEARCHED) and set(tune.SEARCHED) <= set(CONTROLLED)
    readme = README.read_text()
    for name, values, when in tune.SPACE:
        assert re.search(rf"\| {name} \| {re.escape(values)} \| {when} \|", readme), name


def test_a_pruned_trial_stops_early_and_is_never_tested(digits_transfer, tmp_path, one_thread):
    """Pruning goes through train.run's per-epoch hook: the trial stops after the epoch it was pruned at, with
    its val score reported, and its test split is never evaluated."""
    data, weights = digits_transfer

    class AlwaysPrune(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return True

    out = tmp_path / "t"
    base = resolve_config(None, {**FLAGS, "deterministic": True, "data": str(data), "weights": str(weights),
                                 **mode_fields("frozen", out)})
    study = optuna.create_study(direction="maximize", pruner=AlwaysPrune())
    study.enqueue_trial({"head": "linear", "lr": 0.05, "weight_decay": 1e-5, "label_smoothing": 0.0, "epochs": 3})
    study.optimize(tune.make_objective(base, out), n_trials=1)
    t = study.trials[0]
    run = RunDir(t.user_attrs["run"])
    assert t.state == optuna.trial.TrialState.PRUNED and list(t.intermediate_values) == [1]
    assert [r["epoch"] for r in run.read_metrics()] == [1]                       # stopped after epoch 1 of 3
    assert t.intermediate_values[1] == run.read_metrics()[0]["val"]["top1"]
    assert not run.report.exists() and not run.predictions.exists()             # test never evaluated


def test_tune_recipe_trains_as_its_trial_did(digits_transfer, tmp_path, one_thread):
    """best.yaml under a policy whose own crop scale changed since (randaugment: config.UNSET_BEFORE) carries the
    scale the trial trained with, so `train --recipe` runs the trial's configuration, not the old default's."""
    data, weights = digits_transfer
    flags = {**FLAGS, "augment": "randaugment", "epochs": 1}
    assert cli(["tune", *cli_flags(data=data, weights=weights, **flags), "--trials", "1", "--out",
                str(tmp_path / "tune")]) == 0
    assert cli(["train", "--recipe", str(tmp_path / "tune" / "best.yaml"), "--out", str(tmp_path / "again")]) == 0
    trained = [TrainConfig.from_yaml(p / "config.yaml").to_dict()
               for p in (tmp_path / "tune" / "trials" / "trial0000", tmp_path / "again")]
    assert {**trained[1], "out": ""} == {**trained[0], "out": ""}
    assert trained[1]["rrc_scale"] == list(Augmentation(policy="randaugment").crop_scale())


def test_tune_recipe_reproduces_the_best_trial(digits_transfer, tmp_path, monkeypatch, one_thread, capsys):
    """Default mode (fine-tune, as train). The untuned defaults come from a recipe whose lr (1e-5) is outside the
    space and learns little in 2 epochs; a trial known to learn is queued before them, so a tuned trial wins."""
    data, weights = digits_transfer
    out = tmp_path / "tune"
    (tmp_path / "slow.yaml").write_text("lr: 1.0e-5\nfreeze_epochs: 1\n")
    args = ["tune", *cli_flags(data=data, weights=weights, **{**FLAGS, "epochs": 2}), "--recipe",
            str(tmp_path / "slow.yaml"), "--trials", "4", "--sampler-seed", "0", "--out", str(out)]
    real_run = train.run
    calls: list[tuple[str, bool]] = []

    def recording(cfg=None, resume=None, overwrite=False, on_epoch=None):
        calls.append((Path(cfg.out if cfg else resume).name, resume is not None))
        return real_run(cfg, resume, overwrite, on_epoch)

    monkeypatch.setattr(train, "run", recording)
    out.mkdir()
    optuna.create_study(storage=tune.default_storage(out), study_name=tune.DEFAULT_STUDY,
                        direction="maximize").enqueue_trial(
        {"head": "linear", "lr": 0.05, "weight_decay": 1e-5, "label_smoothing": 0.0, "epochs": 2})
    assert DEFAULT_MODE == "finetune" and cli(args) == 0
    printed = capsys.readouterr()
    summary = json.loads(printed.out)
    study = _study(out)
    trials = study.trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    untuned = trials[1]                          # queued by tune after the test's trial
    assert untuned.user_attrs["untuned"]
    assert untuned.user_attrs["outside_space"] == ["lr 1e-05 (searched: 0.0001 .. 0.1)"]
    assert "lr" not in untuned.params and untuned.params["epochs"] == 2
    assert not any(t.user_attrs.get("untuned") for t in trials if t.number != untuned.number)
    best = trials[summary["best_trial"]]
    assert best.value == max(t.value for t in trials if t.state.name == "COMPLETE") > untuned.value
    assert best.value > 0.5 and summary["params"] == best.params                  # 5 classes
    assert summary["mode"] == MODE_NAMES["finetune"] == "fine-tune (as train)"
    assert summary["versus_untuned"] == (
        f"the tuned recipe beats the untuned defaults by +{best.value - untuned.value:.4f} val top-1 (trial "
        f"{best.number}: {best.value:.4f}; the defaults, trial 1: {untuned.value:.4f}); the defaults' lr 1e-05 "
        f"(searched: 0.0001 .. 0.1) lie outside the search space")
    assert summary["versus_untuned"] in printed.err and "mode: fine-tune (as train); chosen trial" in printed.err

    # Fine-tune, as train: every trial's run trains the backbone after the recipe's frozen first epoch; no cache.
    assert not (out / "feature-cache").exists()
    for t in trials:
        run = RunDir(t.user_attrs["run"])
        cfg = run.read_config()
        assert not cfg.freeze_backbone and not cfg.cache_features and cfg.freeze_epochs == 1
        frozen = [r["frozen"] for r in run.read_metrics()]
        assert frozen == [True, False][:len(frozen)]
    assert RunDir(untuned.user_attrs["run"]).read_config().lr == 1e-5           # the defaults, untouched

    # Selection on val; the test split evaluated once, for the chosen trial only (its stopped run resumed).
    assert calls == [(f"trial{n:04d}", False) for n in range(4)] + [(f"trial{best.number:04d}", True)]
    for t in trials:
        run = RunDir(t.user_attrs["run"])
        assert run.report.exists() == (t.number == best.number)
        assert run.checkpoints.exists() == (t.number == best.number)      # the others' checkpoints are dropped
    report = RunDir(best.user_attrs["run"]).read_report()
    assert report["val"]["top1"] == best.value == summary["val"]["top1"]   # the selection score, re-measured

    rows = (out / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("number,state,val_top1,best_epoch") and len(rows) == 5
    assert [r.split(",")[:2] for r in rows[1:]] == [[str(t.number), t.state.name] for t in trials]
    assert [r.split(",")[-3] for r in rows[1:]] == ["sampled", "untuned defaults", "sampled", "sampled"]
    page = (out / "tune.html").read_text()
    assert page.count('src="data:image/png;base64,') >= 2 and "optimization history" in page
    assert "<script" not in page and "<link" not in page and "best.yaml" in page
    assert "Mode: fine-tune (as train)." in page and html.escape(summary["versus_untuned"]) in page

    # The recipe, unchanged, through `train --recipe`: the same val metric (deterministic CPU), and the same test.
    text = (out / "best.yaml").read_text()
    assert text.startswith(f"# trial {best.number} (the best on val) of study 'spinal-transfer', mode fine-tune (as "
                           f"train): val top-1 {best.value:.4f}")
    recipe = TrainConfig.from_yaml(out / "best.yaml")
    assert recipe.out == "" and recipe.deterministic and recipe.head == best.params["head"]
    assert recipe.lr == best.params["lr"] and recipe.epochs == best.params["epochs"]
    assert not recipe.freeze_backbone and not recipe.cache_features
    calls.clear()
    assert cli(["train", "--recipe", str(out / "best.yaml"), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["val"]["top1"] == best.value and again["best_epoch"] == best.user_attrs["best_epoch"]
    assert again["test"]["top1"] == report["test"]["top1"]

    # Rerunning continues the study: nothing more for the same --trials, exactly one more trial for --trials 5.
    capsys.readouterr()
    calls.clear()
    assert cli(args) == 0 and [c for c in calls if not c[1]] == [] and len(_study(out).trials) == 4
    args[args.index("--trials") + 1] = "5"
    assert cli(args) == 0
    assert [c for c in calls if not c[1]] == [("trial0004", False)] and len(_study(out).trials) == 5
    assert sum(t.user_attrs.get("untuned", False) for t in _study(out).trials) == 1      # queued once


def test_frozen_screen_shares_one_cache_and_says_what_it_is(digits_transfer, tmp_path, one_thread, capsys):
    """--mode frozen: every trial on the same cached features (the backbone runs once), named as a screen in every
    output, and its recipe trains a frozen backbone as the trials did."""
    data, weights = digits_transfer
    out = tmp_path / "screen"
    assert cli(["tune", *cli_flags(data=data, weights=weights, **FLAGS), "--mode", "frozen", "--trials", "2",
                "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    name = MODE_NAMES["frozen"]
    assert summary["mode"] == name == "frozen-backbone screen (features cached; not what train does)"
    for t in _study(out).trials:
        cfg = RunDir(t.user_attrs["run"]).read_config()
        assert cfg.freeze_backbone and cfg.cache_features and cfg.cache_dir == str(out / "feature-cache")
    assert len(_cache(out)) == 3
    computing = sum(p.read_text().count("computing ") for p in (out / "trials").glob("*/train.log"))
    assert computing == 3                                                       # train/val/test, once for all
    assert f"mode {name}" in (out / "best.yaml").read_text().splitlines()[0]
    assert f"Mode: {html.escape(name)}." in (out / "tune.html").read_text()
    recipe = TrainConfig.from_yaml(out / "best.yaml")
    assert recipe.freeze_backbone and recipe.cache_features


# --- the untuned defaults ------------------------------------------------------------------------

def _open(tmp_path: Path, base: TrainConfig) -> optuna.Study:
    return tune.open_study(tune.default_storage(tmp_path), "s", optuna.samplers.RandomSampler(seed=0),
                           optuna.pruners.NopPruner(), {"mode": "finetune"}, tmp_path / ".lock",
                           tune.untuned_params(base))


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")   # study.ask(), not optimize
def test_a_new_study_starts_with_the_untuned_defaults(tmp_path):
    """Trial 0 trains the config as given (train's defaults here): its parameters that the space holds are
    recorded with their default values, the width and dropout left to train's rules are not; it is queued once."""
    base = resolve_config(None, {"data": str(tmp_path), "epochs": 6})
    study = _open(tmp_path, base)
    first = study.ask()
    assert first.user_attrs == {"untuned": True}
    assert tune.trial_fields(first, base) == {}                        # trains `base` itself
    names = ("head", "head_preset", "num_layers", "num_splits", "shared_weights", "lr", "weight_decay",
             "label_smoothing", "epochs")
    assert first.params == {n: getattr(base, n) for n in names} and base.layer_width is None is base.head_dropout
    assert "outside_space" not in study.trials[0].user_attrs
    assert tune.trial_fields(study.ask(), base) != {}                   # then sampled trials
    _open(tmp_path, base)                                               # continued: nothing queued again
    assert [t.state.name for t in study.get_trials()] == ["RUNNING", "RUNNING"]


def test_workers_asking_at_once_get_a_queued_trial_once(tmp_path):
    """Four workers (own storages, own connections) pop the one queued trial at the same instant, 12 times: one
    gets it. Without BEGIN IMMEDIATE (make_storage) about half the rounds gave it to two workers, which both
    trained it: CI's two tune processes both ran the untuned trial 0 and the second crashed on telling it."""
    import threading

    url = tune.default_storage(tmp_path)
    storages = [tune.make_storage(url) for _ in range(4)]
    twice = []
    for r in range(12):
        optuna.create_study(storage=storages[0], study_name=f"s{r}").enqueue_trial({"x": 1.0})
        studies = [optuna.load_study(study_name=f"s{r}", storage=s) for s in storages]
        got, start = [], threading.Barrier(len(studies))

        def pop(study: optuna.Study) -> None:
            start.wait()
            got.append(study._pop_waiting_trial_id())        # what study.ask() does first

        threads = [threading.Thread(target=pop, args=(s,)) for s in studies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if sum(g is not None for g in got) != 1:
            twice.append(r)
        assert [t.state.name for t in studies[0].get_trials()] == ["RUNNING"]
    assert twice == []


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")   # study.ask(), not optimize
def test_a_continued_study_samples_new_points(tmp_path):
    """Rerunning tune reopened the study with its sampler seeded as new: its first sampled trial repeated the
    first one of the earlier command (the same random start-up point, trained twice)."""
    base = resolve_config(None, {"data": str(tmp_path), "epochs": 6})

    def reopen() -> optuna.Study:
        return tune.open_study(tune.default_storage(tmp_path), "s", tune.make_sampler(0), optuna.pruners.NopPruner(),
                               {"mode": "finetune"}, tmp_path / ".lock", tune.untuned_params(base))
    study = reopen()
    tune.resume_sampling(study, 0)
    def sample(study: optuna.Study) -> dict:
        trial = study.ask()
        fields = tune.trial_fields(trial, base)          # the search space's suggestions, as a trial makes them
        study.tell(trial, 0.5)
        return fields
    assert sample(study) == {}                           # the untuned defaults
    first_sampled = sample(study)
    assert first_sampled and sample(reopen()) == first_sampled          # what a rerun drew before
    study = reopen()
    tune.resume_sampling(study, 0)
    assert sample(study) != first_sampled
    # a worker of another --sampler-seed joining this study draws what no new study of another seed draws
    # (seeded seed + trials so far, --sampler-seed 1 after 3 trials drew what --sampler-seed 4 draws first)
    joined = reopen()
    tune.resume_sampling(joined, 1)
    fresh = tune.open_study(tune.default_storage(tmp_path), "t", tune.make_sampler(1 + len(joined.trials)),
                            optuna.pruners.NopPruner(), {"mode": "finetune"}, tmp_path / ".lock",
                            tune.untuned_params(base))
    assert sample(fresh) == {}                           # its untuned defaults first, then its first draw
    assert sample(joined) != sample(fresh)


def test_a_worker_starts_no_trial_that_another_worker_is_already_running_toward_the_total(tmp_path):
    """--trials 3 with one trial ended and one running in another worker: this worker runs one, not two (counting
    only ended trials, parallel workers overshot --trials by the trials in flight)."""
    study = optuna.create_study(direction="maximize")
    study.tell(study.ask(), 0.5)
    elsewhere = study.ask()                                       # another worker's trial, still running
    ran = []
    tune.run_trials(study, lambda t: ran.append(t.number) or 0.6, 3, tmp_path)
    assert ran == [2] and tune.to_go(study, 3) == 0
    study.tell(elsewhere, 0.7)
    assert tune.counted(study) == 3


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")   # study.ask(), not optimize
def test_untuned_defaults_outside_the_space_are_named(tmp_path):
    base = resolve_config(None, {"data": str(tmp_path), "epochs": 3, "head": "mlp", "lr": 0.5,
                                 "weight_decay": 0.0, "mlp_hidden": [4096, 4096], "label_smoothing": 0.0})
    trial = _open(tmp_path, base).ask()
    assert tune.trial_fields(trial, base) == {}
    assert trial.params == {"head": "mlp", "mlp_layers": 2, "label_smoothing": 0.0, "epochs": 3}
    assert trial.user_attrs["outside_space"] == ["mlp_width 4096 (searched: 64 .. 2048)",
                                                  "lr 0.5 (searched: 0.0001 .. 0.1)",
                                                  "weight_decay 0.0 (searched: 1e-05 .. 0.1)"]


def _synthetic(values: list, untuned: Optional[int], state: str = "COMPLETE", **attrs) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for i, v in enumerate(values):
        st = getattr(optuna.trial.TrialState, state if i == untuned else "COMPLETE")
        study.add_trial(optuna.trial.create_trial(
            state=st, value=v if st.name == "COMPLETE" else None,
            user_attrs={"untuned": True, **attrs} if i == untuned else {}))
    return study


@pytest.mark.parametrize("values,untuned,state,attrs,chosen,sentence", [
    ([0.6, 0.7, 0.65], 0, "COMPLETE", {}, 1,
     "the tuned recipe beats the untuned defaults by +0.1000 val top-1 (trial 1: 0.7000; the defaults, trial 0: "
     "0.6000)"),
    ([0.7, 0.7, 0.5], 0, "COMPLETE", {}, 0,          # a tie: tuning bought nothing, the recipe is the defaults
     "no trial beat the untuned defaults (trial 0, val top-1 0.7000); the written recipe is the defaults"),
    ([0.5, 0.8, 0.6], 1, "COMPLETE", {"outside_space": ["lr 0.5 (searched: 0.0001 .. 0.1)"]}, 1,
     "no trial beat the untuned defaults (trial 1, val top-1 0.8000); the written recipe is the defaults; the "
     "defaults' lr 0.5 (searched: 0.0001 .. 0.1) lie outside the search space"),
    ([None, 0.8, 0.6], 0, "FAIL", {"error": "loss is nan"}, 1,
     "the untuned defaults (trial 0) failed (loss is nan), so the recipe, the best other trial, was not checked "
     "against them"),
    ([0.5, 0.8], None, "COMPLETE", {}, 1,
     "no trial of this study trained the untuned defaults (it began before tune ran them), so the recipe was not "
     "checked against them"),
])
def test_the_recipe_is_never_worse_than_the_untuned_defaults(values, untuned, state, attrs, chosen, sentence):
    study = _synthetic(values, untuned, state, **attrs)
    best = tune.chosen(study)
    assert best.number == chosen and tune.versus_untuned(study, best) == sentence
    # independently: the chosen value is the best, and never below a finished defaults trial
    finished = [v for v in values if v is not None]
    assert best.value == max(finished)


def test_a_trial_failed_without_an_error_says_its_worker_died():
    """QA 29: a trial whose worker was killed (Optuna fails it once its heartbeat is GRACE_S old) had an empty
    error column in trials.csv; one failed by its run keeps that run's error."""
    def row(study, i):
        return tune._trial_row(study.trials[i], tune.continued_later(study))

    died = _synthetic([None, 0.8], 0, "FAIL")
    assert row(died, 0)["error"] == f"no heartbeat for {tune.GRACE_S} s: its worker died (killed or lost)"
    assert row(died, 1)["error"] == ""
    nan = _synthetic([None, 0.8], 0, "FAIL", error="loss is nan")
    assert row(nan, 0)["error"] == "loss is nan"
    abandoned = _synthetic([None, 0.8], 0, "FAIL", **{tune.INTERRUPTED: True})     # re-queued, not a dead worker's
    assert (row(abandoned, 0)["state"], row(abandoned, 0)["error"]) == ("INTERRUPTED", "")


@pytest.mark.slow      # two processes: ~30 s
def test_two_tune_processes_share_one_study_and_one_cache(digits_transfer, tmp_path):
    data, weights = digits_transfer
    out = tmp_path / "tune"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmds = [[sys.executable, "-m", "spinal_transfer", "tune", *cli_flags(data=data, weights=weights, **FLAGS),
             "--mode", "frozen", "--trials", "4", "--sampler-seed", str(seed), "--out", str(out)] for seed in (1, 2)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in cmds]
    ran = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        ran.append({int(n) for n in re.findall(r"Trial (\d+) (?:finished|pruned)", err)})
    study = _study(out)
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers))) and 4 <= len(numbers) <= 5     # 5: both asked for the last at once
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    assert ran[0] and ran[1] and not ran[0] & ran[1] and ran[0] | ran[1] == set(numbers)   # each trial once
    runs = [t.user_attrs["run"] for t in study.trials]
    assert len(set(runs)) == len(runs)
    assert sorted(str(p) for p in (out / "trials").iterdir()) == sorted(runs)
    best = study.best_trial
    computing = 0
    for t in study.trials:
        run = RunDir(t.user_attrs["run"])
        log = run.log.read_text()
        assert log.count("run folder ") == 1 + (t.number == best.number), run   # the best: resumed to be tested
        assert run.report.exists() == (t.number == best.number)                 # test evaluated once, in all
        computing += log.count("computing ")
    assert computing == 3 and len(_cache(out)) == 3                             # the backbone ran once
    assert len((out / "trials.csv").read_text().splitlines()) == len(numbers) + 1
    with sqlite3.connect(out / "study.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# --- a signal, a second study --------------------------------------------------------------------

def test_a_signal_stops_a_trial_that_the_next_tune_continues(digits_transfer, tmp_path, monkeypatch, one_thread):
    """SIGTERM in the middle of trial 0 (the untuned defaults): not a failure of its parameters, not counted
    toward --trials, its last.pt kept, trials.csv written with it; the same tune again continues it in its own
    folder, then the study."""
    import signal

    from spinal_transfer.errors import Interrupted

    data, weights = digits_transfer
    out = tmp_path / "tune"
    base = resolve_config(None, {**FLAGS, "deterministic": True, "data": str(data), "weights": str(weights)})
    real_run, calls = train.run, []

    def signalled(cfg=None, resume=None, overwrite=False, on_epoch=None):
        calls.append((Path(cfg.out if cfg else resume).name, resume is not None))

        def hook(row: dict) -> None:
            if len(calls) == 1 and row["epoch"] == 1:
                os.kill(os.getpid(), signal.SIGTERM)      # train.run's own handler: stop after the step in flight
            on_epoch(row)
        return real_run(cfg, resume, overwrite, hook)

    monkeypatch.setattr(train, "run", signalled)
    with pytest.raises(Interrupted, match="the same tune command resumes it and goes on"):
        tune.tune(base, trials=2, mode="frozen", out=out, pruner="none", log=lambda _: None)
    first = RunDir(out / "trials" / "trial0000")
    assert first.state() == "interrupted" and tune.counted(_study(out)) == 0
    stopped = list(csv.DictReader(io.StringIO((out / "trials.csv").read_text())))   # written on the way out
    assert [(r["number"], r["state"], r["run"]) for r in stopped] == [("0", "INTERRUPTED", str(first.path)),
                                                                      ("1", "WAITING", "")]   # its continuation
    assert not (out / "best.yaml").exists() and not (out / "tune.html").exists()
    tune.tune(base, trials=2, mode="frozen", out=out, pruner="none", log=lambda _: None)
    study = _study(out)
    assert [(t.number, t.state.name, bool(t.user_attrs.get(tune.INTERRUPTED))) for t in study.trials] == \
        [(0, "FAIL", True), (1, "COMPLETE", False), (2, "COMPLETE", False)]
    assert study.trials[1].user_attrs["run"] == str(first.path) and study.trials[1].user_attrs.get(tune.UNTUNED)
    assert calls[:2] == [("trial0000", False), ("trial0000", True)]       # continued from its last.pt
    assert [r["epoch"] for r in first.read_metrics()] == [1, 2, 3]        # each epoch once
    assert tune.untuned_trial(study).number == 1
    assert "INTERRUPTED" in (out / "trials.csv").read_text().splitlines()[1]


def test_a_second_study_in_one_folder_is_refused(digits_transfer, tmp_path, one_thread, cli_run):
    """Trial folders are named by trial number: another study's trial 0 would train into this one's trial0000."""
    data, weights = digits_transfer
    out = tmp_path / "tune"
    flags = [*cli_flags(data=data, weights=weights, **{**FLAGS, "epochs": 1}), "--mode", "frozen", "--trials", "1",
             "--out", str(out)]
    assert cli(["tune", *flags]) == 0
    before = {p: p.read_bytes() for p in (out / "trials").rglob("*") if p.is_file()}
    res = cli_run("tune", *flags, "--study-name", "second")
    assert res.returncode == 2 and "holds the trials of study 'spinal-transfer'" in res.stderr, res.stderr[-2000:]
    assert {p: p.read_bytes() for p in (out / "trials").rglob("*") if p.is_file()} == before


def test_a_study_db_that_is_not_an_optuna_study_is_refused(three_digits, tmp_path, cli_run):
    """OUT/study.db holds the study tune continues: a user's file of that name (not SQLite, or SQLite without
    Optuna's tables) is refused in one line before any work and left as it was. An Optuna study there goes on,
    and so does one a tune starting beside this one is creating (empty, no tables yet), any study.db beside
    tune's own trials.csv, and any with --storage elsewhere (OUT's study.db is then not tune's)."""
    from conftest import tiny_cfg

    out = tmp_path / "out"
    out.mkdir()
    db = out / "study.db"
    flags = ["--data", three_digits, "--backbone", "timm/test_resnet", "--weights", "none", "--img-size", "16",
             "--workers", "0", "--epochs", "1", "--trials", "1", "--out", out]
    _sql(db, "CREATE TABLE photos (path TEXT)")
    for mine in (b"my notes\n", db.read_bytes()):
        db.write_bytes(mine)
        res = cli_run("tune", *flags)
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert res.returncode == 2 and "Traceback" not in res.stderr and len(errors) == 1, res.stderr[-2000:]
        assert f"{db} is not an Optuna study" in errors[0] and "give another --out" in errors[0]
        assert os.listdir(out) == ["study.db"] and db.read_bytes() == mine
    base = tiny_cfg(three_digits, tmp_path / "unused", img_size=16)
    with pytest.raises(ConfigError, match="is not an Optuna study"):
        tune.check_request(base, 1, tune.DEFAULT_STUDY, out)
    tune.check_request(base, 1, tune.DEFAULT_STUDY, out, storage=f"sqlite:///{tmp_path / 'elsewhere.db'}")
    (out / "trials.csv").write_text(",".join(tune.TRIAL_COLUMNS) + "\n")
    tune.check_request(base, 1, tune.DEFAULT_STUDY, out)
    (out / "trials.csv").unlink()
    db.write_bytes(b"")
    tune.check_request(base, 1, tune.DEFAULT_STUDY, out)
    _sql(db, "CREATE TABLE t (x)", "DROP TABLE t")
    assert db.read_bytes().startswith(b"SQLite format 3")
    tune.check_request(base, 1, tune.DEFAULT_STUDY, out)
    optuna.create_study(storage=tune.default_storage(out), study_name="another")
    tune.check_request(base, 1, tune.DEFAULT_STUDY, out)


def _sql(db: Path, *statements: str) -> None:
    con = sqlite3.connect(db)
    try:
        for statement in statements:
            con.execute(statement)
        con.commit()
    finally:
        con.close()


def _tune_cmd(data: Path, weights: Path, out: Path, trials: int) -> list[str]:
    return [sys.executable, "-m", "spinal_transfer", "tune", *cli_flags(data=data, weights=weights, **FLAGS),
            "--mode", "frozen", "--pruner", "none", "--trials", str(trials), "--out", str(out)]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_between_trials_stops_tune_resumably_and_the_rerun_finishes(digits_transfer, tmp_path, sig):
    """SIGTERM (or one Ctrl-C) as soon as trial 1 is logged finished, while Optuna starts trial 2: the old code
    had no handler there (exit 143, or Ctrl-C's 130 with a traceback and trial 2 FAILED and counted), and left
    trial 2 RUNNING for ever. Now: exit 75 with the usual line, trial 2 not counted, and the same command again
    finishes the study."""
    import signal

    from spinal_transfer.errors import EXIT_INTERRUPTED

    data, weights = digits_transfer
    out, env = tmp_path / "tune", {**os.environ, "OMP_NUM_THREADS": "1"}
    code, err = signal_after(_tune_cmd(data, weights, out, 3), "Trial 1 finished", getattr(signal, sig), env)
    assert code == EXIT_INTERRUPTED, err[-3000:]
    assert f"stopped: {sig} received" in err and "the same tune command resumes it" in err, err[-3000:]
    assert "Traceback" not in err
    study = _study(out)
    # the signal may land before Optuna creates trial 2 (none then) or after (it ends not counted)
    assert [t.state.name for t in study.trials][:2] == ["COMPLETE", "COMPLETE"] and not tune.in_flight(study)
    assert all(t.user_attrs.get(tune.INTERRUPTED) for t in study.trials[2:] if t.state.name == "FAIL")
    assert tune.counted(study) == 2
    again = subprocess.run(_tune_cmd(data, weights, out, 3), capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert tune.counted(_study(out)) == 3 and not tune.in_flight(_study(out))


@pytest.mark.slow      # two tune processes, one killed mid-trial: ~45 s
def test_a_trial_whose_worker_was_killed_runs_again_once_from_its_last_checkpoint(digits_transfer, tmp_path):
    """QA 29: a worker SIGKILLed after its trial's first heartbeat left a trial Optuna's heartbeat check fails; it
    counted toward --trials and was never run, so the study ended a trial short (here: without the untuned
    defaults). Now it is re-queued once with its parameters and role, continued from its folder's last.pt, and
    not counted; trials.csv says so."""
    data, weights = digits_transfer
    out, env = tmp_path / "tune", {**os.environ, "OMP_NUM_THREADS": "1"}
    fast = "import os, signal, sys, time; from spinal_transfer.experiments import tune; tune.HEARTBEAT_S = 1; " \
           "tune.GRACE_S = 2; "
    die = ("real = tune.train.run\n"
           "def run(*a, on_epoch, **k):\n"
           "    def at_epoch(row):\n"
           "        on_epoch(row)\n"
           "        if row['epoch'] == 2: time.sleep(1.5); os.kill(os.getpid(), signal.SIGKILL)\n"
           "    return real(*a, on_epoch=at_epoch, **k)\n"
           "tune.train.run = run\n")
    cli = "from spinal_transfer.cli import main; sys.exit(main(sys.argv[1:]))"
    killed = subprocess.run([sys.executable, "-c", fast + "\n" + die + cli, *_tune_cmd(data, weights, out, 2)[3:]],
                            capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (out / "trials" / "trial0000" / "checkpoints" / "last.pt").is_file()
    time.sleep(2.5)                                               # its heartbeat is stale now
    again = subprocess.run([sys.executable, "-c", fast + cli, *_tune_cmd(data, weights, out, 2)[3:]],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    study = _study(out)
    (dead, retry, other) = study.trials
    assert (dead.state.name, retry.state.name, other.state.name) == ("FAIL", "COMPLETE", "COMPLETE")
    assert retry.user_attrs[tune.RETRY_OF] == 0 and retry.user_attrs.get(tune.UNTUNED) and retry.params == dead.params
    assert retry.user_attrs["run"] == dead.user_attrs["run"] == str(out / "trials" / "trial0000")
    assert "resuming" in (out / "trials" / "trial0000" / "train.log").read_text()
    assert tune.counted(study) == 2 and tune.untuned_trial(study).number == 1
    rows = {r["number"]: r for r in csv.DictReader(io.StringIO((out / "trials.csv").read_text()))}
    assert rows["0"]["state"] == "INTERRUPTED" and rows["0"]["error"].endswith("; run again once")


def test_a_running_trial_with_no_heartbeat_is_abandoned_not_waited_for(digits_transfer, tmp_path):
    """A process killed between Optuna creating a trial and its first heartbeat leaves it RUNNING with no
    heartbeat row, which Optuna's stale check skips: the old code said '1 running in other workers' and waited
    for ever (the subprocess's timeout). Now the trial ends as abandoned, not counted, and this worker trains
    the study's last trial itself."""
    data, weights = digits_transfer
    out, env = tmp_path / "tune", {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(_tune_cmd(data, weights, out, 1), capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    _study(out).ask()                   # trial 1, RUNNING, as a process killed right then leaves it
    code = ("import sys; from spinal_transfer.experiments import tune; tune.ABANDONED_S = 0; "
            "from spinal_transfer.cli import main; sys.exit(main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", code, *_tune_cmd(data, weights, out, 2)[3:]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trial 1 is running in no worker" in done.stderr
    study = _study(out)
    assert [(t.state.name, bool(t.user_attrs.get(tune.INTERRUPTED))) for t in study.trials] == \
        [("COMPLETE", False), ("FAIL", True), ("COMPLETE", False)]
    assert tune.counted(study) == 2
