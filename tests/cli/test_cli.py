"""The command line: every command's --help has examples, `models` lists, `describe` prints the right numbers."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from spinal_transfer.cli import COMMANDS, build_parser, main


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_command_has_help_with_examples():
    subs = _subparsers()
    assert set(subs) == set(COMMANDS)
    for name, parser in subs.items():
        text = parser.format_help()
        assert "examples:" in text and f"spinal-transfer {name}" in text.split("examples:")[1], name


@pytest.mark.parametrize("command", ["compare", "tune"])
def test_compare_and_tune_fine_tune_by_default_and_call_frozen_a_screen(command):
    parser = _subparsers()[command]
    required = ["--heads", "linear", "spinal"] if command == "compare" else []
    assert parser.parse_args(required).mode == "finetune"
    assert parser.parse_args([*required, "--mode", "frozen"]).mode == "frozen"
    text = " ".join(parser.format_help().split())
    assert "(default: finetune)" in text and "frozen: a fast screen, not what train does" in text
    assert "--mode frozen" in text.split("examples:")[1]


def test_help_runs_as_a_program():
    out = subprocess.run([sys.executable, "-m", "spinal_transfer", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--backbone" in out.stdout and "--resume" in out.stdout


def test_models_filter(capsys):
    assert main(["models", "--filter", "torchvision/resnet*"]) == 0
    names = capsys.readouterr().out.split()
    assert "torchvision/resnet18" in names and "torchvision/resnet50" in names
    assert all(n.startswith("torchvision/resnet") for n in names)
    assert main(["models", "--filter", "test_vit"]) == 0         # a plain word is a substring match
    assert "timm/test_vit" in capsys.readouterr().out.split()
    assert main(["models", "timm/"]) == 0                           # the form error messages suggest
    names = capsys.readouterr().out.split()
    assert "timm/resnet50" in names and all(n.startswith("timm/") for n in names)
    assert main(["models", "TIMM/Test_ResNet"]) == 0                # any case
    said = capsys.readouterr()
    assert said.out.split() == ["timm/test_resnet"] and said.err.strip() == "# 1 backbone"
    assert main(["models", "nope_zzz"]) == 0
    said = capsys.readouterr()
    assert said.out == "" and "none matches 'nope_zzz'" in said.err


def _describe(capsys, *argv: str) -> dict[str, str]:
    assert main(["describe", *argv]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        key, _, value = re.split(r"(\s{2,})", line.strip(), maxsplit=1)
        rows[key] = value
    return rows


def _int(s: str) -> int:
    return int(s.replace(",", ""))


def test_describe_vgg_numbers_follow_the_formulas(capsys):
    C, w, D = 225, 64, 25088
    rows = _describe(capsys, "torchvision/vgg11", "--num-classes", str(C), "--head", "spinal", "--head-preset", "vgg",
                     "--layer-width", str(w))
    assert _int(rows["feature width"]) == D
    default_macs = D * 4096 + 4096 * 4096 + 4096 * C                 # VGG's 25088-4096-4096-C classifier
    assert _int(rows["default head params"]) == default_macs + 4096 + 4096 + C
    assert _int(rows["default head MACs/sample"]) == default_macs
    h = D // 2                                                        # two halves; 4 layers; BN after each
    macs = h * w + 3 * (h + w) * w + 4 * w * C
    assert _int(rows["new head MACs/sample"]) == macs
    assert _int(rows["new head params"]) == macs + 4 * w + 4 * 2 * w + C
    assert rows["new head MACs vs default"] == f"{default_macs / macs:.2f}x fewer"


def test_describe_timm_measures_the_width_that_reaches_the_classifier(capsys):
    rows = _describe(capsys, "timm/test_resnet", "--num-classes", "7", "--head", "linear")
    import timm

    width = timm.create_model("test_resnet").num_features
    assert _int(rows["feature width"]) == width
    assert _int(rows["new head params"]) == (width + 1) * 7 == _int(rows["default head params"])
    assert rows["new head MACs vs default"] == "the same"
    assert rows["new linear head"] == f"in_features={width}, out_features=7, bias=True"
    rows = _describe(capsys, "timm/test_resnet", "--num-classes", "7", "--head", "mlp", "--mlp-hidden", "[512]")
    assert rows["new mlp head"] == f"in_features={width}, hidden=[512], num_classes=7, dropout=0.5, activation=relu"


def test_describe_says_how_much_larger_a_head_is_than_the_default(capsys):
    rows = _describe(capsys, "timm/test_resnet", "--num-classes", "4", "--head", "spinal", "--layer-width", "64")
    default, new = _int(rows["default head MACs/sample"]), _int(rows["new head MACs/sample"])
    assert new > default and rows["new head MACs vs default"] == f"{new / default:.2f}x more"


def test_describe_says_which_other_heads_run_at_inference(capsys):
    """DeiT-distilled averages its two heads at inference; GoogLeNet's auxiliary heads train only."""
    deit = _describe(capsys, "timm/deit_tiny_distilled_patch16_224", "--num-classes", "3")
    assert deit["other heads replaced"] == "head_dist (at inference too)"
    assert deit["note"] == ("2 heads run at inference and the model combines their outputs; the head params and MACs "
                            "above are of one of them")
    googlenet = _describe(capsys, "torchvision/googlenet", "--num-classes", "3")
    assert googlenet["other heads replaced"] == "aux1.fc2 (training only), aux2.fc2 (training only)"
    assert "note" not in googlenet


@pytest.mark.parametrize("argv,message", [
    (["describe", "torchvision/no_such_net", "--num-classes", "3"], "no classification model"),
    (["describe", "resnet18", "--num-classes", "3"], "'torchvision/<name>', 'timm/<name>' or 'timm/hf-hub:"),
    (["describe", "resnet18", "--num-classes", "3"], "(did you mean timm/resnet18 or torchvision/resnet18?)"),
    (["train", "--data", "/no/such/folder", "--backbone", "timm/test_resnet", "--weights", "none"], "no such data folder"),
    (["describe", "timm/no_such_net", "--num-classes", "3"], "spinal-transfer models timm/"),
    (["describe", "timm/test_resnett", "--num-classes", "3"], "did you mean timm/test_resnet"),
    (["train", "--data", "{file}", "--backbone", "timm/test_resnet", "--weights", "none"], "is a file; the data"),
    (["prepare", "digits", "--root", "{file}"], "is a file; give a folder"),
    (["show-batch", "--data", "{tmp}", "--out", "{tmp}"], "is a folder; give a .png file"),
    (["lr-find", "--data", "{tmp}", "--out", "{file}"], "is not a .png file this command wrote"),
    (["predict", "{tmp}/model.int8.onnx", "{file}", "--out", "{tmp}/p.csv"], "no such bundle, ONNX file, run folder"),
    (["tune", "--data", "{tmp}/nope", "--out", "{tmp}/tune"], "no such data folder"),
    (["tune", "--data", "{tmp}", "--out", "{tmp}/tune", "--backbone", "timm/test_resnet", "--weights", "none"],
     "no class folders"),
])
def test_bad_input_is_a_one_line_error_not_a_traceback(argv, message, capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    argv = [a.format(file=tmp_path / "notes.txt", tmp=tmp_path) for a in argv]
    if argv[0] == "train":
        argv = argv + ["--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err    # the one line, first
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_file_named_like_an_option_is_refused_not_read_as_one(tmp_path, monkeypatch, cli_run):
    """`predict RUN -odd.png` read the file as `-o dd.png` (--out dd.png) and the path was gone: a file named
    like an option is refused in one line saying how to pass it; after `--` (or as ./-odd.png) it is a path."""
    monkeypatch.chdir(tmp_path)
    Path("-odd.png").write_bytes(b"not read")
    for argv in (["predict", "runs/r", "-odd.png"], ["evaluate", "runs/r", "--out", "-odd.png"]):
        res = cli_run(*argv)
        assert res.returncode == 2 and res.stderr == ("error: -odd.png is a file here, but a word that starts with - "
                                                      "reads as an option: write ./-odd.png, or put -- before the "
                                                      "paths\n"), res.stderr
    res = cli_run("predict", "runs/r", "--", "-odd.png")                        # a path now: the run is missing
    assert res.returncode == 2 and "-odd.png is a file here" not in res.stderr and "runs/r" in res.stderr
    res = cli_run("predict", "runs/r", "x.png", "-zz")                          # no file of that name: argparse's
    assert res.returncode == 2 and "unrecognized arguments: -zz" in res.stderr


def test_models_output_into_a_closed_pipe_is_quiet():
    cmd = f"{sys.executable} -m spinal_transfer models | head -n 1"
    out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True)
    assert out.stdout.strip() and "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr


@pytest.mark.parametrize("argv,message", [
    (["serve", "{run}", "--port", "99999"], "a port is 0 to 65535"),
    (["export", "{run}", "--out", "{tmp}/b", "--atol", "nan"], "expected a finite number, got nan"),
    (["export", "{run}", "--out", "{tmp}/b", "--atol", "-1"], "expected a finite number >= 0"),
    (["export", "{run}", "--out", "{tmp}/b", "--quantize", "int8", "--max-accuracy-drop", "inf"],
     "expected a finite number"),
    (["export", "{run}", "--out", "{tmp}/b", "--quantize", "int8", "--max-accuracy-drop", "-1"],
     "expected a finite number >= 0, got -1"),
    (["compare", "--data", "{tmp}", "--heads", "linear", "spinal", "--seeds", "0"], "expected an integer >= 1"),
    (["tune", "--data", "{tmp}", "--trials", "0"], "expected an integer >= 1"),
    (["tune", "--data", "{tmp}", "--lr", "0.01"], "unrecognized arguments: --lr 0.01"),
    (["compare", "--data", "{tmp}", "--seeds", "abc"], "--seeds: expected an integer, got 'abc'"),   # not the
    (["lr-find", "--data", "{tmp}", "--num-steps", "abc"], "--num-steps: expected an integer, got 'abc'"),  # type
    (["serve", "{run}", "--port", "http"], "--port: expected an integer, got 'http'"),          # function's name
    (["export", "{run}", "--out", "{tmp}/b", "--atol", "x"], "--atol: expected a number, got 'x'"),
    (["predict", "{run}"], "the following arguments are required: PATH"),
])
def test_bad_numbers_are_refused_by_the_parser_in_one_line(argv, message, capsys, tmp_path):
    """argparse's refusals read like every other user mistake: one `error:` line naming the command's --help, exit
    2, not the command's whole usage (70 lines for compare) above the message."""
    assert main([a.format(run=tmp_path / "run", tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert f"`spinal-transfer {argv[0]} --help` lists the options" in err[0]


def test_a_device_this_torch_lacks_is_one_line():
    import torch

    from spinal_transfer.errors import ConfigError
    from spinal_transfer.utils.runtime import pick_device

    for name, says in (("mps", "has no MPS"), ("foo", "is not a device")):
        if name == "mps" and torch.backends.mps.is_available():
            continue
        with pytest.raises(ConfigError, match=says):
            pick_device(name)


def test_output_file_replaces_only_a_file_spinal_transfer_wrote(tmp_path):
    """By its mark (utils.stamp), not its name: a plot, a screenshot, a page, predict's CSV and a skip list of ours
    are replaced (True: said); a user's PNG, CSV, page or text file of the same kind is refused."""
    import numpy as np
    from PIL import Image

    from spinal_transfer.cli import output_file
    from spinal_transfer.data.skiplog import skip_lines
    from spinal_transfer.errors import ConfigError
    from spinal_transfer.evaluation.plots import _figure, save_figure
    from spinal_transfer.utils.stamp import html_generator, stamp_png

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "photo.png")
    ours = {"plot.png": save_figure(_figure(1, 1), tmp_path / "plot.png"),
            "shot.png": tmp_path / "shot.png", "page.html": tmp_path / "page.html", "p.csv": tmp_path / "p.csv",
            "p.csv.skipped.txt": tmp_path / "p.csv.skipped.txt"}
    ours["shot.png"].write_bytes(stamp_png((tmp_path / "photo.png").read_bytes()))
    ours["page.html"].write_text(f"<!DOCTYPE html><html><head>{html_generator()}</head></html>")
    ours["p.csv"].write_text("path,label_1,prob_1\na.png,cat,0.9\n")
    ours["p.csv.skipped.txt"].write_text(skip_lines([("b.png", "truncated")]))
    for p in ours.values():
        assert output_file(str(p), (p.suffix,)) is True, p
    assert np.array_equal(np.asarray(Image.open(ours["shot.png"])), np.asarray(Image.open(tmp_path / "photo.png")))
    (tmp_path / "labels.csv").write_text("id,label\n1,cat\n")
    (tmp_path / "mine.html").write_text("<html><head><title>mine</title></head></html>")
    (tmp_path / "notes.txt").write_text("a line without a tab\n")
    for name in ("photo.png", "labels.csv", "mine.html", "notes.txt"):
        with pytest.raises(ConfigError, match=f"{name} exists and is not a .{name.split('.')[-1]} file this command "
                                              f"wrote; it is not replaced"):
            output_file(str(tmp_path / name), ("." + name.split(".")[-1],))
    assert output_file(str(tmp_path / "new.png"), (".png",)) is False


def test_an_unwritable_out_folder_is_the_systems_refusal_exit_4(tmp_path, monkeypatch, capsys):
    """QA 29: `predict --out` on a read-only mount exited 2 (a user mistake) though the README's exit codes give 4
    to a read-only or unwritable folder, as export's write does. (Tests run as root, where permissions do not bind:
    the check's os.access answers as on a read-only mount.) A file standing where the folder should be stays 2."""
    import os

    import spinal_transfer.cli as cli_pkg
    from spinal_transfer.cli import main

    (tmp_path / "ro").mkdir()
    real = os.access
    monkeypatch.setattr(cli_pkg.os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro" else real(p, mode))
    assert main(["predict", str(tmp_path / "no-bundle"), str(tmp_path), "--out", str(tmp_path / "ro" / "p.csv")]) == 4
    assert "cannot write there" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["predict", str(tmp_path / "no-bundle"), str(tmp_path), "--out", str(tmp_path / "file" / "p.csv")]) == 2


def test_an_out_folder_is_the_commands_when_its_csv_is_there_from_a_version_before_the_marks(tmp_path):
    """refuse_others: a user's compare.md beside no table of ours is refused; the same unmarked compare.md beside
    compare.csv with compare's own header (what versions before the marks wrote) is an older comparison, and goes
    on, replaced; a CSV of another header does not make the folder ours."""
    from spinal_transfer.errors import ConfigError
    from spinal_transfer.experiments.compare import CSV_COLUMNS, RESULT_FILES
    from spinal_transfer.utils.stamp import md_generator, refuse_others

    (tmp_path / "compare.md").write_text("# my notes\n")
    with pytest.raises(ConfigError, match="compare.md is not a file spinal-transfer wrote"):
        refuse_others(tmp_path, RESULT_FILES, CSV_COLUMNS)
    (tmp_path / "compare.csv").write_text("head,mine\n")
    with pytest.raises(ConfigError, match="compare.csv is not a file spinal-transfer wrote"):
        refuse_others(tmp_path, RESULT_FILES, CSV_COLUMNS)
    (tmp_path / "compare.csv").write_text(",".join(CSV_COLUMNS) + "\n")
    refuse_others(tmp_path, RESULT_FILES, CSV_COLUMNS)
    (tmp_path / "compare.csv").unlink()
    (tmp_path / "compare.md").write_text("# table\n" + md_generator())
    refuse_others(tmp_path, RESULT_FILES, CSV_COLUMNS)


def test_describe_takes_the_image_size_train_would_use(capsys, cli_run):
    """A timm ViT is described as built for --img-size; a CNN keeps its own size and runs on the asked one; what
    train would refuse (AlexNet at 32 px) describe refuses in the same line."""
    assert _describe(capsys, "timm/test_vit", "--num-classes", "3", "--img-size", "64")["input size"] == "64"
    rows = _describe(capsys, "timm/test_resnet", "--num-classes", "3", "--img-size", "64")
    assert rows["input size"] == "160 (its own size; it runs on the asked 64 too)"
    res = cli_run("describe", "torchvision/alexnet", "--num-classes", "3", "--img-size", "32")
    assert res.returncode == 2 and "torchvision/alexnet does not run on 32 px images" in res.stderr
    assert "use --img-size 224 (its own size)" in res.stderr and "Traceback" not in res.stderr
