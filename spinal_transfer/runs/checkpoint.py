"""Checkpoint files: written atomically with a content hash, read without executing code, verified on load;
the one saver that decides which weights are "best"; and the one way to rebuild a model from a checkpoint.

A checkpoint holds only tensors and plain Python values, so `torch.load(weights_only=True)` reads it;
anything that needs arbitrary unpickling is refused rather than trusted. Every checkpoint written here
carries a hash of its content, checked on load: a truncated, corrupted (flipped bits) or foreign file is
refused with one line that says what it is and what to do, and is never loaded into a model.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import CheckpointError, UnsafeCheckpointError
from ..utils.atomic import PathLike, write_atomically

FORMAT = "spinal-transfer checkpoint v1"      # the format key of our checkpoints
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")


# --- writing -------------------------------------------------------------------------------------


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def digest(obj: Any) -> str:
    """A hash of a checkpoint's content: every tensor's dtype, shape and bytes and every plain value, in a
    fixed order. Computed before saving and again after loading; any changed bit changes it."""
    h = hashlib.blake2b(digest_size=20)

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=repr):
                feed(k)
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    feed(obj)
    return h.hexdigest()


def atomic_save(obj: dict, path: PathLike) -> None:
    """torch.save `obj` with our format key and content hash, atomically (see write_atomically).
    Refuses up front, in plain words, when the disk cannot hold it."""
    obj = {**obj, "format": FORMAT}
    obj["digest"] = digest(obj)
    write_atomically(Path(path), lambda f: torch.save(obj, f), _nbytes(obj) + (1 << 20))


# --- reading -------------------------------------------------------------------------------------

def _what_archive(path: Path) -> Optional[str]:
    """A program archive (TorchScript, torch.export) where a checkpoint was expected: what it is and what to do."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return (f"{path} is a TorchScript program (load it with torch.jit.load), not a checkpoint; pass the run "
                f"folder, a file from RUN/checkpoints/, or a bundle folder instead")
    if any(n.endswith("archive_format") or "serialized_exported_program" in n or n.endswith(".json") and
           "/models/" in n for n in names):
        return (f"{path} is a torch.export program (load it with torch.export.load), not a checkpoint; pass the "
                f"run folder, a file from RUN/checkpoints/, or a bundle folder instead")
    return None


# what to do about a damaged checkpoint; train --resume says what its run can do instead (train._load_last)
ANOTHER = "use another checkpoint (e.g. the run's best.pt)"


def safe_load(path: PathLike, advice: str = ANOTHER) -> Any:
    """torch.load with weights_only=True, every failure turned into one line that says what the file is (and, for
    a damaged one, `advice`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): its write was interrupted or the disk was full; "
                              f"{advice}")
    program = _what_archive(path)
    if program:
        raise CheckpointError(program)
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = head[:4] == b"PK\x03\x04"
    if not is_zip and head[:1] != b"\x80":
        raise CheckpointError(f"{path} is not a torch checkpoint (it is neither a torch zip archive nor a pickle; "
                              f"random or foreign bytes)")
    if is_zip and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is truncated or damaged ({size} bytes; its zip directory is missing): use "
                              f"{advice}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text or "GLOBAL" in text or "weights_only" in text.lower():
            detail = next((ln for ln in text.splitlines() if "Unsupported" in ln), text.splitlines()[0])
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it holds Python objects whose unpickling could run arbitrary code "
                f"({detail.strip()}); re-save it as a plain state_dict (torch.save(model.state_dict(), ...)) or "
                f"as safetensors") from None
        raise CheckpointError(f"{path} is damaged: {text.splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged or truncated ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:200]}); {advice}") from None


def load_checkpoint(path: PathLike, advice: str = ANOTHER) -> dict:
    """One of our checkpoints, its content hash verified; a foreign or corrupted file is refused (saying `advice`
    for a damaged one)."""
    path = Path(path)
    ckpt = safe_load(path, advice)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a spinal-transfer checkpoint (no '{FORMAT}' format key); a run's "
                              f"checkpoints are RUN/checkpoints/*.pt, and a plain state dict goes to --weights")
    stored = ckpt.pop("digest", None)
    if stored != digest(ckpt):
        raise CheckpointError(f"{path} is corrupted: its content does not match the hash written with it "
                              f"(changed bits on disk or in transfer); {advice}")
    return ckpt


def load_state_dict_file(path: PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file (also our training checkpoints, or
    dicts that wrap the state dict under 'model'/'state_dict'); DDP/compile prefixes are stripped."""
    return read_weights_file(path)[0]


def read_weights_file(path: PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, what the file records about it): a run checkpoint, and a bundle's model.safetensors through
    the config.json beside it, record their `backbone` and `classes` (so a caller can check the architecture
    and the head's meaning); a plain state dict records nothing ({})."""
    path = Path(path)
    recorded: dict = {}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
        recorded = _bundle_record(path)
    else:
        sd = safe_load(path)
        if isinstance(sd, dict) and sd.get("format") == FORMAT:
            sd = load_checkpoint(path)
            recorded = {"backbone": sd.get("config", {}).get("backbone"), "classes": sd.get("classes")}
        for key in _WRAPPER_KEYS:
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a state_dict (a mapping of parameter names to tensors)")
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out, recorded


def _bundle_record(weights: Path) -> dict:
    """backbone and classes from the config.json of the bundle that holds `weights` ({} when it is no bundle)."""
    config = weights.parent / "config.json"
    try:
        d = json.loads(config.read_text()) if config.is_file() else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(d, dict) or "backbone" not in d or "classes" not in d:
        return {}
    return {"backbone": d["backbone"], "classes": d["classes"]}


# --- models from checkpoints ---------------------------------------------------------------------

def checkpoint_meta(config: dict, classes: list[str], data_config: Any, head_info: Any,
                    split_fingerprints: Optional[dict] = None) -> dict:
    """What a checkpoint needs to rebuild its model and preprocessing without the run folder, and to check a
    split made again from its settings (`splits.fingerprints`)."""
    return {"config": dict(config), "classes": list(classes), "data_config": asdict(data_config),
            "head_info": head_info.to_dict() if hasattr(head_info, "to_dict") else dict(head_info),
            "split_fingerprints": dict(split_fingerprints or {})}


# --- the saver -----------------------------------------------------------------------------------

def state_dict_cpu(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def serialized_size(obj: Any) -> int:
    """Bytes torch.save would write for `obj` (used to say how much space a checkpoint needs)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()
