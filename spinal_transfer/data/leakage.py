"""Exact duplicates across splits: a test (or val) image whose file is byte-identical to a train image.

Such a copy inflates the test score without any error, so `train` checks for it before training. The check is
cheap: only files whose size equals that of a train file can be identical, so only those are read and hashed
(blake2b of the bytes); on a folder without duplicates that is nearly no file at all. Re-encoded or resized
copies are not exact duplicates: `audit` finds those from features.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable, Sequence

Sample = tuple[str, int]
HELD_OUT = ("val", "test")


def file_hash(path: str) -> str:
    """blake2b of a file's bytes (hex): equal for byte-identical files, whatever their names."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, hashlib.blake2b).hexdigest()


def _sizes(paths: Iterable[str]) -> dict[str, int]:
    out = {}
    for p in paths:
        try:
            out[p] = os.stat(p).st_size
        except OSError:          # gone since the scan: the loaders report it as skipped
            continue
    return out


def duplicates_of_train(train: Sequence[Sample], held_out: Sequence[Sample]) -> list[tuple[str, str]]:
    """(held-out path, a train path with the same bytes) for every held-out file that has a byte-identical
    copy in `train`. Only files whose size matches a train file's are hashed."""
    train_sizes, held_sizes = _sizes(p for p, _ in train), _sizes(p for p, _ in held_out)
    shared = set(train_sizes.values()) & set(held_sizes.values())
    if not shared:
        return []
    by_hash: dict[str, str] = {}
    for p, size in train_sizes.items():
        if size in shared:
            by_hash.setdefault(file_hash(p), p)
    found = []
    for p, size in held_sizes.items():
        if size in shared:
            twin = by_hash.get(file_hash(p))
            if twin is not None:
                found.append((p, twin))
    return found


def leakage(splits: dict[str, Sequence[Sample]]) -> dict[str, int]:
    """{test_in_train: n, val_in_train: n}: how many test and val images also appear, byte for byte, in train
    (what report.json records)."""
    return {f"{name}_in_train": len(duplicates_of_train(splits["train"], splits.get(name, [])))
            for name in reversed(HELD_OUT)}


def describe(counts: dict[str, int]) -> str:
    """The one line `train` prints when held-out images are copies of train images ('' when none are)."""
    parts = [f"{counts[f'{n}_in_train']} {n}" for n in reversed(HELD_OUT) if counts.get(f"{n}_in_train")]
    if not parts:
        return ""
    return (f"leakage: {' and '.join(parts)} image(s) are byte-identical copies of train images, so "
            f"{'the test score is inflated' if counts.get('test_in_train') else 'selection on val is biased'}; "
            f"remove the copies (recorded in report.json; --no-leak-check skips this check)")
