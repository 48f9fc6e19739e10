"""The checkpoint file format: what is saved loads back equal; a changed bit, a foreign file or a file that
needs unpickling code is refused with one line, never loaded."""
from __future__ import annotations

import pytest
import torch

from spinal_transfer.errors import CheckpointError, UnsafeCheckpointError
from spinal_transfer.runs.checkpoint import FORMAT, atomic_save, digest, load_checkpoint, load_state_dict_file


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"model": {"module.w": torch.randn(4, 3, generator=g), "b": torch.zeros(4)}, "epoch": 3,
            "classes": ["cat", "dog"]}


def test_saved_checkpoint_loads_back_equal(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save(_state(), path)
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == FORMAT and ckpt["epoch"] == 3 and ckpt["classes"] == ["cat", "dog"]
    assert torch.equal(ckpt["model"]["module.w"], _state()["model"]["module.w"])
    assert set(load_state_dict_file(path)) == {"w", "b"}        # the DDP prefix stripped


def test_a_changed_value_is_refused_by_its_digest(tmp_path):
    path = tmp_path / "best.pt"
    atomic_save(_state(), path)
    raw = torch.load(path, weights_only=True)
    raw["model"]["b"][2] = 1e-30                                 # one value changed, the stored digest kept
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="is corrupted: its content does not match the hash"):
        load_checkpoint(path)


def test_digest_sees_dtype_shape_and_values():
    a = {"w": torch.zeros(2, 3)}
    assert digest(a) == digest({"w": torch.zeros(2, 3)})
    assert len({digest(a), digest({"w": torch.zeros(3, 2)}), digest({"w": torch.zeros(2, 3, dtype=torch.float64)}),
                digest({"w": torch.zeros(2, 3) + 1e-30})}) == 4


def test_foreign_and_unsafe_files_are_refused(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not a spinal-transfer checkpoint"):
        load_checkpoint(plain)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": {}, "fn": torch.nn.Linear(2, 2)}, unsafe)        # a pickled module: code to run
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_checkpoint(unsafe)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_checkpoint(noise)
