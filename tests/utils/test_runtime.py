"""The process a run lives in: RNG state saved through a checkpoint file resumes every random stream exactly;
device and precision choices refuse what the machine cannot do, in one line."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from spinal_transfer.errors import ConfigError
from spinal_transfer.runs.checkpoint import atomic_save, load_checkpoint
from spinal_transfer.utils.runtime import (
    amp_dtype, pick_device, rng_state, seed_everything, set_rng_state, torch_threads, use_channels_last,
)


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()


def test_rng_state_through_a_checkpoint_resumes_every_stream(tmp_path):
    seed_everything(7)
    _draws()
    np.random.randn()                            # leaves a cached Gaussian in numpy's state
    atomic_save({"rng": rng_state()}, tmp_path / "last.pt")
    expected = _draws()
    seed_everything(123)                         # anything else in between
    set_rng_state(load_checkpoint(tmp_path / "last.pt")["rng"])
    assert _draws() == expected


def test_device_and_precision_choices():
    assert pick_device("cpu") == torch.device("cpu")
    assert amp_dtype("none", torch.device("cpu")) is None and amp_dtype("auto", torch.device("cpu")) is None
    assert amp_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ConfigError, match="--amp fp16 needs CUDA"):
        amp_dtype("fp16", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            pick_device("cuda")
    assert use_channels_last(None, torch.device("cpu")) and not use_channels_last(None, torch.device("mps"))
    assert use_channels_last(False, torch.device("cpu")) is False


def test_torch_threads_are_restored():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_a_run_log_line_naming_a_file_that_is_not_utf8_is_written_as_its_bytes(tmp_path):
    """train.log's handler swallows write errors (a full disk is reported elsewhere), so a line naming a file whose
    name is not UTF-8 was silently dropped: it is written as the bytes the file system has, as every file does."""
    import os

    from spinal_transfer.utils.runtime import attach_log_file, log, setup_logging

    name = os.fsdecode(b"bad\xff\xfe.png")
    setup_logging()
    try:
        attach_log_file(tmp_path / "train.log")
        log.warning(f"skipped {name}")
        log.warning("the next line")
    finally:
        for h in list(log.handlers):
            log.removeHandler(h)
            h.close()
    assert (tmp_path / "train.log").read_bytes().splitlines()[0].endswith(b"skipped bad\xff\xfe.png")
    assert (tmp_path / "train.log").read_bytes().splitlines()[1].endswith(b"the next line")
