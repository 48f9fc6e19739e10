"""`prepare` on tiny fake sources laid out exactly like the real downloads (file names, archive nesting, formats)."""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import pickle
import socket
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image

from spinal_transfer.data import prepare as prep

RNG = np.random.default_rng(0)
N_TRAIN, N_TEST = 10, 4  # images per class in the fakes


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the network; fakes cannot match torchvision's md5 sums, so check presence only."""
    def refuse(*args, **kwargs):
        raise AssertionError("tests must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for module in ("cifar", "stl10", "svhn", "flowers102"):
        monkeypatch.setattr(f"torchvision.datasets.{module}.check_integrity",
                            lambda fpath, md5=None: os.path.isfile(fpath))


def _jpeg(path: Path, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, format="JPEG")


def _labels(n_per_class: int, classes: list[int]) -> np.ndarray:
    return np.repeat(np.asarray(classes), n_per_class)


# ---- fakes: each writes SOURCE like the real download and returns {source split: count}, class folder names ----

def fake_cifar10(src: Path):
    """cifar-10-python.tar.gz holding cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}."""
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    batches = {f"data_batch_{i}": _labels(2, [0, 1, 2]) for i in range(1, 6)} | {"test_batch": _labels(N_TEST, [0, 1, 2])}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name: str, obj: dict) -> None:
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, y in batches.items():
            add(name, {"data": RNG.integers(0, 256, (len(y), 3072), dtype=np.uint8), "labels": y.tolist()})
        add("batches.meta", {"label_names": names})
    src.mkdir(parents=True, exist_ok=True)
    (src / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    return {"train": 30, "test": 12}, {"airplane", "automobile", "bird"}


def fake_cifar100(src: Path):
    base = src / "cifar-100-python"
    base.mkdir(parents=True)
    names = [f"class_{i}" for i in range(100)]
    names[:3] = ["apple", "aquarium_fish", "baby"]
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        y = _labels(n, [0, 1, 2])
        obj = {"data": RNG.integers(0, 256, (len(y), 3072), dtype=np.uint8), "fine_labels": y.tolist(),
               "coarse_labels": [0] * len(y)}
        (base / split).write_bytes(pickle.dumps(obj))
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": names, "coarse_label_names": ["c"] * 20}))
    return {"train": 30, "test": 12}, {"apple", "aquarium_fish", "baby"}


def fake_stl10(src: Path):
    base = src / "stl10_binary"
    base.mkdir(parents=True)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        y = _labels(n, [1, 2, 3])  # 1-based on disk
        RNG.integers(0, 256, (len(y), 3, 96, 96), dtype=np.uint8).tofile(base / f"{split}_X.bin")
        y.astype(np.uint8).tofile(base / f"{split}_y.bin")
    RNG.integers(0, 256, (1, 3, 96, 96), dtype=np.uint8).tofile(base / "unlabeled_X.bin")
    (base / "class_names.txt").write_text("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse",
                                                     "monkey", "ship", "truck"]) + "\n")
    (base / "fold_indices.txt").write_text("0 1 2\n")
    return {"train": 30, "test": 12}, {"airplane", "bird", "car"}


def fake_svhn(src: Path):
    (src / "svhn").mkdir(parents=True)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        y = _labels(n, [10, 1, 2])  # SVHN stores digit 0 as label 10
        x = RNG.integers(0, 256, (32, 32, 3, len(y)), dtype=np.uint8)
        sio.savemat(src / "svhn" / f"{split}_32x32.mat", {"X": x, "y": y.reshape(-1, 1).astype(np.uint8)})
    return {"train": 30, "test": 12}, {"0", "1", "2"}


def fake_flowers102(src: Path):
    base = src / "flowers-102"
    classes = [1, 2, 60]  # 60 is "pink-yellow dahlia?": the '?' must be sanitised
    ids = {"trnid": [], "valid": [], "tstid": []}
    labels = []
    for c in classes:
        for key, n in (("trnid", N_TRAIN), ("valid", N_TEST), ("tstid", N_TEST)):
            for _ in range(n):
                labels.append(c)
                ids[key].append(len(labels))
    for i in range(1, len(labels) + 1):
        _jpeg(base / "jpg" / f"image_{i:05d}.jpg")
    sio.savemat(base / "imagelabels.mat", {"labels": np.asarray(labels, dtype=np.uint8).reshape(1, -1)})
    sio.savemat(base / "setid.mat", {k: np.asarray(v, dtype=np.uint16).reshape(1, -1) for k, v in ids.items()})
    return ({"train": 30, "val": 12, "test": 12},
            {"pink primrose", "hard-leaved pocket orchid", "pink-yellow dahlia_"})


KAGGLE_FLOWER_CLASSES = ["1", "10", "102"]  # Kaggle's folder names are the class numbers 1..102


def fake_flowers102_kaggle(src: Path):
    """flower_data.zip as the Kaggle competition oxford-102-flower-pytorch serves it (the file the authors'
    notebook unzips): flower_data/{train,valid}/<1..102>/image_NNNNN.jpg, flower_data/test/image_NNNNN.jpg
    with no class folders (the competition's unlabeled test), and flower_data/cat_to_name.json."""
    tmp = src.parent / "flower_build"
    top = tmp / "flower_data"
    n = 0
    for split, per_class in (("train", N_TRAIN), ("valid", N_TEST)):
        for c in KAGGLE_FLOWER_CLASSES:
            for _ in range(per_class):
                n += 1
                _jpeg(top / split / c / f"image_{n:05d}.jpg")
    for _ in range(7):
        n += 1
        _jpeg(top / "test" / f"image_{n:05d}.jpg")
    (top / "cat_to_name.json").write_text(json.dumps({"1": "pink primrose", "10": "globe thistle",
                                                      "102": "blackberry lily"}))
    src.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src / "flower_data.zip", "w") as zf:
        for f in sorted(tmp.rglob("*")):
            zf.write(f, f.relative_to(tmp).as_posix())
    return {"train": 30, "valid": 12, "test": 7}, set(KAGGLE_FLOWER_CLASSES)


def fake_caltech101(src: Path):
    base = src / "caltech101" / "101_ObjectCategories"
    for cat in ("BACKGROUND_Google", "Faces_easy", "accordion", "airplanes"):
        for i in range(1, 11):
            _jpeg(base / cat / f"image_{i:04d}.jpg")
    return {"all": 30}, {"Faces_easy", "accordion", "airplanes"}


def fake_stanford_cars(src: Path):
    """stanford_cars/{cars_train,cars_test}/*.jpg, devkit/*.mat, cars_test_annos_withlabels.mat (struct arrays)."""
    base = src / "stanford_cars"
    names = np.empty((1, 3), dtype=object)
    names[0, :] = ["AM General Hummer SUV 2000", "Ram C/V Cargo Van Minivan 2012", "smart fortwo Convertible 2012"]
    (base / "devkit").mkdir(parents=True)
    sio.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    fields = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    for folder, mat, n in (("cars_train", base / "devkit" / "cars_train_annos.mat", N_TRAIN),
                           ("cars_test", base / "cars_test_annos_withlabels.mat", N_TEST)):
        y = _labels(n, [1, 2, 3])  # 1-based
        ann = np.zeros((1, len(y)), dtype=fields)
        for i, c in enumerate(y):
            fname = f"{i + 1:05d}.jpg"
            ann[0, i] = (1, 1, 7, 7, np.uint8(c), fname)
            _jpeg(base / folder / fname)
        sio.savemat(mat, {"annotations": ann})
    return ({"train": 30, "test": 12},
            {"AM General Hummer SUV 2000", "Ram C_V Cargo Van Minivan 2012", "smart fortwo Convertible 2012"})


def _class_tree(top: Path, splits: dict[str, int], classes: list[str], ext: str = ".jpg") -> None:
    for split, n in splits.items():
        for c in classes:
            for i in range(n):
                _jpeg(top / split / c / f"r_{i}_100{ext}")


def fake_fruits360(src: Path):
    """fruits.zip as Kaggle serves it: fruits-360/{Training,Test}/<class>/*.jpg (plus the readme)."""
    tmp = src.parent / "fruits_build"
    classes = ["Apple Braeburn", "Banana", "Cherry 1"]
    _class_tree(tmp / "fruits-360", {"Training": N_TRAIN, "Test": N_TEST}, classes)
    (tmp / "fruits-360" / "readme.md").write_text("fruits")
    src.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src / "fruits.zip", "w") as zf:
        for p in sorted(tmp.rglob("*")):
            zf.write(p, p.relative_to(tmp).as_posix())
    return {"Training": 30, "Test": 12}, set(classes)


def fake_bird225(src: Path):
    """The extracted Kaggle v30 folder: train/ valid/ test/ class folders (and a few extra files)."""
    classes = ["AFRICAN CROWNED CRANE", "ALBATROSS", "BALD EAGLE"]
    _class_tree(src / "bird225", {"train": N_TRAIN, "valid": N_TEST, "test": N_TEST}, classes)
    (src / "bird225" / "class_dict.csv").write_text("class_index,class\n")
    return {"train": 30, "valid": 12, "test": 12}, set(classes)


def fake_cinic10(src: Path):
    """CINIC-10.tar.gz with train/ valid/ test/ at its top level, PNG images."""
    tmp = src.parent / "cinic_build"
    classes = ["airplane", "automobile", "bird"]
    _class_tree(tmp, {"train": N_TRAIN, "valid": N_TEST, "test": N_TEST}, classes, ext=".png")
    src.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src / "CINIC-10.tar.gz", "w:gz") as tar:
        for split in ("train", "valid", "test"):
            tar.add(tmp / split, arcname=split)
    return {"train": 30, "valid": 12, "test": 12}, set(classes)


PAPER = [name for name in prep.DATASETS if name not in prep.BUNDLED]     # bundled ones: test_prepare_bundled.py
FAKES = {name: globals()[f"fake_{name}"] for name in PAPER}


def _files(out: Path) -> dict[str, dict[str, list[str]]]:
    return {s: {c.name: sorted(f.name for f in c.iterdir()) for c in sorted((out / s).iterdir())}
            for s in prep.SPLITS}


def _mtimes(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def _quiet(_msg: str) -> None:
    pass


# ---- layout, counts, splits --------------------------------------------------------------------

def test_registry_covers_the_paper_datasets():
    assert set(PAPER) == {"stanford_cars", "flowers102", "flowers102_kaggle", "fruits360", "caltech101",
                          "stl10", "cifar10", "cifar100", "svhn", "cinic10", "bird225"}
    assert set(prep.DATASETS) == set(PAPER) | {"digits", "photos"}


@pytest.mark.parametrize("name", PAPER)
def test_prepare_layout_counts_and_manifest(tmp_path, name):
    sizes, classes = FAKES[name](tmp_path / "raw")
    out = prep.prepare(name, tmp_path, check_counts=False, log=_quiet)
    assert out == tmp_path / name
    files = _files(out)
    for split in prep.SPLITS:
        assert set(files[split]) == classes, split
    counts = {s: sum(len(v) for v in files[s].values()) for s in prep.SPLITS}

    spec = prep.DATASETS[name]
    manifest = json.loads((out / prep.MANIFEST).read_text())
    assert manifest["dataset"] == name and manifest["origin"] == spec.origin
    assert manifest["counts"] == counts and manifest["source_counts"] == sizes
    assert manifest["classes"] == len(classes) and manifest["counts_checked"] is False
    assert manifest["unlabeled_not_written"] == {s: sizes[s] for s in spec.unlabeled}
    total = sum(n for s, n in sizes.items() if s not in spec.unlabeled)   # unlabeled images are never written
    assert sum(counts.values()) == total

    official = {spec.split_map[s]: n for s, n in sizes.items() if s not in spec.unlabeled}
    train = official["train"]
    if "test" in official:
        assert counts["test"] == official["test"]
    else:  # Caltech-101: a stratified test is held out first, and recorded
        test = manifest["splits"]["test"]
        assert (test["fraction"], test["seed"], test["stratified"]) == (0.2, 0, True)
        assert counts["test"] == math.ceil(0.2 * train)
        train -= counts["test"]
    if "val" in official:
        assert counts["val"] == official["val"]
        assert manifest["splits"]["val"] == {"from": next(s for s, o in spec.split_map.items() if o == "val")}
    else:
        assert manifest["splits"]["val"]["fraction"] == 0.1 and manifest["splits"]["val"]["seed"] == 0
        assert manifest["splits"]["val"]["stratified"] is True
        assert counts["val"] == math.ceil(0.1 * train)
        train -= counts["val"]
    assert counts["train"] == train


# ---- Flowers-102: the official split and the authors' Kaggle layout ----------------------------

def test_flowers_kaggle_layout_gives_the_authors_splits(tmp_path):
    """Kaggle's train/ is what the authors trained on (val is held out of it for the honest protocol), Kaggle's
    valid/ is the split they reported (our test/, copied byte for byte), and the unlabeled test/ is not written."""
    fake_flowers102_kaggle(tmp_path / "raw")
    out = prep.prepare("flowers102_kaggle", tmp_path, check_counts=False, log=_quiet)
    files = _files(out)
    manifest = json.loads((out / prep.MANIFEST).read_text())
    assert manifest["source_counts"] == {"train": 30, "valid": 12, "test": 7}
    assert manifest["unlabeled_not_written"] == {"test": 7}
    assert manifest["counts"] == {"train": 27, "val": 3, "test": 12} and manifest["classes"] == 3
    assert manifest["splits"]["test"] == {"from": "valid"} and manifest["splits"]["train"] == {"from": "train"}
    assert manifest["splits"]["val"]["from"] == "train" and manifest["splits"]["val"]["stratified"] is True
    assert sorted(files["test"]) == sorted(KAGGLE_FLOWER_CLASSES)
    kaggle = tmp_path / "raw" / "flowers102_kaggle" / "flower_data"
    for c in KAGGLE_FLOWER_CLASSES:
        assert files["test"][c] == sorted(f.name for f in (kaggle / "valid" / c).iterdir())
        assert sorted(files["train"][c] + files["val"][c]) == sorted(f.name for f in (kaggle / "train" / c).iterdir())
        assert len(files["val"][c]) == 1          # ceil(0.1 * 10) per class
    some = next((out / "test" / "10").iterdir())
    assert some.read_bytes() == (kaggle / "valid" / "10" / some.name).read_bytes()
    unlabeled = {f.name for f in (kaggle / "test").iterdir()}
    assert not unlabeled & {f.name for f in out.rglob("*.jpg")}


def test_flowers_kaggle_counts_are_the_authors(tmp_path):
    """The count check holds the Kaggle archive to the sizes the authors' notebooks imply (6,552 train images,
    818 in valid; with the 819 unlabeled test images these are the official 8,189) and the official split stays."""
    kaggle, official = prep.DATASETS["flowers102_kaggle"], prep.DATASETS["flowers102"]
    assert kaggle.sizes == {"train": 6552, "valid": 818, "test": 819} and kaggle.num_classes == 102
    assert official.sizes == {"train": 1020, "val": 1020, "test": 6149} and official.num_classes == 102
    assert sum(kaggle.sizes.values()) == sum(official.sizes.values()) == 8189
    # 811/818 = 99.14% and 808/818 = 98.78%: the valid accuracies printed by the authors' Flowers notebook
    assert (round(100 * 811 / 818, 2), round(100 * 808 / 818, 2)) == (99.14, 98.78)
    fake_flowers102_kaggle(tmp_path / "raw")
    with pytest.raises(prep.PrepareError) as e:
        prep.prepare("flowers102_kaggle", tmp_path, log=_quiet)
    msg = str(e.value)
    for text in ("train: 30 images, official 6552", "valid: 12 images, official 818", "test: 7 images, official 819",
                 "3 classes, official 102", "--no-check-counts"):
        assert text in msg, text
    assert not (tmp_path / "flowers102_kaggle").exists()


def test_flowers_kaggle_and_official_live_side_by_side(tmp_path):
    fake_flowers102(tmp_path / "raw")
    fake_flowers102_kaggle(tmp_path / "raw")
    official = prep.prepare("flowers102", tmp_path, check_counts=False, log=_quiet)
    kaggle = prep.prepare("flowers102_kaggle", tmp_path, check_counts=False, log=_quiet)
    assert (official, kaggle) == (tmp_path / "flowers102", tmp_path / "flowers102_kaggle")
    assert json.loads((official / prep.MANIFEST).read_text())["splits"]["val"] == {"from": "val"}
    assert json.loads((kaggle / prep.MANIFEST).read_text())["splits"]["test"] == {"from": "valid"}
    assert "flowers102_kaggle" in prep.how_to_get("flowers102", tmp_path / "raw")


def test_array_datasets_become_pngs_with_the_right_pixels(tmp_path):
    fake_svhn(tmp_path / "raw")
    out = prep.prepare("svhn", tmp_path, check_counts=False, log=_quiet)
    mat = sio.loadmat(tmp_path / "raw" / "svhn" / "test_32x32.mat")
    png = out / "test" / "0" / "00000.png"  # test image 0 has label 10 = digit 0
    assert np.array_equal(np.asarray(Image.open(png)), mat["X"][..., 0])


def test_file_datasets_are_copied_byte_for_byte(tmp_path):
    fake_caltech101(tmp_path / "raw")
    out = prep.prepare("caltech101", tmp_path, check_counts=False, log=_quiet)
    some = next((out / "train" / "accordion").iterdir())
    original = tmp_path / "raw" / "caltech101" / "101_ObjectCategories" / "accordion" / some.name
    assert some.read_bytes() == original.read_bytes() and not os.path.samefile(some, original)


def test_val_is_stratified_from_train_only_and_seeded(tmp_path):
    fake_cifar100(tmp_path / "a" / "raw")
    out = prep.prepare("cifar100", tmp_path / "a", check_counts=False, log=_quiet)
    files = _files(out)
    first_index = {"apple": 0, "aquarium_fish": 10, "baby": 20}  # the fake's train images are grouped by class
    for cls, start in first_index.items():
        train, val, test = (set(files[s][cls]) for s in prep.SPLITS)
        assert len(val) == 1 and not train & val  # ceil(0.1 * 10) per class
        assert train | val == {f"{i:05d}.png" for i in range(start, start + N_TRAIN)}
        assert len(test) == N_TEST
    # same seed -> same split; another seed -> another split
    fake_cifar100(tmp_path / "b" / "raw")
    assert _files(prep.prepare("cifar100", tmp_path / "b", check_counts=False, log=_quiet))["val"] == files["val"]
    fake_cifar100(tmp_path / "c" / "raw")
    other = prep.prepare("cifar100", tmp_path / "c", seed=3, check_counts=False, log=_quiet)
    assert _files(other)["val"] != files["val"]
    assert json.loads((other / prep.MANIFEST).read_text())["splits"]["val"]["seed"] == 3


# ---- idempotency and resuming ------------------------------------------------------------------

def test_second_run_does_nothing_and_says_so(tmp_path):
    fake_stanford_cars(tmp_path / "raw")
    out = prep.prepare("stanford_cars", tmp_path, check_counts=False, log=_quiet)
    before = _mtimes(out)
    messages: list[str] = []
    assert prep.prepare("stanford_cars", tmp_path, check_counts=False, log=messages.append) == out
    assert _mtimes(out) == before
    assert any("already complete" in m and "nothing to do" in m for m in messages)


def test_interrupted_run_is_completed_without_rewriting(tmp_path):
    fake_svhn(tmp_path / "raw")
    out = prep.prepare("svhn", tmp_path, check_counts=False, log=_quiet)
    (out / prep.MANIFEST).unlink()  # as if killed before the end
    lost = next((out / "train" / "1").iterdir())
    lost.unlink()
    (lost.parent / f".{lost.name}.partial").write_bytes(b"half a png")
    before = _mtimes(out)
    prep.prepare("svhn", tmp_path, check_counts=False, log=_quiet)
    after = _mtimes(out)
    assert lost.is_file() and not (lost.parent / f".{lost.name}.partial").exists()
    assert {p: t for p, t in after.items() if p in before and p.suffix == ".png"} == \
        {p: t for p, t in before.items() if p.suffix == ".png"}
    assert (out / prep.MANIFEST).is_file()


def test_rerun_with_other_split_settings_is_refused(tmp_path):
    fake_svhn(tmp_path / "raw")
    prep.prepare("svhn", tmp_path, check_counts=False, log=_quiet)
    with pytest.raises(prep.PrepareError, match="--val-fraction/--split-seed"):
        prep.prepare("svhn", tmp_path, seed=1, check_counts=False, log=_quiet)


# ---- never overwrite ---------------------------------------------------------------------------

def test_existing_different_file_is_refused_and_left_intact(tmp_path):
    fake_cifar100(tmp_path / "raw")
    mine = tmp_path / "cifar100" / "test" / "apple" / "00000.png"
    mine.parent.mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(mine)
    content = mine.read_bytes()
    with pytest.raises(prep.PrepareError, match="exists with different content") as e:
        prep.prepare("cifar100", tmp_path, check_counts=False, log=_quiet)
    assert str(mine) in str(e.value) and "Nothing was written" in str(e.value)
    assert mine.read_bytes() == content
    assert [p for p in (tmp_path / "cifar100").rglob("*") if p.is_file()] == [mine]


def test_foreign_content_in_the_target_is_refused(tmp_path):
    fake_bird225(tmp_path / "raw")
    notes = tmp_path / "bird225" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("mine")
    with pytest.raises(prep.PrepareError, match="not written by prepare"):
        prep.prepare("bird225", tmp_path, check_counts=False, log=_quiet)
    assert notes.read_text() == "mine" and sorted(notes.parent.iterdir()) == [notes]


def test_a_foreign_manifest_is_refused(tmp_path):
    fake_svhn(tmp_path / "raw")
    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn" / prep.MANIFEST).write_text("[1, 2]")
    with pytest.raises(prep.PrepareError, match="not a manifest written by prepare"):
        prep.prepare("svhn", tmp_path, check_counts=False, log=_quiet)


# ---- missing sources and counts ----------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("cifar10", ["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/batches.meta", "cifar-10-python.tar.gz",
                 "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "--download"]),
    ("svhn", ["svhn/train_32x32.mat", "svhn/test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat"]),
    ("stl10", ["stl10_binary/train_X.bin", "stl10_binary/unlabeled_X.bin", "stl10_binary.tar.gz"]),
    ("flowers102", ["flowers-102/jpg", "flowers-102/setid.mat", "flowers-102/102flowers.tgz",
                    "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/imagelabels.mat"]),
    ("flowers102_kaggle", ["flowers102_kaggle", "flower_data.zip", "https://www.kaggle.com/c/oxford-102-flower-pytorch",
                           "--download cannot fetch it"]),
    ("caltech101", ["caltech101/101_ObjectCategories", "caltech101/caltech-101.zip",
                    "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip"]),
    ("stanford_cars", ["stanford_cars/devkit/cars_meta.mat", "stanford_cars/cars_test_annos_withlabels.mat",
                       "stanford_cars/car_devkit.tgz", "https://github.com/pytorch/vision/issues/7545"]),
    ("fruits360", ["fruits360", "fruits.zip", "https://www.kaggle.com/datasets/moltean/fruits"]),
    ("bird225", ["bird225", "100-bird-species.zip", "gpiosenka/100-bird-species/versions/30"]),
    ("cinic10", ["cinic10", "CINIC-10.tar.gz", "https://datashare.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz"]),
])
def test_missing_source_names_exact_files_directory_and_url(tmp_path, name, expected):
    src = tmp_path / "elsewhere"
    with pytest.raises(prep.PrepareError) as e:
        prep.prepare(name, tmp_path, source=src, log=_quiet)
    msg = str(e.value)
    assert f"{src}/" in msg
    for text in expected:
        assert text in msg, text
    assert not (tmp_path / name).exists()


def test_download_of_a_non_downloadable_dataset_says_so(tmp_path):
    with pytest.raises(prep.PrepareError, match="--download cannot fetch this dataset") as e:
        prep.prepare("stanford_cars", tmp_path, download=True, log=_quiet)
    assert "car_devkit.tgz" in str(e.value)


def test_image_missing_from_annotated_source_is_reported(tmp_path):
    fake_stanford_cars(tmp_path / "raw")
    gone = tmp_path / "raw" / "stanford_cars" / "cars_test" / "00003.jpg"
    gone.unlink()
    with pytest.raises(prep.PrepareError, match="1 images listed by the source are missing") as e:
        prep.prepare("stanford_cars", tmp_path, check_counts=False, log=_quiet)
    assert str(gone) in str(e.value)


def test_corrupt_archive_is_a_clear_error(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(prep.PrepareError, match="cannot unpack .*cifar-10-python.tar.gz"):
        prep.prepare("cifar10", tmp_path, log=_quiet)


def test_count_mismatch_is_an_error_unless_checking_is_off(tmp_path):
    fake_cinic10(tmp_path / "raw")
    with pytest.raises(prep.PrepareError) as e:
        prep.prepare("cinic10", tmp_path, log=_quiet)
    msg = str(e.value)
    assert "train: 30 images, official 90000" in msg and "3 classes, official 10" in msg
    assert "--no-check-counts" in msg
    assert not (tmp_path / "cinic10").exists()
    warnings: list[str] = []
    prep.prepare("cinic10", tmp_path, check_counts=False, log=warnings.append)
    assert any(w.startswith("warning:") and "official 90000" in w for w in warnings)


def test_counts_matching_the_official_table_pass(tmp_path, monkeypatch):
    sizes, classes = fake_fruits360(tmp_path / "raw")
    spec = dataclasses.replace(prep.DATASETS["fruits360"], sizes=sizes, num_classes=len(classes))
    monkeypatch.setitem(prep.DATASETS, "fruits360", spec)
    out = prep.prepare("fruits360", tmp_path, log=_quiet)
    assert json.loads((out / prep.MANIFEST).read_text())["counts_checked"] is True


# ---- helpers and CLI ---------------------------------------------------------------------------

def test_safe_name():
    assert prep.safe_name("Ram C/V Cargo Van Minivan 2012") == "Ram C_V Cargo Van Minivan 2012"
    assert prep.safe_name("pink-yellow dahlia?") == "pink-yellow dahlia_"
    assert prep.safe_name("..") == "_" and prep.safe_name("colt's foot") == "colt's foot"


def test_cli_help_has_examples_and_main_reports_errors(tmp_path, capsys):
    from spinal_transfer.cli import build_parser, main

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices["prepare"]
    assert "examples:" in parser.format_help() and "--no-check-counts" in parser.format_help()
    fake_svhn(tmp_path / "raw")
    assert main(["prepare", "svhn", "--root", str(tmp_path), "--no-check-counts", "--val-fraction", "0.2"]) == 0
    assert json.loads((tmp_path / "svhn" / prep.MANIFEST).read_text())["splits"]["val"]["fraction"] == 0.2
    assert main(["prepare", "cifar10", "--root", str(tmp_path)]) == 2
    assert "cifar-10-python.tar.gz" in capsys.readouterr().err


def test_a_failed_download_is_not_answered_with_the_advice_to_download():
    from spinal_transfer.data.prepare import how_to_get

    src = Path("/raw")
    assert "rerun with --download" in how_to_get("svhn", src)
    assert "rerun with --download" not in how_to_get("svhn", src, downloading=True)
    assert "/raw/svhn/train_32x32.mat" in how_to_get("svhn", src, downloading=True)


def test_a_file_swapped_or_cut_short_after_prepare_is_not_called_complete(tmp_path):
    """The counts alone would pass a folder with one image removed and another added under the same count, or one
    cut short: the manifest's listing digest (paths and sizes) catches both, and the check that follows refuses
    the stranger and the cut file in words (nothing is overwritten)."""
    fake_svhn(tmp_path / "raw")
    out = prep.prepare("svhn", tmp_path, check_counts=False, log=_quiet)
    first = sorted((out / "train" / "1").iterdir())[0]
    saved = first.read_bytes()
    first.rename(first.with_name("mine.png"))                   # removed one, added one: the same counts
    messages: list[str] = []
    with pytest.raises(prep.PrepareError, match="mine.png \\(not written by prepare\\)"):
        prep.prepare("svhn", tmp_path, check_counts=False, log=messages.append)
    assert any("not as prepared" in m for m in messages) and not any("already complete" in m for m in messages)
    first.with_name("mine.png").rename(first)
    first.write_bytes(saved[: len(saved) // 2])                  # cut short
    with pytest.raises(prep.PrepareError, match="exists with different content"):
        prep.prepare("svhn", tmp_path, check_counts=False, log=_quiet)
    assert first.read_bytes() == saved[: len(saved) // 2]        # left as it is
    first.write_bytes(saved)
    messages.clear()
    prep.prepare("svhn", tmp_path, check_counts=False, log=messages.append)
    assert any("already complete" in m for m in messages)
