"""Checkpoint files: written atomically with a content hash, read without executing code, verified on load;
the one saver that decides which weights are "best"; and the one way to rebuild a model from a checkpoint.

A checkpoint holds only tensors and plain Python values, so `torch.load(weights_only=True)` reads it;
anything that needs arbitrary unpickling is refused rather than trusted. Every checkpoint written here
carries a hash of its content, checked on load: a truncated, corrupted (flipped bits) or foreign file is
refused with one line that says what it is and what to do, and is never loaded into a model.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .errors import CheckpointError, ResourceError, UnsafeCheckpointError

PathLike = Union[str, Path]
FORMAT = "spinal-transfer checkpoint v1"      # the format key of our checkpoints
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")
TMP_SUFFIX = ".tmp"


# --- writing -------------------------------------------------------------------------------------

def _umask_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp makes them owner-only)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def system_error(e: OSError, path: Path, needed: Optional[int] = None) -> ResourceError:
    """An OSError from writing `path` in plain words."""
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        need = f" needs about {needed / 2**20:.0f} MB," if needed else ""
        return ResourceError(f"no space left on device: writing {path}{need} {free / 2**20:.0f} MB free there; "
                             f"free some space (or choose another --out) and resume")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what = "read-only file system" if e.errno == errno.EROFS else "permission denied"
        return ResourceError(f"{what}: cannot write {path}; choose a writable --out")
    return ResourceError(f"cannot write {path}: {e.strerror or e}")


def _write_atomically(path: Path, write: Any, needed: Optional[int] = None) -> None:
    """write(file object) into a temporary file beside `path`, fsync, rename over `path`: a kill at any moment
    leaves the old file or the new one, never a torn one. The temporary file is named `.<name>.<random>.tmp`,
    which `RunDir.remove_stray_temps` recognises after a kill -9."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if needed and shutil.disk_usage(path.parent).free < needed * 1.05:
        raise system_error(OSError(errno.ENOSPC, "No space left on device"), path, needed)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise system_error(e, path, needed) from None
    except RuntimeError as e:       # torch.save reports a failed write as "[enforce fail at inline_container.cc]"
        Path(tmp).unlink(missing_ok=True)
        if "inline_container" in str(e) or "unexpected pos" in str(e) or "file write failed" in str(e):
            raise system_error(OSError(errno.ENOSPC, "No space left on device"), path, needed) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    data = text.encode()
    _write_atomically(Path(path), lambda f: f.write(data), len(data))


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
    """torch.save `obj` with our format key and content hash, atomically (see _write_atomically).
    Refuses up front, in plain words, when the disk cannot hold it."""
    obj = {**obj, "format": FORMAT}
    obj["digest"] = digest(obj)
    _write_atomically(Path(path), lambda f: torch.save(obj, f), _nbytes(obj) + (1 << 20))


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


def safe_load(path: PathLike) -> Any:
    """torch.load with weights_only=True, every failure turned into one line that says what the file is."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): its write was interrupted or the disk was full; "
                              f"use another checkpoint (e.g. best.pt, or resume from an older one)")
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
                              f"another checkpoint (e.g. best.pt, or resume from an older one)")
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
                              f"{(str(e).splitlines() or [''])[0][:200]}); use another checkpoint") from None


def load_checkpoint(path: PathLike) -> dict:
    """One of our checkpoints, its content hash verified; a foreign or corrupted file is refused."""
    path = Path(path)
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a spinal-transfer checkpoint (no '{FORMAT}' format key); a run's "
                              f"checkpoints are RUN/checkpoints/*.pt, and a plain state dict goes to --weights")
    stored = ckpt.pop("digest", None)
    if stored != digest(ckpt):
        raise CheckpointError(f"{path} is corrupted: its content does not match the hash written with it "
                              f"(changed bits on disk or in transfer); use another checkpoint (best.pt, or resume "
                              f"from an older copy)")
    return ckpt


def load_state_dict_file(path: PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file (also our training checkpoints, or
    dicts that wrap the state dict under 'model'/'state_dict'); DDP/compile prefixes are stripped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    else:
        sd = safe_load(path)
        if isinstance(sd, dict) and sd.get("format") == FORMAT:
            sd = load_checkpoint(path)
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
    return out


# --- models from checkpoints ---------------------------------------------------------------------

def checkpoint_meta(config: dict, classes: list[str], data_config: Any, head_info: Any) -> dict:
    """What a checkpoint needs to rebuild its model and preprocessing without the run folder."""
    return {"config": dict(config), "classes": list(classes), "data_config": asdict(data_config),
            "head_info": head_info.to_dict() if hasattr(head_info, "to_dict") else dict(head_info)}


def load_run_checkpoint(path: PathLike) -> dict:
    """A run folder (its best.pt) or a checkpoint file -> the verified checkpoint."""
    from .rundir import RunDir

    p = Path(path)
    if p.is_dir():
        run = RunDir(p)
        if not run.best.is_file():
            raise CheckpointError(f"{p} has no {run.best.relative_to(p)}: it is not a run folder, or the run "
                                  f"has not finished an epoch yet")
        p = run.best
    ckpt = load_checkpoint(p)
    if "config" not in ckpt or "head_info" not in ckpt:
        raise CheckpointError(f"{p} holds no model description (config, head_info)")
    return ckpt


def model_from_checkpoint(ckpt: dict):
    """(model in eval mode, TrainConfig, DataConfig, classes): the architecture rebuilt offline (weights=None),
    then the checkpoint's weights loaded."""
    from .config import TrainConfig
    from .heads import head_options
    from .surgery import build_model
    from .transforms import DataConfig

    cfg = TrainConfig.from_dict(ckpt["config"])
    classes, info = ckpt["classes"], ckpt["head_info"]
    model = build_model(cfg.backbone, len(classes), head=cfg.head, weights=None, replace=info["replace"],
                        **head_options(cfg))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, cfg, DataConfig(**ckpt["data_config"]), classes


# --- the saver -----------------------------------------------------------------------------------

def state_dict_cpu(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


class CheckpointSaver:
    """The one place that decides which weights are "best", and that writes best.pt, stage_best.pt and last.pt.

    - Selection: an epoch is best when its score (top-1 on the selection split) beats every earlier epoch's;
      ties keep the earlier epoch. The score is that of the weights evaluation ran on, which `eval_module`
      chooses: the EMA weights when there is an EMA (they are what is evaluated, as in timm), else the raw ones.
      So best.pt holds exactly the weights whose score made them best.
    - stage_best.pt (multi-stage schedules) holds the raw weights of the stage's best epoch: the next stage
      starts from them, as in the paper's scripts (training continues from raw weights, not the EMA).
    - last.pt holds everything needed to continue: raw and EMA weights, optimizer, scheduler, scaler, RNG
      states, progress and this saver's own state.
    Only rank 0 calls the writing methods.
    """

    def __init__(self, run: Any, meta: dict, multi_stage: bool, state: Optional[dict] = None):
        self.run, self.meta, self.multi_stage = run, meta, multi_stage
        state = state or {}
        self.best = state.get("best", float("-inf"))
        self.best_epoch = state.get("best_epoch", 0)           # 1-based; 0 = none yet
        self.stage_best = state.get("stage_best", float("-inf"))

    @staticmethod
    def eval_module(model: torch.nn.Module, ema: Any) -> torch.nn.Module:
        """The weights that are evaluated, selected and saved as best."""
        return ema.module if ema is not None else model

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "stage_best": self.stage_best}

    def start_stage(self) -> None:
        self.stage_best = float("-inf")

    def update(self, epoch: int, score: float, model: torch.nn.Module, ema: Any) -> bool:
        """Record epoch `epoch` (1-based) with `score`; write best.pt / stage_best.pt when it beats them.
        Returns whether it is the best epoch so far. last.pt is written separately (`save_last`)."""
        if score > self.stage_best:
            self.stage_best = score
            if self.multi_stage:
                atomic_save({"model": state_dict_cpu(model), "epoch": epoch}, self.run.stage_best)
        if score <= self.best:
            return False
        self.best, self.best_epoch = score, epoch
        atomic_save({"model": state_dict_cpu(self.eval_module(model, ema)), "epoch": epoch, **self.meta},
                    self.run.best)
        return True

    def save_last(self, model: torch.nn.Module, ema: Any, train_state: dict) -> None:
        """last.pt: the weights, the EMA, this saver's state and `train_state` (optimizer, scheduler, scaler,
        rng, progress)."""
        atomic_save({"model": state_dict_cpu(model), "ema": None if ema is None else state_dict_cpu(ema.module),
                     "saver": self.state_dict(), **train_state, **self.meta}, self.run.last)

    def stage_start_weights(self) -> Optional[dict]:
        """The weights the next stage starts from (the finished stage's best), if saved."""
        return load_checkpoint(self.run.stage_best)["model"] if self.run.stage_best.is_file() else None


def serialized_size(obj: Any) -> int:
    """Bytes torch.save would write for `obj` (used to say how much space a checkpoint needs)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()
