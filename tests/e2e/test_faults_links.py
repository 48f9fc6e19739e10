"""Links cannot change labels: a symbolic link inside a class folder that leads out of that class folder is skipped
and listed with its reason, never read under this folder's label; a link out of the data folder (an image store)
is read only with --follow-links."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from spinal_transfer.data.splits import scan


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_links_up_or_sideways_are_skipped_with_the_reason_and_never_relabel(tmp_path):
    root = tmp_path / "data"
    for c, value in (("0", 10), ("1", 20), ("2", 30)):
        for i in range(3):
            _png(root / c / f"{i}.png", value)
    for i in range(2):
        _png(tmp_path / "pool" / f"{i}.png", 40)
    os.symlink("..", root / "0" / "loop")                          # up: would read every class as 0
    os.symlink("../1", root / "0" / "x")                           # sideways: class 1's images as 0
    os.symlink("../2/0.png", root / "0" / "stolen.png")            # one file of class 2
    os.symlink(".", root / "1" / "self")                           # a loop inside its own class: read once
    os.symlink(tmp_path / "pool", root / "2" / "pool")             # a store outside the data folder
    s = scan(root, val_fraction=0, test_fraction=0, follow_links=True)

    labels: dict[str, set[str]] = {}
    for path, y in s.train:
        labels.setdefault(os.path.realpath(path), set()).add(s.classes[y])
    assert all(len(v) == 1 for v in labels.values()), labels                 # no image under two labels
    for real, (label,) in labels.items():
        assert Path(real).parent.name == label or Path(real).parent.name == "pool" and label == "2", (real, label)
    counts = {c: sum(s.classes[y] == c for _, y in s.train) for c in s.classes}
    assert counts == {"0": 3, "1": 3, "2": 3 + 2}
    skipped = dict(s.skipped)
    assert skipped == {str(root / "0" / "loop"): f"link outside its class folder: -> {root}",
                       str(root / "0" / "x"): f"link outside its class folder: -> {root / '1'}",
                       str(root / "0" / "stolen.png"): f"link outside its class folder: -> {root / '2' / '0.png'}"}
    assert any("already read" in n for n in s.source["notes"])


def test_a_link_out_of_the_data_folder_is_skipped_unless_follow_links(tmp_path, cli_run):
    root = tmp_path / "data"
    for c in ("a", "b"):
        for i in range(6):
            _png(root / c / f"{i}.png", 10 * i)
    _png(tmp_path / "store" / "x.png", 99)
    os.symlink(tmp_path / "store" / "x.png", root / "a" / "x.png")
    os.symlink(tmp_path / "store", root / "b" / "store")
    strict = scan(root, val_fraction=0, test_fraction=0)
    assert len(strict.train) == 12
    store = tmp_path / "store"
    assert dict(strict.skipped) == {
        str(root / "a" / "x.png"): f"link outside its class folder: -> {store / 'x.png'} (out of the data folder: "
                                   f"read with --follow-links)",
        str(root / "b" / "store"): f"link outside its class folder: -> {store} (out of the data folder: read with "
                                   f"--follow-links)"}
    followed = scan(root, val_fraction=0, test_fraction=0, follow_links=True)
    assert len(followed.train) == 14 and not followed.skipped
    res = cli_run("train", "--data", root, "--backbone", "timm/test_resnet", "--weights", "none", "--img-size", "32",
                  "--epochs", "1", "--workers", "0", "--follow-links", "--out", tmp_path / "run")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "run" / "skipped_files.txt").read_text().strip() == ""


def test_a_class_folder_that_links_to_another_class_or_split_is_refused(tmp_path):
    """A class folder that is a link to a sibling class gives every image two labels; one into another split
    puts train's images in val. Both are refused in one DataError naming the folder; a class folder linked to
    an image store outside the data folder is read."""
    import pytest

    from spinal_transfer.errors import DataError

    for split in ("train", "val"):
        for c, value in (("cat", 10), ("dog", 20)):
            for i in range(3):
                _png(tmp_path / "data" / split / c / f"{i}.png", value)
    root = tmp_path / "data"
    os.symlink("dog", root / "train" / "dog2")
    os.symlink("dog", root / "val" / "dog2")
    with pytest.raises(DataError, match=r"class folders .*dog2 and .*dog hold the same images \(dog2 is a link to"):
        scan(root)
    for split in ("train", "val"):
        (root / split / "dog2").unlink()
    (root / "val" / "dog").rename(tmp_path / "store")
    os.symlink(tmp_path / "store", root / "val" / "dog")           # an image store: read
    assert [len(scan(root, test_fraction=0.3).val)] == [6]
    (root / "val" / "dog").unlink()
    os.symlink("../train/dog", root / "val" / "dog")               # into another split
    with pytest.raises(DataError, match=r"val/dog is a link into another part of the data folder"):
        scan(root)


def test_a_split_folder_that_is_another_split_is_refused(tmp_path):
    """test/ (or val/) a link to train/, or two splits linked to one store: the model would be tested, or its best
    epoch chosen, on the images it trains on. Refused in one line naming both folders; splits linked to folders
    of their own are read."""
    import pytest

    from spinal_transfer.errors import DataError

    for split in ("train", "val", "test"):
        for c, value in (("cat", 10), ("dog", 20)):
            for i in range(3):
                _png(tmp_path / "store" / split / c / f"{i}.png", value)
    root = tmp_path / "data"
    root.mkdir()
    for split in ("train", "val", "test"):
        os.symlink(tmp_path / "store" / split, root / split)
    s = scan(root)
    assert (len(s.train), len(s.val), len(s.test)) == (6, 6, 6)
    (root / "test").unlink()
    os.symlink(tmp_path / "store" / "train", root / "test")
    with pytest.raises(DataError, match=r"split folders .*data/test and .*data/train hold the same images \(test is "
                                        r"a link to .*store/train\): the test split would hold the train split's"):
        scan(root)
    (root / "test").unlink()
    os.symlink(tmp_path / "store" / "val", root / "test")
    with pytest.raises(DataError, match=r"split folders .*data/test and .*data/val hold the same images"):
        scan(root)
    (root / "test").unlink()
    os.symlink(tmp_path / "store" / "train" / "cat", root / "test")   # inside train: its "classes" are files
    with pytest.raises(DataError, match=r"test is inside or around .*store/train"):
        scan(root)
