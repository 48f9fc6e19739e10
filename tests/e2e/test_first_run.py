"""The defaults on a real transfer task, and the README's first-screen commands exactly as written.

Transfer: a timm/resnet18 (train's default backbone) trained from random init on digits 0-4 stands in for
ImageNet weights; `train` with nothing but --data, --weights, --out and a CPU-sized --img-size fine-tunes it on
digits 5-9, classes it never saw. The README's own command runs against a Hugging Face cache the test lays out
(random resnet18 weights under timm's name for them), offline, as a user's machine would have it after the
one-time download.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_digits_folder

README = Path(__file__).resolve().parents[2] / "README.md"


def first_screen_commands() -> list[str]:
    """The `spinal-transfer ...` lines of the README's first code block (comments stripped)."""
    block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line.startswith("spinal-transfer ")]


@pytest.fixture(scope="module")
def digits_0_4_resnet18(tmp_path_factory) -> tuple[Path, Path]:
    """(digits 5-9 folder, a resnet18 checkpoint trained from scratch on digits 0-4)."""
    from spinal_transfer.config import TrainConfig
    from spinal_transfer.training.train import run

    root = tmp_path_factory.mktemp("transfer")
    low = write_digits_folder(root / "low", digits=(0, 1, 2, 3, 4), size=32)
    high = write_digits_folder(root / "high", digits=(5, 6, 7, 8, 9), size=32)
    run(TrainConfig(data=str(low), out=str(root / "pre"), weights="none", head="linear", img_size=32, epochs=8,
                    optimizer="sgd", lr=0.05, weight_decay=5e-4, freeze_epochs=0, warmup_epochs=0, workers=0,
                    device="cpu", log_interval=1000))
    return high, root / "pre" / "checkpoints" / "best.pt"


@pytest.mark.slow      # resnet18 pre-trained, then fine-tuned for 10 epochs: minutes on 2 CPU cores
def test_default_train_fine_tunes_digits_0_4_onto_5_9(digits_0_4_resnet18, tmp_path, cli_run):
    high, checkpoint = digits_0_4_resnet18
    out = tmp_path / "fine"
    r = cli_run("train", "--data", high, "--weights", checkpoint, "--out", out, "--img-size", 32, "--workers", 0)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["test"]["top1"] >= 0.95, report["test"]["top1"]
    cfg = (out / "config.yaml").read_text()     # the defaults the README documents, as the run recorded them
    for line in ("optimizer: adamw", "scheduler: cosine", "augment: light", "freeze_epochs: 1", "epochs: 10", "lr: 0.002"):
        assert line in cfg
    assert "epoch 1: backbone frozen" in (out / "train.log").read_text()


def _put_resnet18_in_hf_cache(home: Path) -> None:
    """Random resnet18 weights where timm looks for `resnet18`'s default pretrained tag (Hub repo
    timm/resnet18.a1_in1k), in huggingface_hub's cache layout."""
    import timm
    from safetensors.torch import save_file
    from conftest import put_in_hub_cache

    name = timm.models.get_pretrained_cfg("resnet18").hf_hub_id or "timm/resnet18.a1_in1k"
    files = home / "export"
    files.mkdir(parents=True)
    torch.manual_seed(0)
    save_file(timm.create_model("resnet18").state_dict(), str(files / "model.safetensors"))
    (files / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 1000}))
    put_in_hub_cache(home / "hub", name, files)


@pytest.mark.slow
def test_readme_first_screen_runs_as_written(tmp_path):
    """`pip install` done, the README's first-screen commands run as written (offline, from the HF cache)."""
    commands = first_screen_commands()
    assert [c.split()[1] for c in commands] == ["prepare", "train"], commands
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
           **{k: os.environ[k] for k in ("PYTHONPATH", "HOME") if k in os.environ}}
    _put_resnet18_in_hf_cache(tmp_path / "hf")
    for command in commands:
        argv = shlex.split(command)
        done = subprocess.run([sys.executable, "-m", "spinal_transfer", *argv[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (command, done.stderr[-2000:])
    run = tmp_path / next(a for a in zip(argv, argv[1:]) if a[0] == "--out")[1]
    report = json.loads((run / "report.json").read_text())
    assert report["num_images"]["test"] > 0 and (run / "report.html").is_file()
