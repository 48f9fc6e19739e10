"""`prepare digits` and `prepare photos`: real folders from images installed packages ship, no download."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from spinal_transfer.cli import main as cli
from spinal_transfer.data.prepare import PHOTO_GRID, PHOTO_SIZE, photo_crops, prepare
from spinal_transfer.data.splits import scan

PHOTO_CLASSES = ["astronaut", "brick", "cat", "coffee", "flower", "grass", "gravel", "motorcycle", "rocket", "temple"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundled")
    for name in ("digits", "photos"):
        assert cli(["prepare", name, "--root", str(root)]) == 0
    return root


def _files(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*.png"))


def test_digits_counts_classes_and_pixels(prepared):
    from sklearn.datasets import load_digits

    folder = prepared / "digits"
    s = scan(folder)
    assert s.classes == [str(k) for k in range(10)]
    assert (len(s.train), len(s.val), len(s.test)) == (1293, 144, 360)
    assert {p for p, _ in s.train}.isdisjoint(p for p, _ in s.test + s.val)
    for split in (s.train, s.val, s.test):                       # stratified: every digit in every split
        assert sorted({y for _, y in split}) == list(range(10))
    manifest = json.loads((folder / "prepare.json").read_text())
    assert manifest["counts"] == {"train": 1293, "val": 144, "test": 360}
    ds = load_digits()
    path, label = s.test[0]
    i = int(path.rsplit("/", 1)[1][:5])                           # named by its index in sklearn's order
    assert ds.target[i] == label
    img = np.asarray(Image.open(path))
    assert img.shape == (32, 32, 3) and np.array_equal(img[..., 0], img[..., 2])
    small = np.asarray(Image.fromarray(img[..., 0]).resize((8, 8), Image.BOX), dtype=float)
    assert np.corrcoef(small.ravel(), ds.images[i].ravel())[0, 1] > 0.9      # the digit's own pixels


def test_photos_counts_classes_and_sizes(prepared):
    folder = prepared / "photos"
    s = scan(folder)
    assert s.classes == PHOTO_CLASSES
    assert (len(s.train), len(s.val), len(s.test)) == (600, 200, 200)
    for split, per in ((s.train, 60), (s.val, 20), (s.test, 20)):
        assert np.bincount([y for _, y in split]).tolist() == [per] * 10
    shapes = {np.asarray(Image.open(p)).shape for p, _ in s.test}
    assert shapes == {(PHOTO_SIZE, PHOTO_SIZE, 3)}
    grey = s.classes.index("brick")
    colour = s.classes.index("cat")
    b = np.asarray(Image.open(next(p for p, y in s.test if y == grey))).astype(int)
    c = np.asarray(Image.open(next(p for p, y in s.test if y == colour))).astype(int)
    assert np.array_equal(b[..., 0], b[..., 1]) and not np.array_equal(c[..., 0], c[..., 1])


def test_photo_crops_never_straddle_tiles_and_splits_share_no_tile():
    """Each tile of a synthetic photo has its own flat colour: a crop inside one tile is flat, and the colours
    (tiles) a split shows are its own."""
    h, w = 200, 300
    photo = np.zeros((h, w, 3), np.uint8)
    ys, xs = np.linspace(0, h, PHOTO_GRID + 1).astype(int), np.linspace(0, w, PHOTO_GRID + 1).astype(int)
    for i in range(PHOTO_GRID):
        for j in range(PHOTO_GRID):
            photo[ys[i]:ys[i + 1], xs[j]:xs[j + 1]] = (10 * (i * PHOTO_GRID + j + 1), 0, 0)
    crops = photo_crops(photo, np.random.default_rng(3))
    tiles = {}
    for split, cs in crops.items():
        assert all(len(np.unique(c[..., 0])) == 1 for c in cs), split
        tiles[split] = {int(c[0, 0, 0]) for c in cs}
    assert not (tiles["train"] & tiles["val"]) and not (tiles["train"] & tiles["test"]) \
        and not (tiles["val"] & tiles["test"])
    assert len(tiles["train"]) >= 8 and len(tiles["test"]) >= 2


def test_bundled_folders_are_deterministic_and_a_rerun_does_nothing(prepared, tmp_path, capsys):
    for name in ("digits", "photos"):
        again = prepare(name, tmp_path, log=lambda *_: None)
        first = prepared / name
        assert _files(first) == _files(again)
        assert all((first / f).read_bytes() == (again / f).read_bytes() for f in _files(first)[::7]), name
    assert cli(["prepare", "photos", "--root", str(prepared)]) == 0
    assert "already complete" in capsys.readouterr().out
