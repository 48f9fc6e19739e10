"""The README's code blocks: every `spinal-transfer` command line parses with the real CLI (each flag exists and
takes the value written), and the Python blocks run (offline: random-init weights where the README shows where
weights come from, a bundle exported here from a finished run)."""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from spinal_transfer.errors import ConfigError

README = Path(__file__).resolve().parents[2] / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^ *```{lang}\n(.*?)^ *```", README.read_text(), re.S | re.M)


def command_lines() -> list[str]:
    """Every command of every bash block (and every `$ ` line of a text block), continuation lines joined,
    comments dropped."""
    out = [line[2:] for block in blocks("text") for line in block.splitlines() if line.startswith("$ ")]
    for block in blocks("bash"):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.split(r"\s+#", line.strip())[0] if not line.strip().startswith("#") else ""
            for part in re.split(r"\s*&&\s*", line):
                if part:
                    out.append(part)
    return out


def spinal_commands() -> list[list[str]]:
    cmds = []
    for line in command_lines():
        argv = shlex.split(line.replace("$d", "cifar10").replace("$(which spinal-transfer)", "spinal-transfer"))
        if argv[:1] == ["spinal-transfer"]:
            cmds.append(argv[1:])
        elif "spinal_transfer" in argv and argv[argv.index("spinal_transfer") - 1] == "-m":   # torchrun ... -m
            cmds.append(argv[argv.index("spinal_transfer") + 1:])
    return cmds


def test_readme_has_the_commands_it_should():
    names = {c[0] for c in spinal_commands()}
    assert {"prepare", "train", "show-batch", "lr-find", "evaluate", "compare", "tune", "export", "predict",
            "reproduce", "describe", "serve"} <= names, names


@pytest.mark.parametrize("argv", spinal_commands(), ids=lambda a: " ".join(a)[:80])
def test_every_readme_command_parses(argv, capsys):
    from spinal_transfer.cli import build_parser

    try:
        build_parser(only=argv[0]).parse_args(argv)
    except ConfigError as e:     # argparse: an unknown flag or a bad value
        pytest.fail(f"README command does not parse ({e}): spinal-transfer {' '.join(argv)}")


@pytest.fixture
def readme_world(finished_run, tmp_path, monkeypatch, cli_run):
    """A working folder with what the README's Python blocks name: runs/pets, bundles/pets."""
    shutil.copytree(finished_run, tmp_path / "runs" / "pets")
    assert cli_run("export", tmp_path / "runs" / "pets", "--out", tmp_path / "bundles" / "pets").returncode == 0
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_python_blocks_run(readme_world):
    python = [b for b in blocks("python") if "Predictor" not in b]     # Predictor: tests/e2e/test_readme_predictor.py
    assert len(python) >= 2
    for block in python:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
