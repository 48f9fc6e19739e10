"""Flags shared between commands come from the same TrainConfig fields, with the same checks and messages;
`prepare` and `report` are commands like the others (one error line, exit code 2)."""
from __future__ import annotations

import argparse
import json

import pytest

from spinal_transfer.cli import build_parser

SHARED = ("--batch-size", "--workers", "--device", "--tta", "--tta-crops", "--amp")
HAVE = {"evaluate": SHARED[:5], "predict": SHARED[:5], "reproduce": ("--batch-size", "--workers", "--device", "--amp"),
        "compare": SHARED, "tune": SHARED, "lr-find": SHARED, "show-batch": SHARED}


def _options(command: str) -> dict[str, argparse.Action]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {s: a for a in sub._actions for s in a.option_strings}


@pytest.mark.parametrize("command", sorted(HAVE))
def test_shared_flags_parse_as_trains_do(command):
    train, mine = _options("train"), _options(command)
    assert set(HAVE[command]) <= set(mine)
    for flag in HAVE[command]:
        a, b = mine[flag], train[flag]
        assert (a.dest, a.type, a.choices, a.nargs, a.const, a.default) == (b.dest, b.type, b.choices, b.nargs,
                                                                          b.const, b.default), flag


@pytest.mark.parametrize("argv", [["train", "--data", "x"], ["evaluate", "no_run"], ["predict", "no_model", "x.png"],
                                  ["reproduce", "--collect"]])
def test_a_shared_flag_out_of_range_is_the_same_one_line_error_everywhere(argv, cli_run):
    for flag, value, expected in (("--batch-size", "0", "error: --batch-size: 0 is out of range (expected an "
                                   "integer >= 1)"),
                                  ("--workers", "-1", "error: --workers: -1 is out of range (expected an "
                                   "integer >= 0)")):
        res = cli_run(*argv, flag, value)
        assert res.returncode == 2 and res.stderr.splitlines() == [expected], (argv, res.stderr)


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_tta_crops_needs_tta(command, cli_run):
    argv = [command, "no_run"] + (["x.png"] if command == "predict" else [])
    res = cli_run(*argv, "--tta-crops", "5")
    assert res.returncode == 2 and res.stderr.splitlines() == ["error: --tta-crops needs --tta"]


def test_prepare_failure_is_one_error_line_and_exit_code_2(tmp_path, cli_run):
    res = cli_run("prepare", "cifar10", "--root", tmp_path)
    assert res.returncode == 2
    assert res.stderr.startswith("error: cifar10: source not found") and "Traceback" not in res.stderr
    assert "cifar-10-python.tar.gz" in res.stderr and not (tmp_path / "cifar10").exists()


def test_prepare_split_seed_is_named_as_trains_and_seed_still_works(tmp_path, cli_run):
    parser = _options("prepare")["--split-seed"]
    assert "--seed" in parser.option_strings and parser.dest == "split_seed"
    for flag in ("--split-seed", "--seed"):
        root = tmp_path / flag.strip("-")
        assert cli_run("prepare", "digits", "--root", root, flag, "3").returncode == 0
        splits = json.loads((root / "digits" / "prepare.json").read_text())["splits"]
        assert {s["seed"] for s in splits.values() if "seed" in s} == {3}
    res = cli_run("prepare", "digits", "--root", tmp_path / "neg", "--split-seed", "-1")
    assert res.returncode == 2 and res.stderr.splitlines() == [
        "error: --split-seed: -1 is out of range (expected an integer >= 0)"]


def test_report_command_rewrites_a_runs_page(finished_run, tmp_path, cli_run):
    page = tmp_path / "page.html"
    res = cli_run("report", finished_run, "--out", page, "--split", "val")
    assert res.returncode == 0 and res.stdout.split() == [str(page)]
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "val split" in html


def test_a_switch_before_a_positional_leaves_it_the_positional():
    """`evaluate --tta runs/pets` refused the run folder as the switch's value ('expected true/false'); a switch
    takes the next word only when it is a true/false word, and parses to the same namespace as written after."""
    from spinal_transfer.cli import build_parser
    from spinal_transfer.config import attach_switch_values

    def parse(*argv: str) -> argparse.Namespace:
        return build_parser(only=argv[0]).parse_args(attach_switch_values(list(argv)))

    before, after = parse("evaluate", "--tta", "runs/pets"), parse("evaluate", "runs/pets", "--tta")
    assert vars(before) == vars(after) and before.tta is True and before.run == "runs/pets"
    assert parse("evaluate", "--tta", "false", "runs/pets").tta is False
    assert parse("evaluate", "--tta", "No", "runs/pets").tta is False
    assert parse("predict", "--tta", "model", "x.png").paths == ["x.png"]
    assert attach_switch_values(["evaluate", "--", "--tta", "x"]) == ["evaluate", "--", "--tta", "x"]
    assert attach_switch_values(["train", "--amp", "bf16"]) == ["train", "--amp", "bf16"]     # not a switch
