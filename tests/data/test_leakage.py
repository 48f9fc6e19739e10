"""`train`'s leakage check: held-out images that are byte-identical copies of train images (or test images of val
images) are counted before training, said in one line, and recorded in report.json; --no-leak-check turns it
off."""
from __future__ import annotations

import json
import shutil

from conftest import TINY, cli_flags

from spinal_transfer.data.leakage import describe, duplicates_of, leakage


def test_only_identical_bytes_count(tmp_path):
    a, same, other_bytes, other_size = (tmp_path / n for n in ("a.png", "b.png", "c.png", "d.png"))
    a.write_bytes(b"x" * 100)
    same.write_bytes(b"x" * 100)
    other_bytes.write_bytes(b"y" * 100)              # same size, different content: hashed, not a copy
    other_size.write_bytes(b"x" * 101)
    train = [(str(a), 0)]
    assert duplicates_of(train, [(str(same), 1), (str(other_bytes), 0), (str(other_size), 0)]) == \
        [(str(same), str(a))]
    counts = leakage({"train": train, "val": [(str(other_bytes), 0)], "test": [(str(same), 0)]})
    assert counts == {"test_in_train": 1, "val_in_train": 0, "test_in_val": 0}
    assert describe(counts).startswith("leakage: 1 test image(s) are byte-identical copies of train images, so the "
                                       "test score is inflated")
    assert describe({"test_in_train": 0, "val_in_train": 0, "test_in_val": 0}) == ""
    # val and test holding the same images (a copied or linked folder): test would score the selection set
    counts = leakage({"train": [(str(other_size), 0)], "val": [(str(a), 0)], "test": [(str(same), 0)]})
    assert counts == {"test_in_train": 0, "val_in_train": 0, "test_in_val": 1}
    assert describe(counts).startswith("leakage: 1 test image(s) are byte-identical copies of val images, so the "
                                       "test score is inflated")


def test_train_says_it_once_and_records_it(three_digits, tmp_path, cli_run):
    data = tmp_path / "data"
    for folder in sorted(three_digits.glob("*/*")):          # 8 images per class and split: a run in seconds
        (data / folder.relative_to(three_digits)).mkdir(parents=True)
        for f in sorted(folder.glob("*.png"))[:8]:
            shutil.copy(f, data / f.relative_to(three_digits))
    test_images = sorted((data / "test" / "digit_1").glob("*.png"))
    shutil.copy(test_images[0], data / "train" / "digit_1" / "copy_of_a_test_image.png")
    shutil.copy(test_images[1], data / "train" / "digit_2" / "mislabelled_copy.png")     # a copy under another class
    out = tmp_path / "run"
    r = cli_run("train", *cli_flags(**{**TINY, "data": data, "out": out, "epochs": 1, "limit_train_batches": 1,
                                       "device": "cpu"}))
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "leakage:" in line]
    assert len(lines) == 1 and "2 test image(s) are byte-identical copies of train images" in lines[0]
    report = json.loads((out / "report.json").read_text())
    assert report["leakage"] == {"test_in_train": 2, "val_in_train": 0, "test_in_val": 0}
    assert "leakage: 2 test image(s)" in (out / "train.log").read_text()
    assert "2 test and 0 val image(s)" in (out / "report.html").read_text()


def test_no_leak_check_switches_it_off(three_digits):
    from conftest import tiny_cfg

    from spinal_transfer.cli import build_parser
    from spinal_transfer.config import given_flags
    from spinal_transfer.data.splits import scan
    from spinal_transfer.training.train import check_leakage

    args = build_parser("train").parse_args(["train", "--data", str(three_digits), "--no-leak-check"])
    assert given_flags(args)["leak_check"] is False
    assert "leak_check" not in given_flags(build_parser("train").parse_args(["train", "--data", str(three_digits)]))
    splits = scan(three_digits)
    assert check_leakage(tiny_cfg(three_digits, "unused", leak_check=False), splits) is None
    assert check_leakage(tiny_cfg(three_digits, "unused"), splits) == {"test_in_train": 0, "val_in_train": 0,
                                                                        "test_in_val": 0}
