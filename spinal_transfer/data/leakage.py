"""Exact duplicates across splits: a test (or val) image whose file is byte-identical to a train image, or a test
image identical to a val image (val picks the best epoch, so test would then partly score the selection set).

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


def duplicates_of(reference: Sequence[Sample], held_out: Sequence[Sample]) -> list[tuple[str, str]]:
    """(held-out path, a `reference` path with the same bytes) for every held-out file that has a byte-identical
    copy in `reference`. Only files whose size matches a reference file's are hashed."""
    ref_sizes, held_sizes = _sizes(p for p, _ in reference), _sizes(p for p, _ in held_out)
    shared = set(ref_sizes.values()) & set(held_sizes.values())
    if not shared:
        return []
    by_hash: dict[str, str] = {}
    for p, size in ref_sizes.items():
        if size in shared:
            by_hash.setdefault(file_hash(p), p)
    found = []
    for p, size in held_sizes.items():
        if size in shared:
            twin = by_hash.get(file_hash(p))
            if twin is not None:
                found.append((p, twin))
    return found


PAIRS = (("test", "train"), ("val", "train"), ("test", "val"))     # (held out, the split it must not copy)


def leakage(splits: dict[str, Sequence[Sample]]) -> dict[str, int]:
    """{test_in_train: n, val_in_train: n, test_in_val: n}: how many images of a held-out split also appear, byte
    for byte, in train (or test images in val) (what report.json records)."""
    return {f"{held}_in_{ref}": len(duplicates_of(splits.get(ref, []), splits.get(held, []))) for held, ref in PAIRS}


def describe(counts: dict[str, int]) -> str:
    """The one line `train` prints when held-out images are copies of train (or test of val) images ('' when
    none are)."""
    parts = [f"{counts[f'{held}_in_{ref}']} {held} image(s) are byte-identical copies of {ref} images"
             for held, ref in PAIRS if counts.get(f"{held}_in_{ref}")]
    if not parts:
        return ""
    inflated = counts.get("test_in_train") or counts.get("test_in_val")
    effect = "the test score is inflated" if inflated else "selection on val is biased"
    return (f"leakage: {'; '.join(parts)}, so {effect}; remove the copies (recorded in report.json; --no-leak-check "
            f"skips this check)")
