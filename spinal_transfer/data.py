"""Image folders -> labelled splits -> robust decoding -> batches that survive bad files.

Layouts: ROOT/{train,val,test}/<class>/... (aliases below) or flat ROOT/<class>/...; images may sit
at any depth inside a class folder. Classes are the class-folder names in plain Python `sorted()`
order (so "B" < "a" and "10" < "2"); label i is classes[i]. A missing val/test split is carved out
of train with a stratified, seeded split that is saved to the run directory and reused on reruns.

Files are only header-checked up front (cheap); full-decode failures surface at load time as
`BadSample`s that `collate_skip_bad` moves out of the batch, so one bad file never kills an epoch.
"""
from __future__ import annotations

import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple, Optional, Union

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight
from torch.utils.data import Dataset, default_collate

log = logging.getLogger(__name__)

# DataLoader workers are already one process per core; cv2's own thread pool would oversubscribe.
cv2.setNumThreads(0)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLIT_ALIASES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
_JUNK = {"__MACOSX", "Thumbs.db", "desktop.ini"}
SPLITS_FILE, CLASSES_FILE, SKIPPED_FILE = "splits.json", "classes.json", "skipped_files.txt"

Sample = tuple[str, int]
PathLike = Union[str, os.PathLike]


class DataError(ValueError):
    """A problem with the user's data folder, worded so the user can fix it."""


class BadImage(Exception):
    """A file that cannot be decoded into an image; the message says why."""


class BadSample(NamedTuple):
    """Returned by ImageDataset in place of (tensor, label) so the batch, not the epoch, absorbs it."""

    path: str
    reason: str


@dataclass
class Splits:
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    # per split: {"kind": "folder", "path": ...} or {"kind": "generated", "from": ..., "fraction": ..., "seed": ...};
    # "notes": human-readable remarks (e.g. classes too small to stratify).
    source: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Decoding

def _open(fp: BinaryIO) -> Image.Image:
    """Lazy PIL open (header only) that turns every failure, including the decompression-bomb
    warning zone (> MAX_IMAGE_PIXELS, below PIL's own hard error at 2x), into BadImage."""
    if fp.seek(0, os.SEEK_END) == 0:
        raise BadImage("empty file (0 bytes)")
    fp.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(fp)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImage(f"exceeds the decompression-bomb bound (PIL.Image.MAX_IMAGE_PIXELS="
                       f"{Image.MAX_IMAGE_PIXELS}): {e}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except Exception as e:  # PIL raises many types for malformed headers
        raise BadImage(f"unreadable image header: {type(e).__name__}: {e}") from None


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    """Decode with PIL: EXIF orientation; 16-bit keeps its high byte (as PIL's 16-bit RGB PNG reader
    and cv2 do); alpha and palette transparency are composited onto white (transparent backgrounds
    become white, not whatever colour hides under alpha=0); CMYK etc. via PIL's convert."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode == "I":
        high = np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8
        return np.repeat(high.astype(np.uint8)[:, :, None], 3, axis=2)
    if "A" in im.mode or "a" in im.mode or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    return np.array(im.convert("RGB"))


# libjpeg's scaled decoding (1/8, 1/4, 1/2 of each side, in the DCT domain), largest first
_REDUCED = ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4), (2, cv2.IMREAD_REDUCED_GRAYSCALE_2))


def _jpeg_flags(size: tuple[int, int], min_size: Optional[int]) -> int:
    """cv2 flags decoding a JPEG of `size` as small as possible with its shorter side >= min_size."""
    short = min(size)
    for r, reduced in _REDUCED:
        if min_size and short // r >= min_size:
            return reduced | cv2.IMREAD_COLOR_RGB     # the REDUCED_GRAYSCALE bit is the scale; RGB the colour
    return cv2.IMREAD_COLOR_RGB


def load_image(path: PathLike, min_size: Optional[int] = None) -> np.ndarray:
    """HxWx3 uint8 RGB, or BadImage saying why not.

    Plain 8-bit RGB/greyscale JPEG and PNG (the bulk of any dataset) are decoded by OpenCV, which is
    faster than PIL and applies EXIF orientation the same way; every other mode goes through PIL.
    A JPEG without its end marker goes through PIL too, because cv2 silently grey-fills truncation.

    `min_size`: the shorter side the caller needs. A JPEG at least twice that is decoded at 1/2, 1/4
    or 1/8 scale (libjpeg's DCT-domain scaling, as PIL's `draft`), never below `min_size`: for a
    phone photo fed to a 224-px model, a fraction of the decoding and resizing, and only detail that
    the pipeline's own antialiased downscale would have removed is lost.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadImage(f"cannot read file: {e}") from None
    im = _open(io.BytesIO(data))
    fast = (im.mode in ("RGB", "L") and "transparency" not in im.info
            and (im.format == "PNG" or (im.format == "JPEG" and data.endswith(b"\xff\xd9"))))
    if fast:
        flags = _jpeg_flags(im.size, min_size) if im.format == "JPEG" else cv2.IMREAD_COLOR_RGB
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        if arr is not None:
            return arr
    try:
        return _pil_to_rgb(im)
    except Exception as e:  # truncated/corrupt streams raise OSError, SyntaxError, ValueError, ...
        raise BadImage(f"corrupt or truncated image: {type(e).__name__}: {e}") from None


def check_image_header(path: PathLike) -> Optional[str]:
    """Cheap up-front check (header only, no decode): None if plausible, else the reason to skip."""
    try:
        with open(path, "rb") as fp:
            _open(fp).close()
    except BadImage as e:
        return str(e)
    except OSError as e:
        return f"cannot read file: {e}"
    return None


# ------------------------------------------------------------------------------------------------
# Folder scanning

def _hidden(name: str) -> bool:
    """Dot-files/folders (.DS_Store, .ipynb_checkpoints, ...) and OS junk are never classes or samples."""
    return name.startswith(".") or name in _JUNK


def _walk_files(folder: Path) -> list[Path]:
    """Every non-hidden file below `folder`, recursively, sorted by path."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        out += [Path(dirpath, f) for f in filenames if not _hidden(f)]
    return sorted(out)


def _subdirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not _hidden(p.name))


def list_images(paths: list[PathLike]) -> list[str]:
    """Files as given, folders expanded to their images (recursive, sorted, hidden skipped)."""
    out: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += [str(f) for f in _walk_files(p) if f.suffix.lower() in IMG_EXTENSIONS]
        elif p.is_file():
            out.append(str(p))
        else:
            raise DataError(f"{p}: no such file or folder")
    return list(dict.fromkeys(out))


def _scan_split(folder: Path) -> tuple[list[str], dict[str, list[str]], list[tuple[str, str]]]:
    """Classes of one split folder and their header-checked images; skipped files with reasons."""
    classes = _subdirs(folder)
    images: dict[str, list[str]] = {}
    skipped: list[tuple[str, str]] = []
    for c in classes:
        images[c] = []
        for f in _walk_files(folder / c):
            reason = (None if f.suffix.lower() in IMG_EXTENSIONS
                      else f"extension {f.suffix or '(none)'!r} is not an image extension")
            reason = reason or check_image_header(f)
            if reason:
                skipped.append((str(f), reason))
            else:
                images[c].append(str(f))
    return classes, images, skipped


def _find_split_dirs(root: Path) -> dict[str, Path]:
    """{"train": ROOT/train, ...} for the split folders present (aliases allowed, one per split)."""
    names = set(_subdirs(root))
    found: dict[str, Path] = {}
    for split, aliases in SPLIT_ALIASES.items():
        hits = [a for a in aliases if a in names]
        if len(hits) > 1:
            raise DataError(f"{root}: both {' and '.join(hits)} exist; keep one folder for the {split} split")
        if hits:
            found[split] = root / hits[0]
    if found and "train" not in found:
        raise DataError(f"{root}: found {', '.join(p.name for p in found.values())}/ but no train/ folder")
    return found


def _check_classes(classes: dict[str, list[str]]) -> None:
    """Every folder split must list the same classes as train (a label must mean one thing)."""
    ref = set(classes["train"])
    problems = []
    for split, cls in classes.items():
        missing, extra = sorted(ref - set(cls)), sorted(set(cls) - ref)
        if missing or extra:
            problems.append(f"  {split}: missing {missing or 'none'}, extra {extra or 'none'}")
    if problems:
        raise DataError("class folders differ between splits (compared with train):\n" + "\n".join(problems))


# ------------------------------------------------------------------------------------------------
# Generated splits

def _holdout(samples: list[Sample], fraction: float, seed: int, name: str,
             notes: list[str]) -> tuple[list[Sample], list[Sample]]:
    """Stratified (rest, held_out). Classes with a single image stay in rest (they cannot be split);
    if the held-out set is too small to hold every class once, the split is made unstratified."""
    if fraction <= 0 or not samples:
        return samples, []
    labels = np.array([y for _, y in samples])
    counts = np.bincount(labels)
    single = counts[labels] < 2
    if single.any():
        notes.append(f"{name}: {int(single.sum())} class(es) with a single image kept in train only")
    pool = [s for s, one in zip(samples, single) if not one]
    kept = [s for s, one in zip(samples, single) if one]
    if len(pool) < 2:
        return samples, []
    try:
        rest, held = train_test_split(pool, test_size=fraction, random_state=seed,
                                      stratify=[y for _, y in pool])
    except ValueError as e:  # e.g. fewer held-out slots than classes
        notes.append(f"{name}: stratified split impossible ({e}); used a plain random split")
        rest, held = train_test_split(pool, test_size=fraction, random_state=seed)
    return sorted(kept + rest), sorted(held)


def _generate(splits: dict[str, list[Sample]], source: dict, val_fraction: float, test_fraction: float,
              seed: int) -> None:
    """Fill missing val/test from train, in place. Fractions are of the images in train/ (when both
    are missing, test is taken first and val's fraction is rescaled so both are of that total)."""
    wanted = {"val": val_fraction, "test": test_fraction}
    fractions = [f for s, f in wanted.items() if s not in splits]
    if any(not 0 <= f < 1 for f in fractions) or sum(fractions) >= 1:
        raise DataError(f"val_fraction={val_fraction}, test_fraction={test_fraction}: the fractions carved "
                        f"out of train must each be in [0, 1) and leave some images for training")
    notes = source.setdefault("notes", [])
    total = len(splits["train"])
    if "test" not in splits:
        splits["train"], splits["test"] = _holdout(splits["train"], test_fraction, seed, "test", notes)
        source["test"] = {"kind": "generated", "from": "train", "fraction": test_fraction, "seed": seed}
    if "val" not in splits:
        frac = val_fraction * total / max(len(splits["train"]), 1)
        splits["train"], splits["val"] = _holdout(splits["train"], frac, seed, "val", notes)
        source["val"] = {"kind": "generated", "from": "train", "fraction": val_fraction, "seed": seed}
    for n in notes:
        log.warning(n)


def _save_splits(run_dir: Path, root: Path, s: Splits) -> None:
    rel = {k: [[os.path.relpath(p, root), y] for p, y in getattr(s, k)] for k in ("train", "val", "test")}
    doc = {"root": str(root), "classes": s.classes, "splits": rel, "source": s.source}
    (run_dir / SPLITS_FILE).write_text(json.dumps(doc, indent=1))


def _load_splits(path: Path, root: Path, val_fraction: float, test_fraction: float, seed: int) -> Splits:
    """The saved split, after checking it was made with the same settings and its files still exist."""
    doc = json.loads(path.read_text())
    for split, frac in (("val", val_fraction), ("test", test_fraction)):
        src = doc["source"].get(split, {})
        if src.get("kind") == "generated" and (src["fraction"], src["seed"]) != (frac, seed):
            raise DataError(f"{path} holds a {split} split made with fraction={src['fraction']} seed={src['seed']}, "
                            f"but this run asks for fraction={frac} seed={seed}; use a new run directory "
                            f"or delete {path.name}")
    out = {k: [(str(root / p), int(y)) for p, y in v] for k, v in doc["splits"].items()}
    missing = [p for v in out.values() for p, _ in v if not os.path.exists(p)]
    if missing:
        shown = "\n  ".join(missing[:20]) + (f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise DataError(f"{path} lists {len(missing)} file(s) that no longer exist under {root}:\n  {shown}\n"
                        f"restore them or start a new run directory")
    source = dict(doc["source"], reused=str(path))
    return Splits(doc["classes"], out["train"], out["val"], out["test"], [], source)


# ------------------------------------------------------------------------------------------------

def resolve_splits(root: PathLike, run_dir: Optional[PathLike] = None, val_fraction: float = 0.1,
                   test_fraction: float = 0.1, seed: int = 0) -> Splits:
    """Labelled train/val/test lists for a data folder (see the module docstring for layouts).

    With `run_dir`, classes.json is written, skipped files go to skipped_files.txt, and a generated
    split is saved as splits.json, which a rerun with the same run_dir reuses verbatim.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"{root}: no such data folder")
    run = Path(run_dir) if run_dir is not None else None
    if run is not None and (run / SPLITS_FILE).exists():
        s = _load_splits(run / SPLITS_FILE, root, val_fraction, test_fraction, seed)
        (run / CLASSES_FILE).write_text(json.dumps(s.classes, indent=1))
        return s

    dirs = _find_split_dirs(root) or {"train": root}
    classes: dict[str, list[str]] = {}
    images: dict[str, dict[str, list[str]]] = {}
    skipped: list[tuple[str, str]] = []
    for split, folder in dirs.items():
        classes[split], images[split], sk = _scan_split(folder)
        skipped += sk
    if not classes["train"]:
        raise DataError(f"{dirs['train']}: no class folders found; expected ROOT/<class>/<image> "
                        f"or ROOT/train/<class>/<image>")
    _check_classes(classes)
    empty = [os.path.relpath(dirs[s] / c, root) for s in images for c, v in images[s].items() if not v]
    if empty:
        raise DataError(f"class folder(s) under {root} without a usable image: {', '.join(empty)}"
                        + (f" (see the {len(skipped)} skipped file(s))" if skipped else ""))

    cls = classes["train"]
    splits = {s: [(p, i) for i, c in enumerate(cls) for p in images[s][c]] for s in images}
    source: dict = {s: {"kind": "folder", "path": str(d)} for s, d in dirs.items()}
    generated = not {"val", "test"} <= splits.keys()
    if generated:
        _generate(splits, source, val_fraction, test_fraction, seed)
    if skipped:
        log.warning("%d file(s) under %s skipped (not readable images)", len(skipped), root)
    result = Splits(cls, splits["train"], splits["val"], splits["test"], skipped, source)
    if run is not None:
        run.mkdir(parents=True, exist_ok=True)
        (run / CLASSES_FILE).write_text(json.dumps(cls, indent=1))
        write_skipped(run, skipped)
        if generated:
            _save_splits(run, root, result)
    return result


def write_skipped(run_dir: PathLike, skipped: list[tuple[str, str]]) -> None:
    """Merge (path, reason) pairs into run_dir/skipped_files.txt (tab-separated), one line per path;
    called once after scanning and again by the training loop with load-time failures."""
    path = Path(run_dir) / SKIPPED_FILE
    known: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            p, _, r = line.rpartition("\t")
            known[p] = r
    new = {p: " ".join(r.split()) for p, r in skipped if p not in known}
    if new or not path.exists():
        known.update(new)
        path.write_text("".join(f"{p}\t{r}\n" for p, r in known.items()))


# ------------------------------------------------------------------------------------------------
# Dataset, batching, class balance

class ImageDataset(Dataset):
    """(path, label) list -> (CHW float tensor, label) via an albumentations pipeline ending in a tensor;
    an undecodable file yields a BadSample instead of raising. Large JPEGs are decoded no larger than
    the transform's `decode_min_size` (see load_image and transforms.build_transforms)."""

    def __init__(self, samples: list[Sample], transform) -> None:
        self.samples = samples
        self.transform = transform
        self.min_size: Optional[int] = getattr(transform, "decode_min_size", None)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            image = load_image(path, self.min_size)
        except BadImage as e:
            return BadSample(path, str(e))
        return self.transform(image=image)["image"], label


def collate_skip_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """(images, labels, bad) with BadSamples moved to `bad` as (path, reason), so they travel back from
    worker processes for logging. With no good sample: images is an empty (0,) float tensor."""
    bad = [(b.path, b.reason) for b in batch if isinstance(b, BadSample)]
    good = [b for b in batch if not isinstance(b, BadSample)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    images, labels = default_collate(good)
    return images, labels, bad


def class_counts(samples: list[Sample], num_classes: int) -> np.ndarray:
    return np.bincount(np.array([y for _, y in samples], dtype=np.int64), minlength=num_classes)


def balanced_sample_weights(samples: list[Sample], num_classes: int) -> torch.Tensor:
    """Per-sample weight 1/count(class) for WeightedRandomSampler: every class is drawn equally often."""
    labels = np.array([y for _, y in samples], dtype=np.int64)
    return torch.from_numpy(1.0 / np.bincount(labels, minlength=num_classes)[labels])


def class_weights(samples: list[Sample], num_classes: int) -> torch.Tensor:
    """sklearn's 'balanced' loss weights n / (k * count); a class absent from `samples` gets 1.0
    (it never is a target, and 1.0 leaves label-smoothing terms unscaled)."""
    labels = np.array([y for _, y in samples], dtype=np.int64)
    present = np.unique(labels)
    w = np.ones(num_classes)
    w[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.tensor(w, dtype=torch.float32)
