"""Data folders, decoding, bad-file survival, transforms and the backbone's input settings."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import XMP, save_oriented, write_digits_folder
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from spinal_transfer.data.augment import Augmentation
from spinal_transfer.data.images import BadImage, check_image_header, decode_image, load_image
from spinal_transfer.data.loaders import (
    BadSample,
    ImageDataset,
    balanced_sample_weights,
    class_counts,
    class_weights,
    collate,
)
from spinal_transfer.data.skiplog import SkipLog
from spinal_transfer.data.splits import SPLIT_ALIASES, SPLIT_NAMES, list_images, load_recorded, record, scan
from spinal_transfer.data.transforms import DataConfig, build_transforms, transform_signature
from spinal_transfer.errors import DataError
from spinal_transfer.models.preprocess import resolve_data_config

RNG = np.random.default_rng(0)


def _smooth(h: int, w: int) -> np.ndarray:
    """A photo-like (low-frequency) RGB image, so JPEG artefacts stay small."""
    return cv2.resize(RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)


def _png(path: Path, h: int = 16, w: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_smooth(h, w)).save(path)
    return path


def _labels_match_folders(samples, classes) -> bool:
    return all(classes[y] in Path(p).parts for p, y in samples)


# ------------------------------------------------------------------------------------------------
# Layouts and splits

def test_three_split_layout(digits_folder):
    s = scan(digits_folder)
    assert s.classes == [f"digit_{k}" for k in range(10)]
    for split in ("train", "val", "test"):
        files = sorted(str(p) for p in (digits_folder / split).rglob("*.png"))
        assert sorted(p for p, _ in getattr(s, split)) == files
        assert _labels_match_folders(getattr(s, split), s.classes)
        assert s.source[split]["kind"] == "folder"
    assert s.skipped == []


def test_flat_layout_generates_recorded_stratified_split_and_reuses_it(tmp_path):
    root = write_digits_folder(tmp_path / "flat", digits=(0, 1, 2), size=8, splits=())
    s = scan(root, val_fraction=0.2, test_fraction=0.1, seed=3)
    all_files = sorted(str(p) for p in root.rglob("*.png"))
    parts = [p for split in (s.train, s.val, s.test) for p, _ in split]
    assert sorted(parts) == all_files  # disjoint and complete
    assert _labels_match_folders(s.train + s.val + s.test, s.classes)
    n = len(all_files)
    assert abs(len(s.test) - 0.1 * n) <= 2 and abs(len(s.val) - 0.2 * n) <= 2  # fractions of the whole
    for split in (s.val, s.test):  # stratified: every class keeps its share
        share = class_counts(split, 3) / len(split)
        np.testing.assert_allclose(share, class_counts(s.train + s.val + s.test, 3) / n, atol=0.03)
    assert s.source["val"] == {"kind": "generated", "from": "train", "fraction": 0.2, "seed": 3}
    saved = json.loads(json.dumps(record(s)))            # what splits.json holds
    assert saved["classes"] == s.classes and not Path(saved["splits"]["val"][0][0]).is_absolute()
    first = saved["splits"]["train"][0]
    assert first[2:] == [Path(root / first[0]).stat().st_size, Path(root / first[0]).stat().st_mtime_ns]

    _png(root / "digit_0" / "zz_new.png")  # read back, the record does not reshuffle, even if the folder grew
    again = load_recorded(saved, root)
    assert (again.train, again.val, again.test, again.classes) == (s.train, s.val, s.test, s.classes)
    moved = tmp_path / "moved"
    root.rename(moved)                      # a moved data folder: same files, found by their relative paths
    assert [Path(p).name for p, _ in load_recorded(saved, moved).val] == [Path(p).name for p, _ in s.val]
    gone = moved / Path(s.val[0][0]).relative_to(root)
    gone.unlink()
    with pytest.raises(DataError, match=gone.name):
        load_recorded(saved, moved)
    with pytest.raises(DataError, match=gone.name):
        load_recorded(saved, moved, needed=("train", "val"))


def test_a_file_gone_from_a_split_not_needed_is_dropped_from_it_with_one_warning(tmp_path, caplog):
    """`load_recorded(needed=...)`: a gone file of a split the caller does not read (a train image, for `evaluate
    --split test`) is dropped from it and said once; it was refused whatever the caller read."""
    root = write_digits_folder(tmp_path / "d", digits=(0, 1), size=8)
    s = scan(root)
    saved = json.loads(json.dumps(record(s)))
    for p, _ in s.train[:2] + s.val[:1]:
        Path(p).unlink()
    got = load_recorded(saved, root, needed=("test",))
    assert got.test == s.test and got.train == s.train[2:] and got.val == s.val[1:]
    said = [r.getMessage() for r in caplog.records if "not used here" in r.getMessage()]
    assert len(said) == 1 and "3 file(s) the run recorded are gone" in said[0], said
    assert "2 of the train split, 1 of the val split" in said[0]


def test_train_plus_valid_alias_generates_only_test(tmp_path):
    root = write_digits_folder(tmp_path / "d", digits=(3, 4), size=8, splits=("train", "val"))
    (root / "val").rename(root / "valid")
    s = scan(root, test_fraction=0.25)
    assert sorted(p for p, _ in s.val) == sorted(str(p) for p in (root / "valid").rglob("*.png"))
    assert s.source["val"]["kind"] == "folder" and s.source["test"]["kind"] == "generated"
    train_files = {str(p) for p in (root / "train").rglob("*.png")}
    assert {p for p, _ in s.train + s.test} == train_files
    assert abs(len(s.test) - 0.25 * len(train_files)) <= 1


def test_a_fraction_the_folder_does_not_use_is_named_once(tmp_path, caplog):
    """--val-fraction carves nothing from a folder with val/ (its own val split): one warning line says so; the
    test fraction, which carves test/ there, and a default fraction are not named."""
    from conftest import tiny_cfg

    from spinal_transfer.data.splits import config_splits

    root = write_digits_folder(tmp_path / "d", digits=(3, 4), size=8, splits=("train", "val"))
    with caplog.at_level("WARNING", logger="spinal_transfer"):
        s = config_splits(tiny_cfg(root, tmp_path / "run", val_fraction=0.3, test_fraction=0.25))
    unused = [r.getMessage() for r in caplog.records if "is not used" in r.getMessage()]
    assert unused == [f"val_fraction=0.3 is not used: {root} has its own val/ folder, which is the val split"]
    assert sorted(p for p, _ in s.val) == sorted(str(p) for p in (root / "val").rglob("*.png"))
    caplog.clear()
    with caplog.at_level("WARNING", logger="spinal_transfer"):
        config_splits(tiny_cfg(root, tmp_path / "run"))
    assert not [r for r in caplog.records if "is not used" in r.getMessage()]


@pytest.mark.parametrize("names", [("Train", "Val", "Test"), ("TRAINING", "Validation", "Testing")])
def test_split_folders_in_any_case_are_splits_not_classes(tmp_path, names):
    """Train/Val/Test (or Kaggle's Training/Testing) read as classes would train on the test images."""
    root = write_digits_folder(tmp_path / "d", digits=(3, 4), size=8)
    for split, name in zip(SPLIT_NAMES, names):
        (root / split).rename(root / name)
    s = scan(root)
    assert s.classes == ["digit_3", "digit_4"]
    for split, name in zip(SPLIT_NAMES, names):
        assert sorted(p for p, _ in s.get(split)) == sorted(str(p) for p in (root / name).rglob("*.png"))
    (root / "extra").mkdir()            # a folder beside the splits is not read, and the note says what is
    note = next(n for n in scan(root).source["notes"] if "not read: extra/" in n)
    assert all(f"{a}/" in note for aliases in SPLIT_ALIASES.values() for a in aliases), note
    (root / "train").mkdir()            # train/ beside Train/: which one is meant is not guessed
    with pytest.raises(DataError, match=f"both {names[0]} and train exist"):
        scan(root)


def test_tiny_classes_do_not_crash_the_split(tmp_path):
    for i in range(6):
        _png(tmp_path / "d" / "big" / f"{i}.png")
    _png(tmp_path / "d" / "pair" / "0.png"), _png(tmp_path / "d" / "pair" / "1.png")
    _png(tmp_path / "d" / "single" / "0.png")
    s = scan(tmp_path / "d", val_fraction=0.2, test_fraction=0.2)
    assert sorted(p for p, _ in s.train + s.val + s.test) == sorted(str(p) for p in (tmp_path / "d").rglob("*.png"))
    single = s.classes.index("single")
    assert [y for _, y in s.train].count(single) == 1
    for split in ("val", "test"):       # every class a held-out split lacks is named in one note for that split
        absent = sorted(set(s.classes) - {s.classes[y] for _, y in s.get(split)})
        notes = [n for n in s.source["notes"] if n.startswith(f"{split}: ")]
        assert "single" in absent and len(notes) == 1
        named = re.findall(r"(\w+) \(\d+ images?\)", notes[0])
        assert named == absent and f"{len(absent)} class(es) have no {split} image" in notes[0]


def test_class_mismatch_names_missing_and_extra(tmp_path):
    for c in ("cat", "dog", "fox"):
        _png(tmp_path / "train" / c / "a.png")
    for c in ("cat", "dog", "owl"):
        _png(tmp_path / "val" / c / "a.png")
    for c in ("cat", "dog", "fox"):
        _png(tmp_path / "test" / c / "a.png")
    with pytest.raises(DataError) as e:
        scan(tmp_path)
    msg = str(e.value)
    assert "val: missing ['fox'], extra ['owl']" in msg and "test:" not in msg and "Unicode" not in msg


def test_an_empty_train_class_folder_is_named_as_empty_not_as_a_class_the_others_lack(tmp_path):
    """QA 28: an empty train/7 beside val/ and test/ without 7/ was refused as "val: missing ['7'] ... test:
    missing ['7']", while an empty val/2 is named as a folder without a usable image. The empty folder is the
    cause: it is named first, the same way in every split."""
    for split in ("train", "val", "test"):
        for c in ("1", "2"):
            _png(tmp_path / split / c / "a.png")
    (tmp_path / "train" / "7").mkdir()
    with pytest.raises(DataError) as e:
        scan(tmp_path)
    assert str(e.value) == (f"class folder(s) under {tmp_path} without a usable image: {Path('train') / '7'} (no "
                            f"image file); add images to each, or remove it from every split")


def test_a_class_name_in_two_unicode_forms_is_explained(tmp_path):
    nfc, nfd = "caf\u00e9", "cafe\u0301"               # how other systems and macOS write "café"
    for split, name in (("train", nfc), ("val", nfd), ("test", nfc)):
        for c in (name, "tea"):
            _png(tmp_path / split / c / "a.png")
    with pytest.raises(DataError, match="the same name in two Unicode forms, NFC and NFD"):
        scan(tmp_path)


def test_a_folder_to_evaluate_with_a_class_name_in_the_other_unicode_form_is_explained(tmp_path):
    from spinal_transfer.data.splits import labelled_images

    for c in ("cafe\u0301", "tea"):                    # written on macOS (NFD); the model's "café" is NFC
        _png(tmp_path / c / "a.png")
    with pytest.raises(DataError) as e:
        labelled_images(tmp_path, "test", ["caf\u00e9", "tea"])
    assert str(e.value).endswith("(café: the same name in two Unicode forms, NFC and NFD; rename the folders so the "
                                 "bytes match); move them out, or give a folder without them")


def test_a_class_named_like_a_split_folder_is_explained(tmp_path):
    for c in ("bus", "car", "train"):                   # vehicles: train/ is a class here, not the train split
        _png(tmp_path / c / "a.png")
    with pytest.raises(DataError) as e:
        scan(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'train'}: no class folders found; expected ROOT/<class>/<image> or "
                            f"ROOT/train/<class>/<image> ({tmp_path} also has bus/, car/: if train/ is one of the "
                            f"classes, rename it; a folder named like a split makes {tmp_path} a folder of split "
                            f"folders)")


def test_class_without_usable_image_is_named(tmp_path):
    _png(tmp_path / "cat" / "a.png")
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "dog" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "eel").mkdir()
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")      # unreadable, but not why dog or eel is empty
    with pytest.raises(DataError) as e:
        scan(tmp_path)
    assert str(e.value) == (f"class folder(s) under {tmp_path} without a usable image: dog (1 file(s) it cannot "
                            f"read, e.g. dog/broken.jpg: not an image (unrecognised format)); eel (no image "
                            f"file); add images to each, or remove it from every split")


def test_hidden_entries_ignored_nested_images_found_and_class_order_is_sorted(tmp_path):
    names = ["b", "A", "a", "10", "2"]
    for c in names:
        _png(tmp_path / c / "x.png")
    _png(tmp_path / "a" / "deeper" / "nest" / "y.png")
    for hidden in (".ipynb_checkpoints", "__MACOSX", ".cache"):
        _png(tmp_path / hidden / "x.png")  # never a class
        _png(tmp_path / "a" / hidden / "z.png")  # never a sample
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\0\0")
    (tmp_path / "a" / "Thumbs.db").write_bytes(b"\0\0")
    _png(tmp_path / "a" / ".hidden.png")
    s = scan(tmp_path, val_fraction=0, test_fraction=0)
    assert s.classes == sorted(names) == ["10", "2", "A", "a", "b"]
    a = s.classes.index("a")
    assert sorted(Path(p).name for p, y in s.train if y == a) == ["x.png", "y.png"]
    assert s.skipped == [] and s.val == [] and s.test == []
    assert list_images([tmp_path / "a"]) == [str(tmp_path / "a" / "deeper" / "nest" / "y.png"),
                                              str(tmp_path / "a" / "x.png")]


# ------------------------------------------------------------------------------------------------
# Bad files

def _bad_folder(root: Path) -> dict[str, Path]:
    """Good 16x16 images plus one of every kind of bad file, all in class folders."""
    good = [_png(root / c / f"good{i}.png") for c in ("a", "b") for i in range(4)]
    d = root / "a"
    bad = {"corrupt": d / "corrupt.jpg", "truncated": d / "truncated.jpg", "empty": d / "empty.png",
           "text": d / "text.png", "bomb": d / "bomb.png", "hard_bomb": root / "b" / "hard_bomb.png"}
    bad["corrupt"].write_bytes(b"\xff\xd8\xff\xe0 definitely not jpeg data" * 10)
    noise = RNG.integers(0, 256, (30, 30, 3), dtype=np.uint8)  # noisy: most bytes are scan data
    Image.fromarray(noise).save(bad["truncated"], quality=90)
    data = bad["truncated"].read_bytes()
    bad["truncated"].write_bytes(data[: len(data) * 2 // 3])
    bad["empty"].write_bytes(b"")
    bad["text"].write_text("hello, I am a text file\n")
    Image.fromarray(_smooth(40, 40)).save(bad["bomb"])  # 1600 px: PIL's warning zone with the bound below
    Image.fromarray(_smooth(50, 50)).save(bad["hard_bomb"])  # 2500 px > 2x bound: PIL's own error
    return {"good": good, **bad}


def test_every_kind_of_bad_file_is_skipped_and_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    files = _bad_folder(tmp_path / "data")
    bad = {k: v for k, v in files.items() if k != "good"}
    run = tmp_path / "run"

    s = scan(tmp_path / "data", val_fraction=0, test_fraction=0)
    reasons = dict(s.skipped)
    assert set(reasons) == {str(p) for k, p in bad.items() if k != "truncated"}  # header looks fine
    assert reasons[str(bad["empty"])] == "empty file (0 bytes)"
    assert "not an image" in reasons[str(bad["text"])]
    assert "decompression-bomb bound (Image size" in reasons[str(bad["bomb"])]
    assert "decompression-bomb bound (Image size" in reasons[str(bad["hard_bomb"])]

    # Feed everything (as if the header check had passed) through real worker processes.
    samples = [(str(p), 0) for p in files["good"]] + [(str(p), 1) for p in bad.values()]
    dc = resolve_data_config("timm/resnet18", "none", img_size=12, resize_size=14)
    ds = ImageDataset(samples, build_transforms(dc, train=True, aug=Augmentation("modern")))
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate)
    run.mkdir()
    skips = SkipLog(run / "skipped_files.txt")
    skips.add(s.skipped)
    n_good, seen = 0, []
    for x, y, idx in skips.watch(loader):
        assert x.shape[1:] == (3, 12, 12) or x.numel() == 0
        assert len(x) == len(y) == len(idx)
        assert all(samples[i][0] in map(str, files["good"]) for i in idx.tolist())   # indices name the files
        n_good += len(x)
        seen += idx.tolist()
    assert n_good == len(files["good"]) and sorted(seen) == list(range(len(files["good"])))
    assert set(skips.entries) == {str(p) for p in bad.values()}          # scan-time and load-time, once each
    assert "truncated" in skips.entries[str(bad["truncated"])]
    skips.sync()
    lines = (run / "skipped_files.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == sorted(str(p) for p in bad.values())
    assert len(SkipLog(run / "skipped_files.txt")) == len(bad)           # read back


def test_collate_with_only_bad_samples():
    x, y, idx, bad = collate([BadSample("a.jpg", "empty", 0), BadSample("b.jpg", "corrupt", 1)])
    assert x.numel() == 0 and y.dtype == idx.dtype == torch.long and bad == [("a.jpg", "empty"), ("b.jpg", "corrupt")]


# ------------------------------------------------------------------------------------------------
# Decoding

def _check(out: np.ndarray, expected: np.ndarray, atol: int = 0) -> None:
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.shape == expected.shape
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= atol


def test_grey_palette_and_alpha_modes(tmp_path):
    grey = RNG.integers(0, 256, (6, 9), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    _check(load_image(tmp_path / "l.png"), np.repeat(grey[:, :, None], 3, axis=2))

    idx = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    pal = Image.fromarray(idx, "P")
    pal.putpalette([10, 20, 30, 200, 0, 0, 0, 0, 250] + [0] * 759)
    pal.save(tmp_path / "p.png", transparency=0)  # index 0 is transparent -> white
    colours = np.array([[255, 255, 255], [200, 0, 0], [0, 0, 250]], dtype=np.uint8)
    _check(load_image(tmp_path / "p.png"), colours[idx])
    pal.save(tmp_path / "p.gif")
    _check(load_image(tmp_path / "p.gif"), np.array([[10, 20, 30], [200, 0, 0], [0, 0, 250]], np.uint8)[idx])

    rgba = np.concatenate([_smooth(5, 7), RNG.integers(0, 256, (5, 7, 1), dtype=np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    a = rgba[:, :, 3:] / 255.0
    _check(load_image(tmp_path / "rgba.png"), np.round(rgba[:, :, :3] * a + 255 * (1 - a)), atol=1)
    Image.fromarray(rgba[:, :, [0, 3]], "LA").save(tmp_path / "la.png")
    la = np.round(rgba[:, :, 0] * a[:, :, 0] + 255 * (1 - a[:, :, 0]))
    _check(load_image(tmp_path / "la.png"), np.repeat(la[:, :, None], 3, axis=2), atol=1)


def test_cmyk(tmp_path):
    cmyk = np.array([[[0, 255, 255, 0], [255, 0, 255, 0], [0, 0, 0, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    _check(load_image(tmp_path / "c.tif"), np.array([[[255, 0, 0], [0, 255, 0], [255, 255, 255], [0, 0, 0]]]))
    big = np.repeat(np.repeat(cmyk, 16, axis=0), 16, axis=1)
    Image.fromarray(big, "CMYK").save(tmp_path / "c.jpg", quality=95)
    out = load_image(tmp_path / "c.jpg")
    _check(out, np.array(Image.open(tmp_path / "c.jpg").convert("RGB")))
    assert out[8, 8].tolist() == pytest.approx([255, 0, 0], abs=8)


def test_16_bit_is_scaled_not_clipped(tmp_path):
    grey = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    _check(load_image(tmp_path / "g16.png"), np.repeat(np.array([[0, 0, 1, 128, 255]], np.uint8)[:, :, None], 3, 2))
    rgb = RNG.integers(0, 65536, (4, 5, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb[:, :, ::-1])
    _check(load_image(tmp_path / "rgb16.png"), (rgb >> 8).astype(np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_and_fast_path_equal_pil(tmp_path, fmt):
    img = _smooth(20, 32)
    plain = tmp_path / f"plain.{fmt.lower()}"
    Image.fromarray(img).save(plain, fmt, quality=95)
    base = np.array(Image.open(plain).convert("RGB"))
    _check(load_image(plain), base)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        p = tmp_path / f"o{orientation}.{fmt.lower()}"
        Image.fromarray(img).save(p, fmt, quality=95, exif=exif.tobytes())
        _check(load_image(p), np.array(ImageOps.exif_transpose(Image.open(p)).convert("RGB")))
    rotated = load_image(tmp_path / f"o6.{fmt.lower()}")  # 6: stored image must be turned 90 deg clockwise
    assert rotated.shape == (32, 20, 3)
    _check(rotated, np.rot90(base, k=-1))
    grey = tmp_path / f"grey.{fmt.lower()}"
    Image.fromarray(img[:, :, 0], "L").save(grey, fmt, quality=95)
    _check(load_image(grey), np.array(Image.open(grey).convert("RGB")))


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_an_orientation_only_in_xmp_is_applied_as_pillow_applies_it(tmp_path, suffix):
    """OpenCV reads EXIF's orientation only; Pillow's exif_transpose reads XMP's tiff:Orientation (attribute or element)
    where EXIF has none. Each of the 8 kept only in XMP decodes on OpenCV's path (file and bytes) to the pixels of the
    same orientation kept in EXIF, which are Pillow's; with both, EXIF's wins, as in Pillow."""
    img = Image.fromarray(_smooth(20, 32))
    for orientation in range(1, 9):
        in_exif = load_image(save_oriented(img, tmp_path / f"exif{orientation}{suffix}", orientation, "exif"))
        for form in ("xmp", "xmp-element"):
            p = save_oriented(img, tmp_path / f"{form}{orientation}{suffix}", orientation, form)
            _check(load_image(p), in_exif)
            _check(decode_image(p.read_bytes()), in_exif)
            _check(load_image(p), np.array(ImageOps.exif_transpose(Image.open(p)).convert("RGB")))
    assert load_image(tmp_path / f"xmp6{suffix}").shape == (32, 20, 3)
    both = tmp_path / "both.jpg"                      # upright in EXIF, turned in XMP: EXIF's word holds, as in Pillow
    exif = Image.Exif()
    exif[0x0112] = 1
    img.save(both, exif=exif.tobytes(), xmp=XMP.format(' tiff:Orientation="6"', "").encode())
    assert load_image(both).shape == (20, 32, 3)
    _check(load_image(both), np.array(ImageOps.exif_transpose(Image.open(both)).convert("RGB")))


def _photo_jpeg(path: Path, h: int, w: int, orientation: int = 1) -> Path:
    from sklearn.datasets import load_sample_images

    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(load_sample_images().images[1]).resize((w, h), Image.BICUBIC).save(
        path, "JPEG", quality=92, exif=exif.tobytes())
    return path


def test_large_jpeg_is_decoded_at_reduced_scale_no_smaller_than_asked(tmp_path):
    p = _photo_jpeg(tmp_path / "big.jpg", 700, 1000, orientation=6)       # stored 1000 wide, shown 700 wide
    full = load_image(p)
    assert full.shape == (1000, 700, 3)
    for min_size, shape in ((80, (125, 88, 3)), (200, (500, 350, 3)), (350, (500, 350, 3)), (351, (1000, 700, 3))):
        out = load_image(p, min_size)
        assert out.shape == shape, min_size                # 1/8, 1/2, 1/2, full: the largest reduction that fits
        small = cv2.resize(full, shape[1::-1], interpolation=cv2.INTER_AREA)
        assert np.abs(out.astype(int) - small).mean() < 3  # same picture, EXIF orientation applied
    png = tmp_path / "big.png"
    Image.fromarray(full).save(png)
    assert load_image(png, 80).shape == full.shape         # only JPEG has scaled decoding


def test_reduced_decode_leaves_the_pipeline_output_nearly_unchanged(tmp_path):
    p = _photo_jpeg(tmp_path / "photo.jpg", 600, 900)
    for augment, eval_resize, need in (("none", "center_crop", 110), ("none", "resize", 96), ("paper", "", 110),
                                       ("modern", "", 392), ("light", "", 188)):
        dc = DataConfig(96, 110, (0, 0, 0), (1, 1, 1), "bilinear", 96 / 110, eval_resize or "center_crop")
        tf = build_transforms(dc, train=augment != "none", aug=Augmentation(augment, hflip=0.0, rotation=0.0))
        assert tf.decode_min_size == need
        tf.set_random_seed(0)
        reduced = ImageDataset([(str(p), 0)], tf)[0][0]
        tf.set_random_seed(0)
        full = tf(image=load_image(p))["image"]
        assert reduced.shape == full.shape == (3, 96, 96)
        # a random crop's integer position rounds differently at half scale: a fraction of an output pixel's shift
        assert (reduced - full).abs().mean() * 255 < (2.0 if augment in ("none", "paper") else 4.0), augment


def test_load_image_errors(tmp_path, monkeypatch):
    (tmp_path / "e.jpg").write_bytes(b"")
    with pytest.raises(BadImage, match="empty"):
        load_image(tmp_path / "e.jpg")
    thin = tmp_path / "thin.png"              # 3 KB, but its resize would ask for gigabytes: refused at the header
    Image.new("L", (300_000, 1), 255).save(thin)
    assert "aspect ratio beyond 100:1" in check_image_header(thin)
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(grey.astype(np.int32)).save(tmp_path / "i32.tif")          # PIL mode I: 0..63 of 2**31
    Image.fromarray(grey.astype(np.float32) / 255, "F").save(tmp_path / "f.tif")  # mode F: 0..0.25
    for name, says in (("i32.tif", "32-bit integer pixels"), ("f.tif", "floating-point pixels")):
        with pytest.raises(BadImage, match=f"^{says} .*save the image with 8 or 16 bits"):   # not black, not guessed
            load_image(tmp_path / name)
        assert check_image_header(tmp_path / name).startswith(says)      # in the header: skipped by the scan
    deep = grey.astype(np.uint16) * 1000                 # a 16-bit PGM is mode I too, but 0-65535: read as a PNG's
    cv2.imwrite(str(tmp_path / "deep.pgm"), deep)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.pgm").mode == "I"
    assert np.array_equal(load_image(tmp_path / "deep.pgm"), load_image(tmp_path / "deep.png"))
    assert np.array_equal(load_image(tmp_path / "deep.pgm")[..., 0], (deep >> 8).astype(np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BadImage, match="decompression-bomb bound"):
        load_image(_png(tmp_path / "big.png", 12, 12))  # 144 px: the warning zone counts too


# ------------------------------------------------------------------------------------------------
# Class balance

def test_class_balance_helpers():
    samples = [("a", 0)] * 6 + [("b", 1)] * 2 + [("c", 3)]
    assert class_counts(samples, 4).tolist() == [6, 2, 0, 1]
    w = balanced_sample_weights(samples, 4)
    assert w[:6].sum().item() == pytest.approx(w[6:8].sum().item()) == pytest.approx(w[8].item())
    cw = class_weights(samples, 4)
    np.testing.assert_allclose(cw.numpy(), [9 / (3 * 6), 9 / (3 * 2), 1.0, 9 / 3], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Transforms and data config

@pytest.mark.parametrize("augment", ["modern", "paper", "none"])
@pytest.mark.parametrize("train", [True, False])
def test_transform_output(augment, train):
    dc = resolve_data_config("torchvision/resnet18", "none", img_size=24)
    out = build_transforms(dc, train, Augmentation(augment, vflip=0.5))(image=_smooth(37, 53))["image"]
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32


def test_normalization_matches_numpy_and_none_equals_eval():
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.3, 0.4]
    dc = resolve_data_config("timm/resnet18", "none", img_size=16, mean=mean, std=std, eval_resize="resize")
    img = _smooth(16, 16)
    out = build_transforms(dc, train=True)(image=img)["image"].numpy()           # policy "none"
    ref = ((img / 255.0 - np.array(mean)) / np.array(std)).transpose(2, 0, 1)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert transform_signature(build_transforms(dc, True)) == transform_signature(build_transforms(dc, False))
    big = _smooth(40, 60)
    crop = dataclasses.replace(dc, eval_resize="center_crop")
    a = build_transforms(crop, train=True)(image=big)["image"]
    assert torch.equal(a, build_transforms(crop, train=False)(image=big)["image"])


def test_paper_rotation_samples_nearest_pixels_like_torchvision():
    """The scripts' RandomRotation(15) samples the nearest pixel and fills with black: on a black-and-white
    image the rotated output holds only black and white, where bilinear sampling would mix greys."""
    dc = DataConfig(32, 32, (0, 0, 0), (1, 1, 1), "bilinear", 1.0)
    tf = build_transforms(dc, train=True, aug=Augmentation("paper", rotation=15.0, hflip=0.0))
    tf.set_random_seed(0)
    board = np.kron((np.indices((8, 8)).sum(0) % 2) * 255, np.ones((4, 4)))[:, :, None].repeat(3, 2).astype(np.uint8)
    outs = [np.rint(tf(image=board)["image"].numpy() * 255) for _ in range(5)]
    assert any(not np.array_equal(o, board.transpose(2, 0, 1)) for o in outs)       # it did rotate
    assert set(np.unique(np.concatenate(outs))) <= {0.0, 255.0}


def test_transform_signature_is_stable_and_sensitive():
    dc = resolve_data_config("torchvision/resnet18", "none")
    sig = transform_signature(build_transforms(dc))
    assert sig == transform_signature(build_transforms(resolve_data_config("torchvision/resnet18", "none")))
    assert sig != transform_signature(build_transforms(dataclasses.replace(dc, eval_resize="resize")))
    modern = Augmentation("modern")
    assert transform_signature(build_transforms(dc, True, modern)) != \
        transform_signature(build_transforms(dc, True, dataclasses.replace(modern, hflip=0.2)))


def test_data_config_from_timm():
    import timm
    import timm.data

    model = timm.create_model("test_vit", pretrained=False)
    ref = timm.data.resolve_model_data_config(model)
    for dc in (resolve_data_config("timm/test_vit", "none"), resolve_data_config("timm/resnet18", "none", model)):
        assert dc.img_size == ref["input_size"][1] and dc.mean == tuple(ref["mean"]) and dc.std == tuple(ref["std"])
        assert dc.interpolation == ref["interpolation"] and dc.crop_pct == ref["crop_pct"]
        assert dc.resize_size == round(dc.img_size / ref["crop_pct"])
    tagged = resolve_data_config("timm/resnet18", "tv_in1k")
    assert (tagged.interpolation, tagged.crop_pct) == ("bilinear", 0.875)


@pytest.mark.parametrize("weights", ["default", "IMAGENET1K_V2", "none"])
def test_data_config_from_torchvision_enum(weights):
    from torchvision.models import get_model_weights

    enum = get_model_weights("resnet50")
    t = (enum.DEFAULT if weights in ("default", "none") else enum[weights]).transforms()
    dc = resolve_data_config("torchvision/resnet50", weights)
    assert (dc.img_size, dc.resize_size) == (t.crop_size[0], t.resize_size[0])
    assert dc.mean == tuple(t.mean) and dc.std == tuple(t.std) and dc.interpolation == t.interpolation.value


def test_config_overrides_win_and_unknown_backbone_falls_back():
    over = dict(img_size=128, mean=[0.5, 0.5, 0.5], std=[0.25] * 3, interpolation="bicubic")
    dc = resolve_data_config("torchvision/resnet18", "none", **over)
    assert (dc.img_size, dc.mean, dc.std, dc.interpolation) == (128, (0.5,) * 3, (0.25,) * 3, "bicubic")
    assert dc.resize_size == round(128 / dc.crop_pct)
    assert resolve_data_config("torchvision/resnet18", "none", **over, resize_size=150).resize_size == 150
    pdc = resolve_data_config("torchvision/resnet18", "default", img_size=64)
    assert pdc.resize_size == round(64 / pdc.crop_pct)
    fallback = resolve_data_config("somewhere/unknown", "none")
    assert (fallback.img_size, fallback.resize_size, fallback.interpolation) == (224, 256, "bilinear")


def test_list_images_keeps_broken_links_for_their_reason_and_counts_other_files(tmp_path, caplog):
    """What predict reads of a folder: a broken link with an image's name reaches the reader (and the skip
    list, with its reason); a .heic photo is not read, and a warning counts it instead of dropping it unsaid."""
    good = _png(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "in" / "sub").mkdir()
    (tmp_path / "in" / "sub" / "phone.heic").write_bytes(b"heic")
    with caplog.at_level("WARNING", logger="spinal_transfer"):
        listed = list_images([tmp_path / "in"])
    assert listed == [str(good), str(tmp_path / "in" / "gone.jpg")]
    assert any("1 file(s) under" in r.message and ".heic" in r.message for r in caplog.records)


def test_a_pipe_is_never_opened_and_is_named_not_left_out_unsaid(tmp_path, caplog, three_digits):
    """A named pipe (or socket, device) is not an image file: reading it would wait for a writer. Given by name
    it is refused as what it is (it said 'no such file or folder'); in a folder predict reads or a class folder
    train reads it is left out with a warning naming it (it was dropped without a word)."""
    import shutil

    good = _png(tmp_path / "in" / "a.png")
    os.mkfifo(tmp_path / "in" / "fifo.jpg")
    with caplog.at_level("WARNING", logger="spinal_transfer"):
        assert list_images([tmp_path / "in"]) == [str(good)]
    assert f"{tmp_path / 'in' / 'fifo.jpg'} is not a regular file (a pipe, socket or device); not used" in caplog.text
    with pytest.raises(DataError, match=r"fifo\.jpg: is not a regular file \(a pipe, socket or device\); give image "
                                        r"files or folders"):
        list_images([tmp_path / "in" / "fifo.jpg"])
    data = tmp_path / "data"
    shutil.copytree(three_digits, data)
    os.mkfifo(data / "train" / "digit_1" / "pipe.png")
    caplog.clear()
    with caplog.at_level("WARNING", logger="spinal_transfer"):
        splits = scan(data)
    assert "pipe.png is not a regular file" in caplog.text
    assert not any(p.endswith("pipe.png") for p, _ in splits.train)


def test_jpeg_files_named_jfif_or_jpe_are_images(tmp_path):
    """.jfif and .jpe are JPEG's other names (Windows saves web images as .jfif): read, not skipped as other files."""
    from skimage import data as skdata

    (tmp_path / "in").mkdir()
    for name in ("cat.jfif", "cat.jpe"):
        Image.fromarray(skdata.chelsea()).save(tmp_path / "in" / name, format="JPEG")
    assert list_images([tmp_path / "in"]) == [str(tmp_path / "in" / "cat.jfif"), str(tmp_path / "in" / "cat.jpe")]
    assert load_image(tmp_path / "in" / "cat.jfif").shape == skdata.chelsea().shape


def test_a_float_tiff_in_a_flat_folder_is_skipped_by_the_scan_not_carved_into_test(tmp_path):
    """QA 28: a floating-point TIFF passed the header check, the carving put it in test as the class's only test
    image, and the run was refused ("a class without an image that can be decoded in a split"). Its mode is in
    the header: the scan skips it with the reason, and the class keeps its decodable images in every split."""
    from spinal_transfer.data.splits import scan

    for c in ("a", "b"):
        for i in range(10):
            _png(tmp_path / "data" / c / f"{i}.png", 8, 8)
    Image.fromarray(np.ones((8, 8), np.float32), "F").save(tmp_path / "data" / "b" / "f.tif")
    s = scan(tmp_path / "data", val_fraction=0.1, test_fraction=0.1, seed=0)
    assert [(Path(p).name, why.split(" (")[0]) for p, why in s.skipped] == [("f.tif", "floating-point pixels")]
    assert all(Path(p).suffix == ".png" for split in (s.train, s.val, s.test) for p, _ in split)
    assert len(s.train) + len(s.val) + len(s.test) == 20


LOADER_ALIVE_AT_EXIT = """
import torch
from torch.utils.data import Dataset, SequentialSampler
from spinal_transfer.cli import exit_process
from spinal_transfer.data.loaders import make_loader

class Numbers(Dataset):
    def __init__(self, samples, transform):
        self.samples = samples
    def __len__(self):
        return len(self.samples)
    def __getitem__(self, i):
        return torch.zeros(1), 0, i

loader = make_loader([("x", 0)] * 8, None, 2, 2, torch.device("cpu"), SequentialSampler(range(8)),
                     dataset_class=Numbers)
batches = iter(loader)
next(batches)
exit_process(0)
"""


def test_a_command_ends_while_its_loader_workers_are_alive():
    """A command ends (exit_process, atexit) with persistent DataLoader workers still up, as `train` does:
    multiprocessing ends them with SIGTERM and waits. Workers that ignored SIGTERM (a worker_init_fn once did, to
    leave a group's signal to the main process) made that wait endless: README's first command hung after its
    report. Seconds here; a hang is cut at 120 s."""
    done = subprocess.run([sys.executable, "-c", LOADER_ALIVE_AT_EXIT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
