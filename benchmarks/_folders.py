"""Small real image folders for the real-weights benchmarks, built only from images installed packages ship.

    build(ROOT, "digits15" | "fewshot12" | "digits100" | "textures8")  -> ROOT/<name>/{train,val,test}/<class>/*.png

Sources (inside wheels, no download): scikit-image `skimage.data` (astronaut, chelsea, coffee, rocket,
stereo_motorcycle, camera, hubble_deep_field, immunohistochemistry, retina, brick, grass, gravel, moon, cell),
scikit-learn (`load_digits`, `load_sample_images`: china, flower), matplotlib's grace_hopper.jpg.

- digits15   few-shot: scikit-learn digits 0-9 as digits100 below, but 15 train / 10 val / 40 test a class
             (150/100/400): every image a different handwritten digit, as in a user's few-shot folder.
- fewshot12  12 photographs, one class each; 16 train / 8 val / 20 test crops per class (192/96/240), 128 px RGB:
             few images a class, but all of them crops of the same photograph.
- digits100  scikit-learn digits 0-9 (8x8, 17 grey levels) upscaled bilinear to 32 px RGB; per class
             100 train / 30 val / 40 test (1000/300/400), seeded.
- textures8  8 grey-level textures (colour removed, so colour is no cue), 40 train / 15 val / 50 test crops per
             class (320/120/400), 96 px; small patches (10-20% of a tile's side, upscaled): with the earlier 40-80%
             every setting and the linear probe scored 0.98-1.00 on its 200 test images, so the folder could not
             tell settings apart (a single test image decided which was "best"); now the probe scores 0.94.

Crops: each source is cut into a GRID x GRID grid of tiles dealt to train/val/test at random (seeded); every crop
lies inside one tile of its split, so val and test show parts of the picture training never saw (crops of
different splits never share a pixel). A crop is a square of side uniform(lo, hi) x the tile's shorter side,
resized to SIZE (Pillow LANCZOS down, BICUBIC up: deterministic).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CropSpec:
    size: int                 # output side, px
    grid: int                 # GRID x GRID tiles per source image
    tiles: tuple              # tiles per split (train, val, test); sums to grid**2
    crops: tuple              # crops per class and split (train, val, test)
    side: tuple               # crop side as a fraction of the tile's shorter side (lo, hi)
    grey: bool                # convert every source to grey first
    seed: int


FEWSHOT12 = CropSpec(size=128, grid=3, tiles=(5, 2, 2), crops=(16, 8, 20), side=(0.6, 1.0), grey=False, seed=12)
TEXTURES8 = CropSpec(size=96, grid=4, tiles=(10, 3, 3), crops=(40, 15, 50), side=(0.1, 0.2), grey=True, seed=8)
DIGITS100 = {"size": 32, "per_class": (100, 30, 40), "seed": 100}
DIGITS15 = {"size": 32, "per_class": (15, 10, 40), "seed": 15}


def _rgb(a: np.ndarray) -> np.ndarray:
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def _grey(a: np.ndarray) -> np.ndarray:
    a = _rgb(a)
    return np.asarray(Image.fromarray(a).convert("L"))


def photo_sources() -> dict[str, np.ndarray]:
    import skimage.data as skd
    from matplotlib import cbook
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    sample = dict(zip((Path(f).stem for f in sample.filenames), sample.images))
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    retina = skd.retina()
    return {"astronaut": skd.astronaut(), "cat": skd.chelsea(), "coffee": skd.coffee(), "rocket": skd.rocket(),
            "motorcycle": skd.stereo_motorcycle()[0], "temple": sample["china"], "flower": sample["flower"],
            "hopper": hopper, "galaxies": skd.hubble_deep_field(), "tissue": skd.immunohistochemistry(),
            "retina": retina[255:1155, 255:1155], "cameraman": skd.camera()}


def texture_sources() -> dict[str, np.ndarray]:
    import skimage.data as skd

    return {"brick": skd.brick(), "grass": skd.grass(), "gravel": skd.gravel(), "moon": skd.moon(),
            "cells": skd.cell(), "galaxies": skd.hubble_deep_field(), "tissue": skd.immunohistochemistry(),
            "retina": skd.retina()[255:1155, 255:1155]}


def _resize(crop: np.ndarray, size: int) -> np.ndarray:
    im = Image.fromarray(crop)
    method = Image.LANCZOS if min(crop.shape[:2]) >= size else Image.BICUBIC
    return np.asarray(im.resize((size, size), method))


def crops(image: np.ndarray, spec: CropSpec, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    img = _grey(image) if spec.grey else _rgb(image)
    h, w = img.shape[:2]
    ys = np.linspace(0, h, spec.grid + 1).astype(int)
    xs = np.linspace(0, w, spec.grid + 1).astype(int)
    tiles = [(ys[i], ys[i + 1], xs[j], xs[j + 1]) for i in range(spec.grid) for j in range(spec.grid)]
    order = rng.permutation(len(tiles))
    out, start = {}, 0
    for split, k, n in zip(SPLITS, spec.tiles, spec.crops):
        mine = [tiles[t] for t in order[start:start + k]]
        start += k
        res = []
        for _ in range(n):
            y0, y1, x0, x1 = mine[int(rng.integers(len(mine)))]
            side = max(8, round(min(y1 - y0, x1 - x0) * rng.uniform(*spec.side)))
            top, left = int(rng.integers(y0, y1 - side + 1)), int(rng.integers(x0, x1 - side + 1))
            c = _resize(img[top:top + side, left:left + side], spec.size)
            res.append(_rgb(c))
        out[split] = res
    return out


def crop_folder(sources: dict[str, np.ndarray], spec: CropSpec) -> dict[str, dict[str, list[np.ndarray]]]:
    rng = np.random.default_rng(spec.seed)
    out: dict = {s: {} for s in SPLITS}
    for label, image in sources.items():          # fixed class order -> same folder everywhere
        for split, cs in crops(image, spec, rng).items():
            out[split][label] = cs
    return out


def digits_folder(size: int = 32, per_class=(100, 30, 40), seed: int = 100) -> dict:
    from sklearn.datasets import load_digits

    ds = load_digits()
    grey = (ds.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    rng = np.random.default_rng(seed)
    out: dict = {s: {} for s in SPLITS}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(ds.target == c))
        start = 0
        for split, n in zip(SPLITS, per_class):
            take = idx[start:start + n]
            start += n
            out[split][str(c)] = [np.asarray(Image.fromarray(grey[i]).resize((size, size), Image.BILINEAR)
                                             .convert("RGB")) for i in sorted(take)]
    return out


def build_arrays(name: str) -> tuple[dict, dict]:
    if name == "fewshot12":
        return crop_folder(photo_sources(), FEWSHOT12), asdict(FEWSHOT12)
    if name == "textures8":
        return crop_folder(texture_sources(), TEXTURES8), asdict(TEXTURES8)
    if name == "digits100":
        return digits_folder(**DIGITS100), dict(DIGITS100)
    if name == "digits15":
        return digits_folder(**DIGITS15), dict(DIGITS15)
    raise ValueError(f"unknown folder {name!r}")


def build(root, name: str) -> Path:
    """Write ROOT/<name>/{train,val,test}/<class>/<class>_NNN.png (+ folders.json); skips when complete."""
    out = Path(root) / name
    arrays, settings = build_arrays(name)
    counts = {s: sum(len(v) for v in arrays[s].values()) for s in SPLITS}
    manifest = {"folder": name, "settings": settings, "counts": counts,
                "classes": list(arrays["train"])}
    mpath = out / "folders.json"
    if mpath.is_file() and json.loads(mpath.read_text()) == json.loads(json.dumps(manifest)):
        return out
    for split in SPLITS:
        for label, imgs in arrays[split].items():
            d = out / split / label
            d.mkdir(parents=True, exist_ok=True)
            for i, a in enumerate(imgs):
                Image.fromarray(a).save(d / f"{label}_{i:03d}.png")
    mpath.write_text(json.dumps(manifest, indent=1) + "\n")
    return out

