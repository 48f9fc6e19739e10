"""The process a run lives in: device, precision, memory format, seeds and RNG state, process-wide
settings and logging.

Process-wide settings (OpenCV's thread pool, the glibc allocator, matplotlib's backend) are applied by
`configure_process`, called by the entry points (`cli.main`, `train.run`, `predict.predict`), never as
a side effect of importing a module."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import platform
import random
import sys
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..errors import ConfigError, option_value
from .distributed import is_main, local_rank
from .textfiles import ENCODING, ERRORS

log = logging.getLogger("spinal_transfer")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{option_value('device', 'cuda')} was asked for but CUDA is not available; use "
                              f"{option_value('device', 'cpu')} or auto")
        return torch.device("cuda", local_rank())
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{option_value('device', 'mps')} was asked for but this PyTorch has no MPS (Apple GPU); "
                          f"use {option_value('device', 'cpu')} or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{option_value('device', name)} is not a device; use auto, cpu, cuda or mps") from None


def configure_process(device: Optional[torch.device] = None) -> None:
    """Process-wide settings every entry point wants, applied explicitly (idempotent):
    OpenCV's own thread pool off (DataLoader workers are already one process per core, and cv2's
    threads would oversubscribe them), matplotlib drawing to files (no display is needed or
    assumed), and on the CPU the allocator setting below."""
    import cv2

    cv2.setNumThreads(0)
    if "matplotlib" in sys.modules or device is not None:
        import matplotlib

        matplotlib.use("Agg")
    if device is not None:
        tune_cpu_allocator(device)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3      # mallopt parameters (glibc malloc.h)


def tune_cpu_allocator(device: torch.device) -> bool:
    """On the CPU, keep freed memory mapped for reuse in this process (glibc only; True when applied).

    By default glibc hands large blocks back to the kernel as soon as they are freed, so every
    training step on the CPU page-faults its activations back in (~50,000 faults a step for a
    ResNet-18 at 128 px, batch 32) and spends ~15-20% of the step doing so. A higher mmap threshold
    and no trimming keep them for the next step, as a caching allocator would (jemalloc/tcmalloc do
    the same): the resident size stays at the peak, which a training process reaches anyway."""
    if device.type != "cpu" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
    except (OSError, AttributeError):
        return False


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """auto: bf16 on CUDA (no loss scaling needed), off elsewhere; bf16/fp16 on request."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs CUDA; use --amp bf16 on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def use_channels_last(flag: Optional[bool], device: torch.device) -> bool:
    """None means on for CUDA and CPU: on the CPU, NHWC made fp32 training steps of CNNs 1.1-1.7x
    faster (ResNet, DenseNet, EfficientNet, MobileNet, RegNet, VGG) and changed nothing for ViT and
    ConvNeXt (benchmarks/bench_channels_last.py); other devices (MPS) keep NCHW."""
    return flag if flag is not None else device.type in ("cuda", "cpu")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict:
    """Every RNG the loop consumes, as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x


class _Pending(logging.Handler):
    """Holds the records logged before a run's train.log may be written (the run folder is not touched until
    its data and model are checked); `attach_log_file` writes them there first."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _RunLogFile(logging.FileHandler):
    """train.log; a failed write (full disk) must not print a logging traceback: the checkpoint writer reports
    the real problem in one line."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


_FORMAT = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")


def setup_logging() -> logging.Logger:
    """Messages to the console on rank 0 (other ranks only warn), kept until `attach_log_file`."""
    log.handlers.clear()
    log.setLevel(logging.INFO if is_main() else logging.WARNING)
    log.propagate = False
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(_FORMAT)
    h.addFilter(lambda r: not getattr(r, "file_only", False))     # e.g. the final error: cli.main prints it
    log.addHandler(h)
    log.addHandler(_Pending())
    return log


def attach_log_file(log_file: Path) -> None:
    """From now on also into `log_file` (a run's train.log, rank 0), starting with what was logged before."""
    pending = [h for h in log.handlers if isinstance(h, _Pending)]
    for h in pending:
        log.removeHandler(h)
    if not is_main():
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fh = _RunLogFile(log_file, encoding=ENCODING, errors=ERRORS)    # a line naming a non-UTF-8 file is not dropped
    fh.setFormatter(_FORMAT)
    for h in pending:
        for record in h.records:
            fh.handle(record)
    log.addHandler(fh)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block, then restored. Small inputs gain nothing from more
    threads, and on shared, busy cores a multi-threaded op mostly waits for its descheduled other thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
