"""`spinal-transfer prepare`: turn each paper dataset into ROOT/<name>/{train,val,test}/<class>/ image folders.

Why: the paper's scripts read `ImageFolder` trees cut from Kaggle repackagings and, for most datasets, picked the
best epoch on the test images. Here every dataset is rebuilt from its official source (torchvision where it has
one), checked against the official split sizes, and given a val split that never touches test: the official one
where it exists, else a stratified, seeded slice of train recorded in ROOT/<name>/prepare.json. Where the paper's
layout differs from the official one and matters (Flowers-102: the Kaggle competition layout with 6,552 training
images instead of the official 1,020), it is a dataset of its own (`flowers102_kaggle`) next to the official one.

Safety: a finished output is never redone; each file is written under a temp name and renamed, so an interrupted
run is simply rerun; a file that exists with other content, or anything in the output this run would not write,
stops the run before a single file is written.
"""
from __future__ import annotations

import filecmp
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
from PIL import Image

from ..errors import PrepareError

MANIFEST = "prepare.json"
SPLITS = ("train", "val", "test")
IMAGE_EXTS = {".jpg", ".jpeg", ".png"}
_PARTIAL = ".partial"  # suffix of our temp files: `.<name>.partial` next to the final file
_UNSAFE = re.compile(r'[\x00-\x1f/\\:*?"<>|]')


@dataclass(frozen=True)
class Item:
    """One output image: its class folder, its file name, and the original file to copy or pixels to save as PNG."""

    label: str
    name: str
    data: Union[Path, np.ndarray]


Splits = dict[str, list[Item]]  # split name -> images


@dataclass(frozen=True)
class Archive:
    """An archive that, when found at SOURCE/`path`, is unpacked into SOURCE/`unpack_to`."""

    path: str
    unpack_to: str


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset comes from, what must be on disk, and its official split sizes."""

    title: str
    origin: str                           # loader, recorded in prepare.json
    page: str                             # official page, for fetching by hand
    fetch: tuple[tuple[str, str], ...]    # (path under SOURCE, where to get it)
    needs: tuple[str, ...]                # paths under SOURCE that must exist before loading
    load: Callable[[Path, bool], Splits]  # (SOURCE, download) -> images per source split
    num_classes: int
    sizes: dict[str, int]                 # official image count per source split
    split_map: dict[str, str]             # source split -> output split; a missing val/test is carved from train
    archives: tuple[Archive, ...] = ()
    downloadable: bool = True
    test_fraction: float = 0.0            # only for datasets without an official test split
    note: str = ""
    unlabeled: tuple[str, ...] = ()       # source splits without labels: counted and checked, never written


# ------------------------------------------------------------------------------------------------
# Loaders: SOURCE -> {source split: [Item]}. torchvision is imported lazily so `--help` stays fast.

def safe_name(name: str) -> str:
    """A class name usable as one folder name: separators and characters Windows forbids become '_'."""
    s = _UNSAFE.sub("_", str(name)).strip().rstrip(".")
    return s or "_"


def _safe_classes(classes: Sequence[str]) -> list[str]:
    names = [safe_name(c) for c in classes]
    if len(set(names)) != len(names):
        raise PrepareError(f"class names collide once made filesystem-safe: {sorted(classes)}")
    return names


def _array_items(images: np.ndarray, labels: Sequence[int], classes: Sequence[str]) -> list[Item]:
    """One PNG per N x H x W x C image, named by its index in the source split (traceable to the original)."""
    names = _safe_classes(classes)
    return [Item(names[int(y)], f"{i:05d}.png", images[i]) for i, y in enumerate(labels)]


def _file_items(paths: Sequence[Any], labels: Sequence[int], classes: Sequence[str]) -> list[Item]:
    names = _safe_classes(classes)
    return [Item(names[int(y)], Path(p).name, Path(p)) for p, y in zip(paths, labels)]


def _load_cifar(class_name: str) -> Callable[[Path, bool], Splits]:
    def load(src: Path, download: bool) -> Splits:
        import torchvision.datasets as tvd

        out = {}
        for split in ("train", "test"):
            ds = getattr(tvd, class_name)(str(src), train=split == "train", download=download)
            out[split] = _array_items(ds.data, ds.targets, ds.classes)
        return out

    return load


def _load_stl10(src: Path, download: bool) -> Splits:
    from torchvision.datasets import STL10

    out = {}
    for split in ("train", "test"):
        ds = STL10(str(src), split=split, download=download)
        out[split] = _array_items(ds.data.transpose(0, 2, 3, 1), ds.labels, ds.classes)
    return out


def _load_svhn(src: Path, download: bool) -> Splits:
    from torchvision.datasets import SVHN

    out = {}
    for split in ("train", "test"):  # `extra` is not used by the paper
        ds = SVHN(str(src / "svhn"), split=split, download=download)
        out[split] = _array_items(ds.data.transpose(0, 2, 3, 1), ds.labels, [str(d) for d in range(10)])
    return out


def _load_flowers102(src: Path, download: bool) -> Splits:
    from torchvision.datasets import Flowers102

    out = {}
    for split in ("train", "val", "test"):
        ds = Flowers102(str(src), split=split, download=download)  # file paths are only kept in private fields
        out[split] = _file_items(ds._image_files, ds._labels, ds.classes)
    return out


def _load_stanford_cars(src: Path, download: bool) -> Splits:
    from torchvision.datasets import StanfordCars

    out = {}
    for split in ("train", "test"):  # never download: torchvision's download raises, the official URL is gone
        ds = StanfordCars(str(src), split=split)
        paths, labels = zip(*ds._samples) if ds._samples else ((), ())
        out[split] = _file_items(paths, labels, ds.classes)
    return out


def _load_caltech101(src: Path, download: bool) -> Splits:
    from torchvision.datasets import Caltech101

    ds = Caltech101(str(src), download=download)
    base = Path(ds.root) / "101_ObjectCategories"
    paths = [base / ds.categories[y] / f"image_{i:04d}.jpg" for i, y in zip(ds.index, ds.y)]
    return {"all": _file_items(paths, ds.y, ds.categories)}


def _find_dir(base: Path, names: Sequence[str], max_depth: int = 4) -> Path:
    """The shallowest folder under `base` (sorted, breadth-first) that holds every one of `names` as subfolders.

    Kaggle archives nest differently from version to version, so the split folders are searched for."""
    level = [base] if base.is_dir() else []
    for _ in range(max_depth + 1):
        for d in level:
            if all((d / n).is_dir() for n in names):
                return d
        level = sorted(c for d in level for c in d.iterdir()
                       if c.is_dir() and not c.name.startswith((".", "__MACOSX")))
    raise FileNotFoundError(f"no folder holding {', '.join(n + '/' for n in names)} found in {base} "
                            f"(searched {max_depth} levels deep)")


def _class_folder_items(split_dir: Path) -> list[Item]:
    items = []
    for cls in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        items += [Item(safe_name(cls.name), f.name, f) for f in sorted(cls.iterdir())
                  if f.suffix.lower() in IMAGE_EXTS and not f.name.startswith(".") and f.is_file()]
    return items


def _load_folders(folder: str, split_names: Sequence[str]) -> Callable[[Path, bool], Splits]:
    def load(src: Path, download: bool) -> Splits:
        top = _find_dir(src / folder, split_names)
        return {s: _class_folder_items(top / s) for s in split_names}

    return load


def _load_flowers_kaggle(src: Path, download: bool) -> Splits:
    """Kaggle `oxford-102-flower-pytorch` flower_data/: train/ and valid/ hold class folders 1..102; test/ holds
    the competition's unlabeled images (file names only), so it is counted but gives no labelled split."""
    top = _find_dir(src / "flowers102_kaggle", ("train", "valid"))
    out = {s: _class_folder_items(top / s) for s in ("train", "valid")}
    test = top / "test"
    files = sorted(f for f in test.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS
                   and not f.name.startswith(".")) if test.is_dir() else []
    out["test"] = [Item("", f.name, f) for f in files]
    return out


CINIC_URL = "https://datashare.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz"


def _load_cinic10(src: Path, download: bool) -> Splits:
    if download and not (src / "cinic10").exists():
        from torchvision.datasets.utils import download_url

        download_url(CINIC_URL, str(src), "CINIC-10.tar.gz")
        _extract(src / "CINIC-10.tar.gz", src / "cinic10")
    return _load_folders("cinic10", ("train", "valid", "test"))(src, download)


# ------------------------------------------------------------------------------------------------
# Bundled real folders: made from images that installed packages ship, so a fresh machine has a folder to
# fine-tune on before the user has one (and the tests and benchmarks have real pixels without a download).

BUNDLED = ("digits", "photos")     # datasets made from installed packages' images (the others are the paper's)
DIGITS_SIZE = 32          # sklearn's 8x8 digits, upscaled (bilinear) to this side and written as RGB PNGs


def _load_digits(src: Path, download: bool) -> Splits:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels, UCI optdigits test set), one class per digit."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    grey = (ds.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(g, mode="L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.BILINEAR)
                                  .convert("RGB")) for g in grey])
    return {"all": _array_items(images, ds.target, [str(k) for k in range(10)])}


PHOTO_SIZE = 64                                  # every crop is written at PHOTO_SIZE x PHOTO_SIZE
PHOTO_GRID = 4                                   # each photo is cut into a 4x4 grid of tiles ...
PHOTO_TILES = {"train": 10, "val": 3, "test": 3}  # ... dealt to the splits (seeded), so no pixel is in two splits
PHOTO_CROPS = {"train": 60, "val": 20, "test": 20}  # crops per class and split
PHOTO_SEED = 0


def _photo_sources() -> dict[str, np.ndarray]:
    """class name -> the photograph (HxWx3 uint8) it is cut from: the photographs scikit-image ships in its
    wheel (no download) and scikit-learn's two sample images. Grey textures are made RGB."""
    try:
        import skimage.data as skd
    except ImportError:
        raise PrepareError("prepare photos needs scikit-image (pip install scikit-image; it ships the photos)") \
            from None
    from sklearn.datasets import load_sample_images

    sample = dict(zip((Path(f).stem for f in load_sample_images().filenames), load_sample_images().images))
    sources = {"astronaut": skd.astronaut(), "brick": skd.brick(), "cat": skd.chelsea(), "coffee": skd.coffee(),
               "flower": sample["flower"], "grass": skd.grass(), "gravel": skd.gravel(),
               "motorcycle": skd.stereo_motorcycle()[0], "rocket": skd.rocket(), "temple": sample["china"]}
    return {k: np.repeat(v[:, :, None], 3, axis=2) if v.ndim == 2 else np.ascontiguousarray(v[:, :, :3])
            for k, v in sources.items()}


def photo_crops(photo: np.ndarray, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """Square crops of one photograph per split. The photo is cut into a PHOTO_GRID x PHOTO_GRID grid and its
    tiles are dealt to train/val/test at random; every crop lies inside one tile of its split (side 60-100% of
    the tile's shorter side, anywhere in it), so val and test show parts of the scene that training never saw."""
    import cv2

    h, w = photo.shape[:2]
    ys, xs = np.linspace(0, h, PHOTO_GRID + 1).astype(int), np.linspace(0, w, PHOTO_GRID + 1).astype(int)
    tiles = [(ys[i], ys[i + 1], xs[j], xs[j + 1]) for i in range(PHOTO_GRID) for j in range(PHOTO_GRID)]
    order = rng.permutation(len(tiles))
    out, start = {}, 0
    for split, k in PHOTO_TILES.items():
        mine = [tiles[t] for t in order[start:start + k]]
        start += k
        crops = []
        for _ in range(PHOTO_CROPS[split]):
            y0, y1, x0, x1 = mine[int(rng.integers(len(mine)))]
            side = int(round(min(y1 - y0, x1 - x0) * rng.uniform(0.6, 1.0)))
            top, left = int(rng.integers(y0, y1 - side + 1)), int(rng.integers(x0, x1 - side + 1))
            crop = photo[top:top + side, left:left + side]
            interp = cv2.INTER_AREA if side >= PHOTO_SIZE else cv2.INTER_CUBIC
            crops.append(cv2.resize(crop, (PHOTO_SIZE, PHOTO_SIZE), interpolation=interp))
        out[split] = crops
    return out


def _load_photos(src: Path, download: bool) -> Splits:
    rng = np.random.default_rng(PHOTO_SEED)
    out: Splits = {s: [] for s in PHOTO_TILES}
    for label, photo in _photo_sources().items():         # a fixed class order: the same folder on every machine
        for split, crops in photo_crops(photo, rng).items():
            out[split] += [Item(label, f"{label}_{i:03d}.png", c) for i, c in enumerate(crops)]
    return out


# ------------------------------------------------------------------------------------------------
# The datasets.

_CIFAR_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
_FLOWERS = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
_FLOWERS_KAGGLE = "https://www.kaggle.com/c/oxford-102-flower-pytorch/data"
_CALTECH_ZIP = "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip"
_CARS_KAGGLE = "https://www.kaggle.com/datasets/jessicali9530/stanford-cars-dataset"
_STL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
_SVHN = "http://ufldl.stanford.edu/housenumbers/"

DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        title="scikit-learn digits (bundled, 8x8 upscaled to 32x32)", origin="sklearn.datasets.load_digits",
        page="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        fetch=(), needs=(), load=_load_digits, num_classes=10, sizes={"all": 1797}, split_map={"all": "train"},
        downloadable=False, test_fraction=0.2,
        note="Bundled with scikit-learn: nothing to fetch. Class folders 0..9; a stratified 20% is test, then "
             "--val-fraction of the rest is val."),
    "photos": DatasetSpec(
        title="photos: crops of 10 photographs bundled with scikit-image and scikit-learn",
        origin="skimage.data (astronaut, brick, chelsea, coffee, grass, gravel, stereo_motorcycle, rocket) and "
               "sklearn.datasets.load_sample_images (flower, china)",
        page="https://scikit-image.org/docs/stable/api/skimage.data.html",
        fetch=(), needs=(), load=_load_photos, num_classes=10, sizes={s: 10 * n for s, n in PHOTO_CROPS.items()},
        split_map={s: s for s in PHOTO_CROPS}, downloadable=False,
        note="Made from images installed packages ship (scikit-image is a dependency): nothing to fetch. Each "
             "class is one photograph (astronaut, cat, coffee, flower, motorcycle, rocket, temple; brick, grass "
             "and gravel textures); its 4x4 tiles are dealt to train/val/test (10/3/3) and 64x64 crops are cut "
             "inside them, so the task is recognising a scene from a part of it never seen in training. "
             "--val-fraction and --split-seed do not apply: the split is the tiles'."),
    "stanford_cars": DatasetSpec(
        title="Stanford Cars", origin="torchvision.datasets.StanfordCars",
        page="https://ai.stanford.edu/~jkrause/cars/car_dataset.html (offline; mirrors below)",
        fetch=(("stanford_cars/cars_train/", f"{_CARS_KAGGLE} (its cars_train folder, flattened)"),
               ("stanford_cars/cars_test/", f"{_CARS_KAGGLE} (its cars_test folder, flattened)"),
               ("stanford_cars/car_devkit.tgz", "https://github.com/pytorch/vision/files/11644847/car_devkit.tgz"),
               ("stanford_cars/cars_test_annos_withlabels.mat",
                "https://github.com/pytorch/vision/issues/7545#issuecomment-1631441616")),
        needs=("stanford_cars/devkit/cars_meta.mat", "stanford_cars/devkit/cars_train_annos.mat",
               "stanford_cars/cars_train", "stanford_cars/cars_test", "stanford_cars/cars_test_annos_withlabels.mat"),
        archives=(Archive("stanford_cars/car_devkit.tgz", "stanford_cars/devkit"),),
        load=_load_stanford_cars, num_classes=196, sizes={"train": 8144, "test": 8041},
        split_map={"train": "train", "test": "test"}, downloadable=False,
        note="The official URL is gone, so torchvision cannot download Stanford Cars; the mirrors above are the "
             "ones given in pytorch/vision#7545. The Kaggle zip nests cars_train/cars_train/: move the JPEGs up "
             "so that they sit directly in stanford_cars/cars_train/ (same for cars_test)."),
    "flowers102": DatasetSpec(
        title="Oxford Flowers-102", origin="torchvision.datasets.Flowers102", page=_FLOWERS,
        fetch=tuple((f"flowers-102/{f}", _FLOWERS + f) for f in ("102flowers.tgz", "imagelabels.mat", "setid.mat")),
        needs=("flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"),
        archives=(Archive("flowers-102/102flowers.tgz", "flowers-102/jpg"),),
        load=_load_flowers102, num_classes=102, sizes={"train": 1020, "val": 1020, "test": 6149},
        split_map={"train": "train", "val": "val", "test": "test"},
        note="This is the official split (1,020 training images). The paper's scripts used the Kaggle "
             "`oxford-102-flower-pytorch` layout instead: prepare it as flowers102_kaggle."),
    "flowers102_kaggle": DatasetSpec(
        title="Oxford Flowers-102, Kaggle oxford-102-flower-pytorch layout (the paper's data)",
        origin="Kaggle competition oxford-102-flower-pytorch, flower_data.zip: flower_data/{train,valid}/<1..102>/",
        page=_FLOWERS_KAGGLE,
        fetch=(("flower_data.zip", f"{_FLOWERS_KAGGLE} (the file flower_data.zip on the Data tab; sign in and "
                                   f"accept the competition rules first)"),),
        needs=("flowers102_kaggle",), archives=(Archive("flower_data.zip", "flowers102_kaggle"),),
        load=_load_flowers_kaggle, num_classes=102, sizes={"train": 6552, "valid": 818, "test": 819},
        split_map={"train": "train", "valid": "test"}, unlabeled=("test",), downloadable=False,
        note="Kaggle needs a login, so --download cannot fetch it. Instead of the zip you may put its extracted "
             "content in flowers102_kaggle/ (the folder holding train/ and valid/ is found automatically). "
             "Class folders keep Kaggle's names 1..102 (cat_to_name.json maps them to flower names; it is not "
             "needed). Kaggle's valid/ (818 images) is the split the paper reported, so it becomes test/; val/ is "
             "held out of train/. Kaggle's test/ (819 images) has no labels: it is counted, not written."),
    "fruits360": DatasetSpec(
        title="Fruits-360 (131 classes)", origin="Kaggle moltean/fruits, Training/ and Test/ class folders",
        page="https://www.kaggle.com/datasets/moltean/fruits",
        fetch=(("fruits.zip", "https://www.kaggle.com/datasets/moltean/fruits "
                              "(`kaggle datasets download -d moltean/fruits` names it fruits.zip)"),),
        needs=("fruits360",), archives=(Archive("fruits.zip", "fruits360"),),
        load=_load_folders("fruits360", ("Training", "Test")), num_classes=131,
        sizes={"Training": 67692, "Test": 22688}, split_map={"Training": "train", "Test": "test"},
        downloadable=False,
        note="Kaggle needs a login, so --download cannot fetch it. Instead of the zip you may put its extracted "
             "content in fruits360/: the folder holding Training/ and Test/ (e.g. fruits360/fruits-360/) is found "
             "automatically. The sizes are those of version 2020.05.18.0 (131 classes), the one the paper used; "
             "later versions have more classes (use --no-check-counts for them)."),
    "caltech101": DatasetSpec(
        title="Caltech-101", origin="torchvision.datasets.Caltech101", page="https://data.caltech.edu/records/mzrjq-6wc02",
        fetch=(("caltech101/caltech-101.zip", _CALTECH_ZIP),),
        needs=("caltech101/101_ObjectCategories",),
        archives=(Archive("caltech101/caltech-101.zip", "caltech101/caltech-101"),
                  Archive("caltech101/caltech-101/101_ObjectCategories.tar.gz", "caltech101/101_ObjectCategories")),
        load=_load_caltech101, num_classes=101, sizes={"all": 8677}, split_map={"all": "train"},
        test_fraction=0.2,
        note="Caltech-101 has no official split: a stratified 20% of each class becomes test, then val is "
             "carved from the rest (BACKGROUND_Google is not a class and is skipped)."),
    "stl10": DatasetSpec(
        title="STL-10", origin="torchvision.datasets.STL10", page="https://cs.stanford.edu/~acoates/stl10/",
        fetch=(("stl10_binary.tar.gz", _STL),),
        needs=tuple(f"stl10_binary/{f}" for f in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin",
                                                   "unlabeled_X.bin", "class_names.txt")),
        archives=(Archive("stl10_binary.tar.gz", "stl10_binary"),),
        load=_load_stl10, num_classes=10, sizes={"train": 5000, "test": 8000},
        split_map={"train": "train", "test": "test"}),
    "cifar10": DatasetSpec(
        title="CIFAR-10", origin="torchvision.datasets.CIFAR10", page=_CIFAR_PAGE,
        fetch=(("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),),
        needs=tuple(f"cifar-10-batches-py/{f}" for f in
                    [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
        archives=(Archive("cifar-10-python.tar.gz", "cifar-10-batches-py"),),
        load=_load_cifar("CIFAR10"), num_classes=10, sizes={"train": 50000, "test": 10000},
        split_map={"train": "train", "test": "test"}),
    "cifar100": DatasetSpec(
        title="CIFAR-100", origin="torchvision.datasets.CIFAR100", page=_CIFAR_PAGE,
        fetch=(("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),),
        needs=("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
        archives=(Archive("cifar-100-python.tar.gz", "cifar-100-python"),),
        load=_load_cifar("CIFAR100"), num_classes=100, sizes={"train": 50000, "test": 10000},
        split_map={"train": "train", "test": "test"}),
    "svhn": DatasetSpec(
        title="SVHN (cropped digits)", origin="torchvision.datasets.SVHN", page=_SVHN,
        fetch=(("svhn/train_32x32.mat", _SVHN + "train_32x32.mat"), ("svhn/test_32x32.mat", _SVHN + "test_32x32.mat")),
        needs=("svhn/train_32x32.mat", "svhn/test_32x32.mat"),
        load=_load_svhn, num_classes=10, sizes={"train": 73257, "test": 26032},
        split_map={"train": "train", "test": "test"},
        note="The `extra` split (531,131 images) is not used, as in the paper."),
    "cinic10": DatasetSpec(
        title="CINIC-10", origin="CINIC-10.tar.gz, train/ valid/ test/ class folders",
        page="https://datashare.ed.ac.uk/handle/10283/3192",
        fetch=(("CINIC-10.tar.gz", CINIC_URL),), needs=("cinic10",),
        archives=(Archive("CINIC-10.tar.gz", "cinic10"),),
        load=_load_cinic10, num_classes=10, sizes={"train": 90000, "valid": 90000, "test": 90000},
        split_map={"train": "train", "valid": "val", "test": "test"},
        note="Instead of the archive you may put its extracted content in cinic10/ (the folder holding train/, "
             "valid/ and test/ is found automatically)."),
    "bird225": DatasetSpec(
        title="Bird-225 (Kaggle 100-bird-species, version 30)",
        origin="Kaggle gpiosenka/100-bird-species v30, train/ valid/ test/ class folders",
        page="https://www.kaggle.com/datasets/gpiosenka/100-bird-species/versions/30",
        fetch=(("100-bird-species.zip",
                "https://www.kaggle.com/datasets/gpiosenka/100-bird-species/versions/30 (Download, save under this name)"),),
        needs=("bird225",), archives=(Archive("100-bird-species.zip", "bird225"),),
        load=_load_folders("bird225", ("train", "valid", "test")), num_classes=225,
        sizes={"train": 31316, "valid": 1125, "test": 1125},
        split_map={"train": "train", "valid": "val", "test": "test"}, downloadable=False,
        note="Kaggle needs a login, so --download cannot fetch it. Later versions have more species (use "
             "--no-check-counts for them). Instead of the zip you may put its extracted content in bird225/."),
}


# ------------------------------------------------------------------------------------------------
# Source: unpack what was placed by hand, say exactly what is missing.

def _extract(archive: Path, target: Path) -> None:
    """Unpack `archive` so that `target` appears only once complete (temp folder beside it, then rename).

    When the archive has a top folder named like `target`, that folder becomes `target`."""
    from torchvision.datasets.utils import extract_archive

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=_PARTIAL, dir=target.parent))
    try:
        extract_archive(str(archive), str(tmp))
        inner = tmp / target.name
        os.replace(inner if inner.is_dir() else tmp, target)
    except (OSError, EOFError, RuntimeError, tarfile.TarError, zipfile.BadZipFile) as e:
        raise PrepareError(f"cannot unpack {archive}: {e}. It is truncated or not the expected file; "
                           f"fetch it again.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _missing(spec: DatasetSpec, src: Path) -> list[Path]:
    return [src / p for p in spec.needs if not (src / p).exists()]


def how_to_get(name: str, src: Path, downloading: bool = False) -> str:
    """Exact files, where they go and where to get them: shown whenever a source is missing or unreadable
    (`downloading`: --download was given and failed, so it is not offered again)."""
    spec = DATASETS[name]
    lines = [f"To prepare {spec.title} offline, put these in {src}/ (official page: {spec.page}):"]
    lines += [f"  {src}/{path}  <-  {url}" for path, url in spec.fetch]
    if spec.archives:
        lines.append("Archives are unpacked automatically (" +
                     ", ".join(f"{a.path} -> {a.unpack_to}/" for a in spec.archives) + ").")
    if spec.downloadable and not downloading:
        lines.append("Or rerun with --download to fetch them.")
    if spec.note:
        lines.append(spec.note)
    lines.append("Raw files can live elsewhere: pass --source DIR.")
    return "\n".join(lines)


def _load_source(name: str, src: Path, download: bool, log: Callable[[str], Any]) -> Splits:
    spec = DATASETS[name]
    if _missing(spec, src):
        for a in spec.archives:
            if not (src / a.unpack_to).exists() and (src / a.path).is_file():
                log(f"{name}: unpacking {src / a.path} -> {src / a.unpack_to}/")
                _extract(src / a.path, src / a.unpack_to)
    missing = _missing(spec, src)
    if missing and not (download and spec.downloadable):
        why = ("--download cannot fetch this dataset. " if download else "")
        raise PrepareError(f"{name}: source not found. Missing:\n" + "\n".join(f"  {p}" for p in missing) +
                           f"\n{why}{how_to_get(name, src)}")
    try:
        splits = spec.load(src, download)
    except PrepareError:
        raise
    except (RuntimeError, OSError, ValueError) as e:  # torchvision's "not found or corrupted", bad files, downloads
        offline = download and ("urlopen error" in str(e) or isinstance(e, (ConnectionError, TimeoutError)) or
                                "Name or service not known" in str(e))
        what = "the download failed (no network?)" if offline else f"could not read the source in {src}"
        raise PrepareError(f"{name}: {what}: {e}\n{how_to_get(name, src, downloading=download)}") from e
    gone = [it.data for items in splits.values() for it in items if isinstance(it.data, Path) and not it.data.is_file()]
    if gone:
        raise PrepareError(f"{name}: {len(gone)} images listed by the source are missing, e.g. {gone[0]}\n"
                           f"{how_to_get(name, src)}")
    return splits


def _check_counts(name: str, splits: Splits, check: bool, log: Callable[[str], Any]) -> None:
    spec = DATASETS[name]
    problems = [f"{s}: {len(splits.get(s, []))} images, official {n}" for s, n in spec.sizes.items()
                if len(splits.get(s, [])) != n]
    classes = len({it.label for s, items in splits.items() if s not in spec.unlabeled for it in items})
    if classes != spec.num_classes:
        problems.append(f"{classes} classes, official {spec.num_classes}")
    if not problems:
        return
    msg = f"{name}: the source does not match the official {spec.title} ({'; '.join(problems)})."
    if check:
        raise PrepareError(f"{msg} It is incomplete or another version. To prepare it anyway (e.g. a subset), "
                           f"pass check_counts=False (CLI: --no-check-counts).")
    log(f"warning: {msg} Going on because count checking is off.")


# ------------------------------------------------------------------------------------------------
# Splits: official where they exist, else stratified and seeded, so that model selection never sees test.

def split_settings(name: str, val_fraction: float, seed: int) -> dict[str, dict[str, Any]]:
    """How each output split is made; recorded in prepare.json and compared on reruns."""
    spec = DATASETS[name]
    settings: dict[str, dict[str, Any]] = {out: {"from": src} for src, out in spec.split_map.items()}
    for split, fraction in (("test", spec.test_fraction), ("val", val_fraction)):  # test first: val never sees it
        if split not in settings:
            settings[split] = {"from": "train", "fraction": fraction, "seed": seed, "stratified": True,
                               "method": "sklearn.model_selection.train_test_split(stratify=class)"}
    return {s: settings[s] for s in SPLITS}


def _carve(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Hold out `fraction` of each class (stratified, fixed seed)."""
    from sklearn.model_selection import train_test_split

    labels = [it.label for it in items]
    try:
        keep, held = train_test_split(np.arange(len(items)), test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as e:
        raise PrepareError(f"cannot hold out a stratified {fraction:g} of {len(items)} images in "
                           f"{len(set(labels))} classes: {e}") from None
    return [items[i] for i in sorted(keep)], [items[i] for i in sorted(held)]


def _assign(name: str, splits: Splits, settings: dict[str, dict[str, Any]]) -> Splits:
    spec = DATASETS[name]
    out = {spec.split_map[s]: items for s, items in splits.items() if s not in spec.unlabeled}
    for split in ("test", "val"):
        if split not in out:
            out["train"], out[split] = _carve(out["train"], settings[split]["fraction"], settings[split]["seed"])
    return out


# ------------------------------------------------------------------------------------------------
# Writing: compare before touching anything, then write each file atomically.

def _same(path: Path, data: Union[Path, np.ndarray]) -> bool:
    if isinstance(data, Path):
        return filecmp.cmp(path, data, shallow=False)
    try:  # pixels, not bytes: another Pillow may encode the same PNG differently
        with Image.open(path) as im:
            return np.array_equal(np.asarray(im), data)
    except OSError:
        return False


def _write(target: Path, data: Union[Path, np.ndarray]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}{_PARTIAL}")
    if isinstance(data, Path):
        shutil.copyfile(data, tmp)
    else:
        Image.fromarray(np.ascontiguousarray(data)).save(tmp, format="PNG")
    os.replace(tmp, target)


def _plan(out: Path, assigned: Splits) -> dict[Path, Item]:
    plan: dict[Path, Item] = {}
    for split, items in assigned.items():
        for it in items:
            target = out / split / it.label / it.name
            if target in plan:
                raise PrepareError(f"two source images would both become {target}")
            plan[target] = it
    return plan


def _existing(out: Path, plan: dict[Path, Item]) -> set[Path]:
    """Planned files already there with the same content. Anything else in `out` is refused before any write."""
    if not out.exists():
        return set()
    if not out.is_dir():
        raise PrepareError(f"{out} exists and is not a folder; refusing to touch it")
    dirs = {out} | {p.parent for p in plan} | {p.parent.parent for p in plan}
    same: set[Path] = set()
    refused: list[str] = []
    for d, subdirs, files in os.walk(out):
        here = Path(d)
        refused += [f"{here / s}/ (not written by prepare)" for s in subdirs if here / s not in dirs]
        subdirs[:] = [s for s in subdirs if here / s in dirs]
        for f in files:
            p = here / f
            if p in plan:
                if _same(p, plan[p].data):
                    same.add(p)
                else:
                    refused.append(f"{p} (exists with different content)")
            elif f.startswith(".") and f.endswith(_PARTIAL):
                p.unlink()  # our temp file from an interrupted run
            elif p != out / MANIFEST:
                refused.append(f"{p} (not written by prepare)")
    if refused:
        shown = "\n".join(f"  {r}" for r in refused[:10]) + (f"\n  ... and {len(refused) - 10} more"
                                                           if len(refused) > 10 else "")
        raise PrepareError(f"refusing to write into {out}: it holds files this run would not write or would "
                           f"overwrite:\n{shown}\nNothing was written. Move them away, or prepare into another --root.")
    return same


def _count_files(out: Path) -> dict[str, int]:
    return {s: sum(len([f for f in files if not f.startswith(".")]) for _, _, files in os.walk(out / s))
            for s in SPLITS}


def _listing_digest(out: Path) -> str:
    """A digest of every split file's path and size: what "already complete" is decided by. Counts alone pass a
    folder with one image removed and another added, or one cut short; reading every byte would make a no-op
    rerun of a large dataset slow, and a file that changed size is what a cut copy or a hand edit leaves."""
    h = hashlib.blake2b(digest_size=16)
    for s in SPLITS:
        for d, dirs, files in sorted(os.walk(out / s)):
            dirs.sort()
            for f in sorted(f for f in files if not f.startswith(".")):
                p = Path(d) / f
                h.update(f"{p.relative_to(out)}\0{p.stat().st_size}\n".encode())
    return h.hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}{_PARTIAL}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _finished(name: str, out: Path, settings: dict, log: Callable[[str], Any]) -> bool:
    """True when a previous run completed with the same split settings; refuses when the settings differ."""
    path = out / MANIFEST
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text())
        old_settings, old_counts = old["splits"], old["counts"]
    except (ValueError, KeyError, TypeError):
        raise PrepareError(f"{path} is not a manifest written by prepare; refusing to touch {out}") from None
    if old.get("dataset") != name or old_settings != settings:
        raise PrepareError(f"{out} was prepared as {old.get('dataset')} with splits {json.dumps(old_settings)}; "
                           f"this run asks for {name} with {json.dumps(settings)}. Rerun with the same "
                           f"--val-fraction/--split-seed, or delete {out} to prepare it again.")
    counts, digest = _count_files(out), _listing_digest(out)
    # a manifest from before the listing digest: decided by counts, as then
    if counts == old_counts and old.get("files_digest", digest) == digest:
        log(f"{name}: {out} is already complete ({_counts_text(old_counts)}); nothing to do.")
        return True
    log(f"{name}: {out} is " + ("incomplete" if counts != old_counts else
                                "not as prepared (a file removed, added or changed in size)")
        + "; checking and completing it.")
    return False


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{s} {n}" for s, n in counts.items())


def prepare(name: str, root: Union[str, Path], download: bool = False, source: Union[str, Path, None] = None,
            val_fraction: float = 0.1, seed: int = 0, check_counts: bool = True,
            log: Callable[[str], Any] = print) -> Path:
    """Build ROOT/<name>/{train,val,test}/<class>/ from the raw files in `source` (default ROOT/raw).

    Returns the dataset folder. Raises PrepareError (with what to do) on missing sources, wrong counts, or an
    output folder holding anything this run would not write."""
    if name not in DATASETS:
        raise PrepareError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"val_fraction must be in (0, 1), got {val_fraction}")
    spec = DATASETS[name]
    root = Path(root).expanduser()
    blocked = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise PrepareError(f"--root {root}: {blocked} is a file; give a folder (it is made when missing)")
    src = Path(source).expanduser() if source is not None else root / "raw"
    out = root / name
    settings = split_settings(name, val_fraction, seed)
    if _finished(name, out, settings, log):
        return out

    splits = _load_source(name, src, download, log)
    _check_counts(name, splits, check_counts, log)
    plan = _plan(out, _assign(name, splits, settings))
    same = _existing(out, plan)
    todo = [p for p in plan if p not in same]
    log(f"{name}: writing {len(todo)} images to {out}" + (f" ({len(same)} already there)" if same else ""))
    step = max(1, len(todo) // 10)
    for i, target in enumerate(todo, 1):
        _write(target, plan[target].data)
        if i % step == 0 or i == len(todo):
            log(f"{name}: {i}/{len(todo)}")

    counts = _count_files(out)
    _write_json(out / MANIFEST, {
        "dataset": name, "title": spec.title, "origin": spec.origin, "page": spec.page, "source_dir": str(src),
        "format": "png (decoded arrays)" if any(isinstance(it.data, np.ndarray) for it in plan.values())
                  else "copies of the original files",
        "source_counts": {s: len(items) for s, items in splits.items()}, "official_counts": spec.sizes,
        "counts_checked": check_counts, "classes": len({it.label for it in plan.values()}),
        "unlabeled_not_written": {s: len(splits.get(s, [])) for s in spec.unlabeled},
        "counts": counts, "files_digest": _listing_digest(out), "splits": settings,
    })
    log(f"{name}: done -> {out} ({_counts_text(counts)})")
    return out
