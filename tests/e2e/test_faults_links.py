"""Links cannot change labels: a symbolic link inside a class folder that leads elsewhere in the data folder (up,
or into another class) is skipped and listed with its reason, never read under this folder's label."""
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
    os.symlink(tmp_path / "pool", root / "2" / "pool")             # a store outside the data folder: followed
    s = scan(root, val_fraction=0, test_fraction=0)

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
