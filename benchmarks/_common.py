"""Shared helpers for the benchmarks: machine description, a folder of real JPEGs, interleaved timing.

Every benchmark reports RATIOS against a reference measured in the same process, in alternating
rounds (the order rotates every round), and takes the median over rounds of the per-round ratio,
so that load from other processes on the machine hits both sides alike.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def machine_info() -> str:
    import torch

    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        bf16 = False
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"cpu: {model}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"(capability {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 "
            f"{'yes' if bf16 else 'NO'}), {torch.get_num_threads()} intra-op threads, "
            f"python {platform.python_version()}, load average {load:.1f}")


def header(title: str, args) -> None:
    print(f"== {title} ==")
    print(machine_info())
    print("command: python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]))
    print(f"mode: {'quick' if getattr(args, 'quick', False) else 'full'}", flush=True)


# ------------------------------------------------------------------------------------------------
# Real-pixel data

def make_jpeg_folder(root: Path, n_photo: int = 300, n_digits: int = 100, seed: int = 0) -> Path:
    """ROOT/class_<k>/*.jpg: crops at random positions and sizes of scikit-learn's two bundled photos
    (china.jpg, flower.jpg, 427x640), rescaled, plus the 8x8 digits upscaled; real pixels, mixed
    sizes (about 32 to 900 px a side), JPEG quality 75-95. Deterministic for a seed."""
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    for k in range(10):
        (root / f"class_{k}").mkdir(parents=True, exist_ok=True)
    for k in range(n_photo):
        src = photos[k % len(photos)]
        H, W = src.shape[:2]
        h = int(rng.integers(64, H + 1))
        w = int(np.clip(h * rng.uniform(0.6, 1.6), 64, W))
        y0, x0 = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        s = rng.uniform(0.5, 1.5)
        im = Image.fromarray(src[y0:y0 + h, x0:x0 + w]).resize((max(32, int(w * s)), max(32, int(h * s))),
                                                                 Image.BICUBIC)
        im.save(root / f"class_{k % 10}" / f"photo_{k:04d}.jpg", quality=int(rng.integers(75, 96)))
    digits = load_digits()
    idx = rng.permutation(len(digits.target))[:n_digits]
    for i in idx:
        arr = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        side = int(rng.integers(48, 257))
        im = Image.fromarray(arr, mode="L").resize((side, side), Image.BICUBIC).convert("RGB")
        im.save(root / f"class_{digits.target[i]}" / f"digit_{i:04d}.jpg", quality=int(rng.integers(75, 96)))
    return root


def folder_samples(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) in torchvision ImageFolder's order and labelling, plus the class names."""
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root))
    return [(p, int(y)) for p, y in ds.samples], list(ds.classes)


def size_summary(samples) -> str:
    from PIL import Image

    sides = []
    for p, _ in samples:
        with Image.open(p) as im:
            sides.append(im.size)
    a = np.array(sides)
    return (f"{len(samples)} JPEGs, width {a[:, 0].min()}-{a[:, 0].max()} (median {int(np.median(a[:, 0]))}), "
            f"height {a[:, 1].min()}-{a[:, 1].max()} (median {int(np.median(a[:, 1]))})")


# ------------------------------------------------------------------------------------------------
# Interleaved measurement

class Rounds:
    """Run named measurements in alternating rounds; each returns (items, seconds).

    `run(rounds, budget_s)` does at least `min_rounds` rounds, then stops starting new ones once the
    next round would likely exceed `budget_s` (measured from the first round's start)."""

    def __init__(self, fns: dict[str, Callable[[], tuple[float, float]]], reference: str):
        self.fns, self.reference = fns, reference
        self.rates: dict[str, list[float]] = {k: [] for k in fns}

    def run(self, rounds: int, budget_s: Optional[float] = None, min_rounds: int = 2, verbose: bool = True,
            warmup: bool = False):
        """`warmup`: call every measurement once first, untimed (its time counts against the budget)."""
        names = list(self.fns)
        t_start = time.perf_counter()
        if warmup:
            for name in names:
                self.fns[name]()
            if verbose:
                print(f"  warm-up: {time.perf_counter() - t_start:.0f} s", flush=True)
        t_rounds = time.perf_counter()
        for r in range(rounds):
            t_round = time.perf_counter()
            order = names[r % len(names):] + names[:r % len(names)]          # rotate the order
            for name in order:
                items, secs = self.fns[name]()
                self.rates[name].append(items / secs)
            if verbose:
                print(f"  round {r + 1}: " + ", ".join(f"{n} {self.rates[n][-1]:.2f}/s" for n in names)
                      + f"  ({time.perf_counter() - t_round:.0f} s)", flush=True)
            elapsed = time.perf_counter() - t_start
            per_round = (time.perf_counter() - t_rounds) / (r + 1)
            if budget_s is not None and r + 1 >= min_rounds and elapsed + per_round > budget_s:
                break
        return self

    def ratio(self, name: str, reference: Optional[str] = None) -> tuple[float, float, float]:
        """Median, min and max over rounds of rate(name) / rate(reference) within the same round."""
        ref = self.rates[reference or self.reference]
        rs = [a / b for a, b in zip(self.rates[name], ref)]
        return statistics.median(rs), min(rs), max(rs)

    def median_rate(self, name: str) -> float:
        return statistics.median(self.rates[name])


def verdict(ratio: float, target: Optional[float]) -> str:
    if target is None:
        return ""
    return f"target >= {target:g}x: {'PASS' if ratio >= target else 'MISS'}"


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    """rows of (setting, measured, ratio, verdict)."""
    heads = ("setting", "measured", "ratio vs reference", "target")
    widths = [max(len(str(r[i])) for r in [heads, *rows]) for i in range(4)]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(heads))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    sys.stdout.flush()
