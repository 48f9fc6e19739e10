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


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """All ten digits, ROOT/{train,val,test}/digit_<k>/*.png (1797 images, 32x32)."""
    return write_digits_folder(tmp_path_factory.mktemp("digits"))
