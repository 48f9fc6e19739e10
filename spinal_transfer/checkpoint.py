"""Checkpoint files: written atomically, read without executing code.

A checkpoint holds only tensors and plain Python values, so `torch.load(weights_only=True)` reads
it; anything that needs arbitrary unpickling is refused rather than trusted.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Union

import torch

PathLike = Union[str, Path]
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")


class UnsafeCheckpointError(ValueError):
    """The file cannot be read without unpickling arbitrary objects (which could run code); we never do that."""


def _umask_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp makes them owner-only)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_save(obj: Any, path: PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A kill at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, path)


def safe_load(path: PathLike) -> Any:
    """torch.load with weights_only=True; a file that needs more is refused with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch cannot tell a junk file from a pickle of arbitrary objects: both are refused here
        detail = next((ln for ln in str(e).splitlines() if "Unsupported" in ln), str(e).splitlines()[0])
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it is not a plain checkpoint of tensors and plain values (either not a "
            f"torch file at all, or it holds Python objects whose unpickling could run arbitrary code). "
            f"Re-save it as a plain state_dict (torch.save(model.state_dict(), ...)) or as safetensors.\n"
            f"(detail: {detail.strip()})") from None
    except RuntimeError as e:
        if "zip" in str(e).lower() or "magic" in str(e).lower() or "EOF" in str(e):
            raise ValueError(f"{path} is not a readable torch checkpoint ({e})") from None
        raise


def load_state_dict_file(path: PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file (also our training checkpoints, or
    dicts that wrap the state dict under 'model'/'state_dict'); DDP/compile prefixes are stripped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path))
    else:
        sd = safe_load(path)
        for key in _WRAPPER_KEYS:
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of parameter names to tensors)")
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out
