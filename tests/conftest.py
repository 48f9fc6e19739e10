"""Shared fixtures: real data (scikit-learn's bundled digits) written out as PNG image folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_digits_folder(root: Path, digits: tuple[int, ...] = tuple(range(10)), size: int = 32,
                        splits: tuple[str, ...] = ("train", "val", "test"), seed: int = 0) -> Path:
    """Write sklearn's 8x8 digits as `size`x`size` RGB PNGs in ROOT/{train,val,test}/<digit>/.

    Split is stratified 60/20/20 with a fixed seed; with `splits=()` the flat ROOT/<class>/ layout is written.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    keep = np.isin(ds.target, digits)
    images, labels = ds.images[keep], ds.target[keep]
    idx = np.arange(len(labels))
    parts: dict[str, np.ndarray]
    if splits:
        tr, rest = train_test_split(idx, test_size=0.4, stratify=labels, random_state=seed)
        va, te = train_test_split(rest, test_size=0.5, stratify=labels[rest], random_state=seed)
        parts = dict(zip(("train", "val", "test"), (tr, va, te)))
        parts = {k: v for k, v in parts.items() if k in splits}
    else:
        parts = {"": idx}
    for split, ids in parts.items():
        for i in ids:
            d = root / split / f"digit_{labels[i]}"
            d.mkdir(parents=True, exist_ok=True)
            arr = (images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(arr, mode="L").resize((size, size), Image.BILINEAR).convert("RGB")
            img.save(d / f"{i:04d}.png")
    return root


def truncated_jpeg(path: Path, seed: int = 0) -> Path:
    """A JPEG cut after its header and part of its scan data: the cheap header check passes, decoding fails."""
    from io import BytesIO

    rng = np.random.default_rng(seed)
    buf = BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


# A small backbone from random init: ~0.4M parameters, 32x32 inputs, CPU-friendly.
TINY = dict(backbone="timm/test_resnet", weights="none", head="spinal", layer_width=32, img_size=32,
            batch_size=32, workers=0, augment="none", optimizer="sgd", lr=0.05, scheduler="none",
            log_interval=1000)


def tiny_cfg(data: Path, out: Path, **kw):
    from spinal_transfer.config import TrainConfig

    return TrainConfig(**{**TINY, "data": str(data), "out": str(out), **kw})


def cli_flags(**options) -> list[str]:
    """--key value flags of TrainConfig options (None: the flag is left out)."""
    return [a for k, v in options.items() if v is not None for a in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """All ten digits, ROOT/{train,val,test}/digit_<k>/*.png (1797 images, 32x32)."""
    return write_digits_folder(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def digits_transfer(tmp_path_factory) -> tuple[Path, Path]:
    """(digits 5-9 folder at 16 px, a checkpoint trained on digits 0-4): a backbone whose frozen features
    carry over to classes it never saw, for comparing and searching heads on it (compare, tune)."""
    import torch

    from spinal_transfer.train import run

    root = tmp_path_factory.mktemp("transfer")
    low = write_digits_folder(root / "low", digits=(0, 1, 2, 3, 4), size=16)
    high = write_digits_folder(root / "high", digits=(5, 6, 7, 8, 9), size=16)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(tiny_cfg(low, root / "pre", epochs=3, scheduler="cosine", img_size=16, batch_size=64, device="cpu"))
    finally:
        torch.set_num_threads(n)
    return high, root / "pre" / "checkpoints" / "best.pt"
