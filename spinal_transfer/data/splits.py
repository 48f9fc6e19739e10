"""Image folders -> labelled train/val/test file lists, recorded in the run so that they never change under it.

Layouts: ROOT/{train,val,test}/<class>/... (aliases below) or flat ROOT/<class>/...; images may sit at any
depth inside a class folder. Classes are the class-folder names in plain Python `sorted()` order (so "B" <
"a" and "10" < "2"); label i is classes[i]. A missing val/test split is carved out of train with a
stratified, seeded split.

Links: the data folder, its split and class folders may be symbolic links. Inside a class folder, a link (file or
folder) is followed only when it stays inside that class folder; a folder reached twice (a link loop) is read once
and reported. A link that leads elsewhere in the data folder (up, or into another class or split) is skipped and
listed: it would give images another label, or two. A link out of the data folder (an image store) is skipped and
listed too, unless --follow-links is given. Nothing is dropped silently: folders next to train/ that are not
read, image files outside any class folder and new files on resume are all reported.

A run's file lists are fixed at its start (`record`): every split's files with their sizes and modification
times (one stat each, cheap for a million files), and the classes. A resumed run and `evaluate RUN` use the
recorded lists (`load_recorded`); a data folder that changed since is reported (added, removed, modified),
and the run refuses only when files it needs are gone.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from ..errors import DataError, few, option_value
from ..utils.textfiles import encode_text
from .images import IMG_EXTENSIONS, check_image_header, first_readable
from .leakage import duplicates_of
from .skiplog import SkipLog

log = logging.getLogger("spinal_transfer")

SPLIT_ALIASES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
SPLIT_NAMES = ("train", "val", "test")
_JUNK = {"__MACOSX", "Thumbs.db", "desktop.ini"}
RECORD_VERSION = 2

Sample = tuple[str, int]
PathLike = Union[str, os.PathLike]


FOLDER_KINDS = ("empty_class", "missing_class", "extra_class")      # FolderProblem.kind


@dataclass
class FolderProblem:
    """A class folder that `train` refuses and a lenient scan keeps, for `audit` to report: a class folder without
    a usable image ("empty_class"), a class train has and another split lacks ("missing_class"), or a class
    another split has and train lacks ("extra_class")."""

    kind: str
    path: str        # the class folder; for a class a split lacks, the split folder it is missing from
    split: str
    label: str       # the class
    detail: str


@dataclass
class Splits:
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) found while scanning
    # per split: {"kind": "folder", "path": ...} or {"kind": "generated", "from": ..., "fraction": ..., "seed": ...};
    # "notes": human-readable remarks (e.g. classes too small to stratify).
    source: dict = field(default_factory=dict)
    root: str = ""
    problems: list[FolderProblem] = field(default_factory=list)   # what a lenient scan (audit) kept, not refused

    def get(self, name: str) -> list[Sample]:
        if name not in SPLIT_NAMES:
            raise DataError(f"unknown split {name!r}; choose one of {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)


# ------------------------------------------------------------------------------------------------
# Walking folders

def _hidden(name: str) -> bool:
    """Dot-files/folders (.DS_Store, .ipynb_checkpoints, ...) and OS junk are never classes or samples."""
    return name.startswith(".") or name in _JUNK


NOT_A_FILE = "is not a regular file (a pipe, socket or device)"


def walk_files(folder: Path, notes: Optional[list[str]] = None,
               follow: Optional[Callable[[Path], bool]] = None, broken: Optional[list[Path]] = None,
               special: Optional[list[Path]] = None) -> list[Path]:
    """Every non-hidden file below `folder`, recursively, links followed, sorted by path. A folder reached a
    second time (link loop, or two links to one place) is not read again; `notes` says where. `follow(link)`,
    when given, is asked about every symbolic link met (folder or file): False leaves it out. Broken links are
    left out too, said in `notes` and listed in `broken`; so are pipes, sockets and devices, listed in `special`."""
    out: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            if notes is not None:
                notes.append(f"{dirpath} is a link to a folder already read (a link loop or a second link); "
                             f"read once")
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d) and (
            follow is None or not os.path.islink(os.path.join(dirpath, d)) or follow(Path(dirpath, d))))
        for f in filenames:
            p = Path(dirpath, f)
            if _hidden(f) or (follow is not None and p.is_symlink() and p.exists() and not follow(p)):
                continue
            if p.is_file():
                out.append(p)
            elif p.is_symlink() and not p.exists():
                if notes is not None:
                    notes.append(f"{p} is a broken symbolic link (its target does not exist); not used")
                if broken is not None:
                    broken.append(p)
            else:                            # reading a pipe would wait for a writer: never opened
                if notes is not None:
                    notes.append(f"{p} {NOT_A_FILE}; not used")
                if special is not None:
                    special.append(p)
    return sorted(out)


def check_outside(out: PathLike, data: str, what: str = "--out", folder: bool = True) -> None:
    """DataError for an output inside the data folder: what a command writes there (a run, a study, a table, a
    picture of a batch) would be read as a class next time, or replace a training image. Also for an output
    folder (`folder`) that is a file. Before anything is written: train, compare, tune, audit, show-batch and
    lr-find check here."""
    path = Path(out).expanduser().resolve()
    if folder and path.is_file():
        raise DataError(f"{what} {out} is a file; give a folder")
    if data and path.is_relative_to(data_folder(data)):
        raise DataError(f"{what} {out} is inside the data folder {data}: what is written there would be read as a "
                        f"class next time; choose a place outside it")


def data_folder(path: PathLike) -> Path:
    """`path` resolved, or DataError: missing, or a file (an image given where its folder is meant)."""
    root = Path(path).expanduser().resolve()
    if root.is_file():
        raise DataError(f"{path} is a file; the data folder is the folder that holds the class (or train/val/test) "
                        f"folders")
    if not root.is_dir():
        raise DataError(f"{path}: no such data folder")
    return root


def _subdirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not _hidden(p.name) and p.is_dir())


def list_images(paths: list[PathLike]) -> list[str]:
    """Files as given, folders expanded to their images (recursive, sorted, hidden skipped). A broken link with
    an image's name is kept, for the reader to skip with its reason; the other files of a folder (a .heic photo,
    notes) are counted in a warning, not left out without a word."""
    out: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            broken: list[Path] = []
            special: list[Path] = []        # broken links are kept: the reader skips them with their reason
            found = walk_files(p, broken=broken, special=special)
            for f in special:
                log.warning(f"{f} {NOT_A_FILE}; not used")
            out += sorted(str(f) for f in found + broken if f.suffix.lower() in IMG_EXTENSIONS)
            other = [f for f in found if f.suffix.lower() not in IMG_EXTENSIONS]
            if other:
                kinds = sorted({f.suffix.lower() or "(none)" for f in other})
                log.warning(f"{len(other)} file(s) under {p} are not images by their extension ({few(kinds, 5)}: "
                            f"read are {' '.join(IMG_EXTENSIONS)}) and are not used, e.g. {other[0]}")
        elif p.is_file():
            out.append(str(p))
        elif p.exists():
            raise DataError(f"{p}: {NOT_A_FILE}; give image files or folders (a piped image: save it to a file)")
        else:
            raise DataError(f"{p}: no such file or folder")
    return list(dict.fromkeys(out))


def _stays_in_class(class_dir: Path, root: Path, skipped: list[tuple[str, str]],
                    follow_links: bool = False) -> Callable[[Path], bool]:
    """Whether a link inside `class_dir` may be followed: only when it stays inside that class folder. A link
    elsewhere inside the data folder `root` (up, or into another class or split) would give its images this
    folder's label, or two labels: it is never followed. A link out of the data folder (an image store the
    folder links into) is followed only with `follow_links`. Every link not followed is listed in `skipped`."""
    inside = Path(os.path.realpath(class_dir))

    def follow(link: Path) -> bool:
        target = Path(os.path.realpath(link))
        if target.is_relative_to(inside):
            return True
        if not target.is_relative_to(root):
            if follow_links:
                return True
            skipped.append((str(link), f"link outside its class folder: -> {target} (out of the data folder: "
                                       f"read with --follow-links)"))
            return False
        skipped.append((str(link), f"link outside its class folder: -> {target}"))
        return False
    return follow


def _check_class_links(folder: Path, classes: list[str], root: Path) -> None:
    """DataError for a class folder that is (a link to) another class folder, or inside or around one, or a link
    into another split: its images would have two labels, or train's images would be held out."""
    real = {c: Path(os.path.realpath(folder / c)) for c in classes}
    for a in sorted(classes, key=lambda c: not (folder / c).is_symlink()):      # a link is named as the link
        for b in classes:
            if a != b and real[a].is_relative_to(real[b]):
                raise DataError(f"class folders {folder / a} and {folder / b} hold the same images ({a} is "
                                f"{'a link to' if real[a] == real[b] else 'inside'} {real[b]}): each would have two "
                                f"labels; remove the link or keep one folder")
        if (folder / a).is_symlink() and real[a].is_relative_to(root) and not real[a].is_relative_to(
                os.path.realpath(folder)):
            raise DataError(f"class folder {folder / a} is a link into another part of the data folder ({real[a]}): "
                            f"its images would be in two splits; remove the link")


def _scan_split(folder: Path, notes: list[str], root: Path,
                follow_links: bool = False) -> tuple[list[str], dict[str, list[str]], list[tuple[str, str]]]:
    """Classes of one split folder of the data folder `root` and their header-checked images; skipped files
    with reasons."""
    classes = _subdirs(folder)
    _check_class_links(folder, classes, root)
    images: dict[str, list[str]] = {}
    skipped: list[tuple[str, str]] = []
    for c in classes:
        images[c] = []
        for f in walk_files(folder / c, notes, _stays_in_class(folder / c, root, skipped, follow_links)):
            reason = (None if f.suffix.lower() in IMG_EXTENSIONS
                      else f"extension {f.suffix or '(none)'!r} is not an image extension")
            reason = reason or check_image_header(f)
            if reason:
                skipped.append((str(f), reason))
            else:
                images[c].append(str(f))
    _note_loose_images(folder, notes, "in no class folder")
    return classes, images, skipped


def _note_loose_images(folder: Path, notes: list[str], where: str) -> None:
    """Images lying directly in `folder`, where none is read: said, never dropped without a word."""
    loose = sorted(p.name for p in folder.iterdir() if not _hidden(p.name) and p.is_file()
                   and p.suffix.lower() in IMG_EXTENSIONS)
    if loose:
        notes.append(f"{len(loose)} image file(s) directly in {folder} are {where} and are not used (e.g. {loose[0]})")


def _alias_names() -> str:
    """train/ (or training/), val/ (or valid/, validation/) and test/ (or testing/)."""
    said = [f"{a[0]}/" + (f" (or {', '.join(n + '/' for n in a[1:])})" if len(a) > 1 else "")
            for a in SPLIT_ALIASES.values()]
    return f"{', '.join(said[:-1])} and {said[-1]}"


def _find_split_dirs(root: Path, notes: list[str], need_train: bool = True) -> dict[str, Path]:
    """{"train": ROOT/train, ...} for the split folders present (aliases in any case, one per split). A folder to
    train from needs train/; one only evaluated (`need_train=False`) may hold any of them, e.g. test/ alone."""
    names = set(_subdirs(root))
    found: dict[str, Path] = {}
    for split, aliases in SPLIT_ALIASES.items():     # Train/, VAL/: split names in any case (Kaggle's Training/)
        hits = sorted(n for n in names if n.lower() in aliases)
        if len(hits) > 1:
            raise DataError(f"{root}: both {' and '.join(hits)} exist; keep one folder for the {split} split")
        if hits:
            found[split] = root / hits[0]
    if found and need_train and "train" not in found:
        raise DataError(f"{root}: found {', '.join(p.name + '/' for p in found.values())} but no train/ folder")
    _check_split_links(found)
    if found:
        _note_loose_images(root, notes, "in no split and class folder")
        unused = sorted(names - {p.name for p in found.values()})
        if unused:
            beside = "/, ".join(p.name for p in found.values())
            notes.append(f"{root} has folder(s) next to {beside}/ that are not read: {few([u + '/' for u in unused])} "
                         f"(with split folders only {_alias_names()} are read, in any case)")
    return found


def _check_split_links(found: dict[str, Path]) -> None:
    """DataError for two split folders that are one folder (test/ a link to train/, or inside it): the model would
    be tested, or its best epoch chosen, on images it trained on."""
    real = {s: Path(os.path.realpath(d)) for s, d in found.items()}
    for a, b in itertools.combinations(found, 2):
        if real[a].is_relative_to(real[b]) or real[b].is_relative_to(real[a]):
            link, other = (b, a) if found[b].is_symlink() or not found[a].is_symlink() else (a, b)   # the later
            raise DataError(f"split folders {found[link]} and {found[other]} hold the same images ({found[link].name} "
                            f"is {'a link to' if real[a] == real[b] else 'inside or around'} {real[other]}): "
                            f"the {link} split would hold the {other} split's images; give each split its own folder")


def _unicode_twins(names: Sequence[str], others: Sequence[str]) -> str:
    """" (café: the same name in two Unicode forms ...)" when a name of one list is one of the other's written
    otherwise (a folder made on macOS, NFD, beside one made elsewhere, NFC), else "": they look identical."""
    nfc = {unicodedata.normalize("NFC", c) for c in names} & {unicodedata.normalize("NFC", c) for c in others}
    return (f" ({', '.join(sorted(nfc))}: the same name in two Unicode forms, NFC and NFD; rename the folders so "
            f"the bytes match)" if nfc else "")


def _class_mismatches(classes: dict[str, list[str]], dirs: dict[str, Path]) -> tuple[str, list[FolderProblem]]:
    """Every folder split must list the same classes as train (a label must mean one thing): what differs, as the
    refusal's text ("" when nothing does) and as one FolderProblem per class a split lacks or adds."""
    ref = set(classes["train"])
    said, problems = [], []
    for split, cls in classes.items():
        missing, extra = sorted(ref - set(cls)), sorted(set(cls) - ref)
        if missing or extra:
            said.append(f"{split}: missing {missing or 'none'}, extra {extra or 'none'}"
                        + _unicode_twins(missing, extra))
        problems += [FolderProblem("missing_class", str(dirs[split]), split, c, f"train has {c}/, {split}/ has not")
                     for c in missing]
        problems += [FolderProblem("extra_class", str(dirs[split] / c), split, c,
                                   f"{split}/ has {c}/, train has not: train cannot learn it") for c in extra]
    return ("class folders differ between splits (compared with train): " + "; ".join(said) if said else ""), problems


def labelled_images(root: PathLike, split: str, classes: list[str], follow_links: bool = False,
                    skips: Optional[SkipLog] = None) -> tuple[list[Sample], str]:
    """The labelled images of a folder that is not a run's own, for scoring a model trained on `classes`
    (`evaluate --data`): ROOT/SPLIT/<class>/ when ROOT has split folders (that one only: a test-only folder needs
    no train/), else every image of ROOT/<class>/; a split is never carved out. Labels are the model's indices
    of the class-folder names, so the folder may hold any subset of the model's classes, in any order (a folder
    scanned on its own would number a subset 0..k-1: silently wrong labels). A folder name the model does not
    know is refused: its images cannot be scored. Returns (samples, which images they are, in words); the files
    the scan skipped go to `skips` too, so a caller's record lists them beside those that fail to decode later."""
    root = data_folder(root)
    notes: list[str] = []
    dirs = _find_split_dirs(root, notes, need_train=False)
    if dirs and split not in dirs:
        raise DataError(f"{root} has no {split}/ folder (it has {', '.join(p.name + '/' for p in dirs.values())}); "
                        f"choose --split among those")
    folder = dirs.get(split, root)
    names, images, skipped = _scan_split(folder, notes, root, follow_links)
    unknown = [c for c in names if c not in classes]
    if unknown:
        raise DataError(f"{folder} has class folder(s) the model does not know: {few(unknown)} (the model's "
                        f"classes: {few(classes)}){_unicode_twins(unknown, classes)}; move them out, or give a "
                        f"folder without them")
    index = {c: i for i, c in enumerate(classes)}
    samples = [(p, index[c]) for c in names for p in images[c]]
    if not samples:
        raise DataError(f"{folder}: no usable image in a class folder; expected {folder}/<class>/<image>"
                        + (f" ({len(skipped)} file(s) skipped, e.g. {skipped[0][0]}: {skipped[0][1]})"
                           if skipped else ""))
    absent = [c for c in classes if not images.get(c)]
    if absent:
        notes.append(f"{len(absent)} of the model's {len(classes)} classes have no image in {folder}: "
                     f"{few(absent)} (macro metrics average over the classes present or predicted)")
    for n in notes:
        log.warning(n)
    if skipped:
        log.warning("%d file(s) under %s skipped, e.g. %s: %s", len(skipped), folder, *skipped[0])
        if skips is not None:
            skips.add(skipped)
    return samples, (f"{split}/ of {root} ({len(samples)} images)" if dirs
                     else f"all {len(samples)} images of {root} (it has no split folders)")


@dataclass
class HeldApart:
    """Two disjoint sets of labelled images of one folder (`fit_and_held_out`): `fit` to fit something on, `held`
    to check it on; `held_name` is the folder `held` is ("val", "test") or "held-out" when it was carved;
    `unheld`: the classes a carved `held` has no image of (too few to hold one out), for the caller to word."""

    fit: list[Sample]
    held: list[Sample]
    held_name: str
    fit_words: str
    held_words: str
    unheld: list[str] = field(default_factory=list)


def fit_and_held_out(root: PathLike, classes: list[str], fraction: float, seed: int,
                     follow_links: bool = False) -> HeldApart:
    """Disjoint fit and held-out images of a folder that is not a run's own, labelled by the model's `classes`
    (`export --quantize int8 --data OTHER`: int8 is calibrated on the first and its accuracy guard scores the
    second; an image in both would let the guard score images the calibration fitted its ranges on). With a
    train/ and a val/ (else test/) folder, those two, as a run's own folder is used. Otherwise (no split folders,
    or not both) every image it has (`labelled_images` of each split folder there is, or of the whole folder) is
    split as a missing val/ is carved from train/ (`_holdout`: stratified by class, `seed`), `fraction` of them
    held out; the images of a class with one image stay in `fit` (named in `unheld`: `_holdout`'s notes speak of a
    split's metrics, which the caller does not measure). A held-out image byte-identical to a fit image (a copy
    under another name or folder) is left out of `held`, and its words say how many."""
    root = data_folder(root)
    dirs = _find_split_dirs(root, [], need_train=False)
    held_split = next((s for s in ("val", "test") if s in dirs), None)
    if "train" in dirs and held_split:
        fit, fit_words = labelled_images(root, "train", classes, follow_links)
        held, held_words = labelled_images(root, held_split, classes, follow_links)
        return _without_copies(HeldApart(fit, held, held_split, fit_words, held_words))
    pool = sorted(s for split in (dirs or ["train"]) for s in labelled_images(root, split, classes, follow_links)[0])
    fit, held = _holdout(pool, fraction, seed, "val", classes, [])
    unheld = sorted({classes[y] for _, y in fit} - {classes[y] for _, y in held}, key=classes.index)
    where = (f"the {len(pool)} images of {root} ({'/, '.join(dirs)}/: no train/ and val/ or test/ pair)" if dirs
             else f"the {len(pool)} images of {root} (it has no split folders)")
    return _without_copies(HeldApart(fit, held, "held-out", f"{len(fit)} of {where}, split stratified by class "
                                     f"with seed {seed}", f"the other {len(held)} of {where}", unheld))


def _without_copies(parts: HeldApart) -> HeldApart:
    """`parts` without the held-out images whose bytes equal a fit image's (`leakage.duplicates_of`): a check
    that scored them would score what was fitted on, as if kept apart by their paths alone."""
    copies = {p for p, _ in duplicates_of(parts.fit, parts.held)}
    if not copies:
        return parts
    return dataclasses.replace(parts, held=[s for s in parts.held if s[0] not in copies],
                               held_words=f"{parts.held_words}; {len(copies)} of them left out: byte-identical "
                                          f"copies of images of the other part")


# ------------------------------------------------------------------------------------------------
# Generated splits

def _holdout(samples: list[Sample], fraction: float, seed: int, name: str, classes: list[str],
             notes: list[str]) -> tuple[list[Sample], list[Sample]]:
    """Stratified (rest, held_out). Classes with a single image stay in rest (they cannot be split);
    if the held-out set is too small to hold every class once, the split is made unstratified. A class left
    without a held-out image is named in `notes`: its metrics on that split are not measured, which a
    macro average would otherwise hide."""
    from sklearn.model_selection import train_test_split

    if fraction <= 0 or not samples:
        return samples, []
    labels = np.array([y for _, y in samples])
    counts = np.bincount(labels)
    single = counts[labels] < 2
    pool = [s for s, one in zip(samples, single) if not one]
    kept = [s for s, one in zip(samples, single) if one]
    if len(pool) < 2:
        rest, held = pool, []
    else:
        try:
            rest, held = train_test_split(pool, test_size=fraction, random_state=seed,
                                          stratify=[y for _, y in pool])
        except ValueError as e:  # e.g. fewer held-out slots than classes
            notes.append(f"{name}: stratified split impossible ({e}); used a plain random split")
            rest, held = train_test_split(pool, test_size=fraction, random_state=seed)
    absent = sorted(set(labels.tolist()) - {y for _, y in held})
    if absent:
        shown = ", ".join(f"{classes[y]} ({counts[y]} image{'s' if counts[y] > 1 else ''})" for y in absent[:5])
        notes.append(f"{name}: {len(absent)} class(es) have no {name} image (too few images to hold one out): "
                     f"{shown}{', ...' if len(absent) > 5 else ''}; their {name} metrics are not measured (add "
                     f"images, or give the folder a {name}/ split)")
    return sorted(kept + rest), sorted(held)


def _generate(splits: dict[str, list[Sample]], source: dict, val_fraction: float, test_fraction: float,
              seed: int, classes: list[str], notes: list[str]) -> None:
    """Fill missing val/test from train, in place. Fractions are of the images in train/ (when both
    are missing, test is taken first and val's fraction is rescaled so both are of that total)."""
    total = len(splits["train"])
    if "test" not in splits:
        splits["train"], splits["test"] = _holdout(splits["train"], test_fraction, seed, "test", classes, notes)
        source["test"] = {"kind": "generated", "from": "train", "fraction": test_fraction, "seed": seed}
    if "val" not in splits:
        frac = val_fraction * total / max(len(splits["train"]), 1)
        splits["train"], splits["val"] = _holdout(splits["train"], frac, seed, "val", classes, notes)
        source["val"] = {"kind": "generated", "from": "train", "fraction": val_fraction, "seed": seed}


def _why_empty(folder: Path, root: Path, skipped: list[tuple[str, str]]) -> str:
    """Why `folder` has no image: nothing in it, or its files that cannot be read (named relative to `root`)."""
    inside = [(p, r) for p, r in skipped if Path(p).resolve().is_relative_to(folder.resolve())]
    if not inside:
        return "no image file"
    p, r = inside[0]
    return f"{len(inside)} file(s) it cannot read, e.g. {os.path.relpath(p, root)}: {r}"


def _folder_problems(classes: dict[str, list[str]], images: dict[str, dict[str, list[str]]], dirs: dict[str, Path],
                     root: Path, skipped: list[tuple[str, str]], lenient: bool) -> list[FolderProblem]:
    """Class folders without a usable image and classes that differ between splits: refused (one line naming each;
    an empty folder first, since it is the cause when the other splits lack its class: an empty train/7 beside
    val/ and test/ without 7/ is that, not three splits that disagree), or with `lenient` returned for audit."""
    empty = [(s, dirs[s] / c) for s in images for c, v in images[s].items() if not v]
    if empty and not lenient:
        said = "; ".join(f"{os.path.relpath(f, root)} ({_why_empty(f, root, skipped)})" for _, f in empty)
        raise DataError(f"class folder(s) under {root} without a usable image: {said}; add images to each, or remove "
                        f"it from every split")
    refusal, problems = _class_mismatches(classes, dirs)
    if refusal and not lenient:
        raise DataError(refusal)
    return problems + [FolderProblem("empty_class", str(f), s, f.name, _why_empty(f, root, skipped))
                       for s, f in empty]


def _undecodable(samples: Sequence[Sample], classes: list[str]) -> dict[str, list[tuple[str, str]]]:
    """The classes none of whose `samples` decodes, each with its files' (path, reason). Each class's images are
    decoded in order until one reads (`first_readable`, a large JPEG at libjpeg's 1/8 scale): one cheap decode per
    healthy class, not the whole folder."""
    by_class: dict[int, list[str]] = {}
    for p, y in samples:
        by_class.setdefault(y, []).append(p)
    lost = {}
    for y, paths in sorted(by_class.items()):
        found, failed = first_readable(paths, min_size=1)
        if found is None:
            lost[classes[y]] = failed
    return lost


def _undecodable_classes(splits: dict[str, list[Sample]], classes: list[str], dirs: dict[str, Path], root: Path,
                         lenient: bool) -> list[FolderProblem]:
    """Classes of a split none of whose images decodes (truncated files, float TIFFs pass the header check):
    refused as a class folder without a usable image is, before anything is written (the model would never learn
    a class without a train image, and the val or test metrics would say nothing of one without its images), or
    with `lenient` returned for audit. Checked on the splits as carved: a class whose only readable images went to
    val or test is refused too."""
    said = {(s, c): f"{len(f)} file(s) that fail to decode, e.g. {os.path.relpath(f[0][0], root)}: {f[0][1]}"
            for s in SPLIT_NAMES if s in splits for c, f in _undecodable(splits[s], classes).items()}
    if said and not lenient:
        shown = "; ".join(f"{c} in {s} ({why})" for (s, c), why in list(said.items())[:3]) + (
            "; ..." if len(said) > 3 else "")
        train = any(s == "train" for s, _ in said)
        raise DataError(f"class(es) under {root} without an image that can be decoded in a split: {shown}; "
                        + ("the model could never learn " if train else "the metrics would say nothing of ")
                        + f"{'them' if len(said) > 1 else 'it'}: replace those files with readable images, or remove "
                          f"the class folder from every split, and run train again")
    return [FolderProblem("empty_class", str(dirs.get(s, dirs["train"]) / c), s, c, why)
            for (s, c), why in said.items()]


def scan(root: PathLike, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
         follow_links: bool = False, lenient: bool = False) -> Splits:
    """Labelled train/val/test lists of a data folder (see the module docstring for layouts and links).

    `follow_links` also reads links in class folders that lead out of the data folder. `lenient` (audit) keeps
    class folders without a usable image (none passes the header check, or none of train decodes) and classes that
    differ between splits as `problems` instead of refusing them; the classes are then train's followed by those
    only other splits have. (A folder only evaluated is read by `labelled_images`, which never carves a split.)"""
    root = data_folder(root)
    notes: list[str] = []
    dirs = _find_split_dirs(root, notes) or {"train": root}
    classes: dict[str, list[str]] = {}
    images: dict[str, dict[str, list[str]]] = {}
    skipped: list[tuple[str, str]] = []
    for split, folder in dirs.items():
        classes[split], images[split], sk = _scan_split(folder, notes, root, follow_links)
        skipped += sk
    if not classes["train"]:
        beside = sorted(set(_subdirs(root)) - {p.name for p in dirs.values()})
        raise DataError(f"{dirs['train']}: no class folders found; expected ROOT/<class>/<image> "
                        f"or ROOT/train/<class>/<image>" + (
                            f" ({root} also has {few([b + '/' for b in beside])}: if {dirs['train'].name}/ is one "
                            f"of the classes, rename it; a folder named like a split makes {root} a folder of "
                            f"split folders)" if beside else ""))
    if len(classes["train"]) < 2:
        raise DataError(f"{dirs['train']}: only one class folder ({classes['train'][0]}/); a classifier needs at "
                        f"least two classes (one class folder per class)")
    problems = _folder_problems(classes, images, dirs, root, skipped, lenient)
    cls = classes["train"] + sorted({c for v in classes.values() for c in v} - set(classes["train"]))
    splits = {s: [(p, i) for i, c in enumerate(cls) for p in images[s].get(c, [])] for s in images}
    source: dict = {s: {"kind": "folder", "path": str(d)} for s, d in dirs.items()}
    if not {"val", "test"} <= splits.keys():
        _generate(splits, source, val_fraction, test_fraction, seed, cls, notes)
    # before the notes are logged: a hold-out note would count a refused class's files as images
    problems += _undecodable_classes(splits, cls, dirs, root, lenient)
    for n in notes:
        log.warning(n)
    if skipped:
        log.warning("%d file(s) under %s skipped (not readable images, or links out of their class folder)",
                    len(skipped), root)
    source["notes"] = notes
    return Splits(cls, splits["train"], splits.get("val", []), splits.get("test", []), skipped, source, str(root),
                  problems)


def apply_protocol(s: Splits, protocol: str, paper_select_on: Optional[str],
                   index_mod: Optional[list] = None) -> Splits:
    """The splits a protocol trains and selects on (README, "Two protocols").

    honest: as scanned (the best epoch is chosen on val, held out of train where the folder has no val/).
    paper: the authors' experiment. With `paper_select_on` "test" they trained on all of the official training
    images and chose the epoch on the split they reported: train/ and val/ (which `prepare` carved from the
    official train) become one training set and there is no val. With `index_mod` [m, k] their val was the
    official-train images whose index (the file name `prepare` gives array datasets) % m == k."""
    if protocol != "paper" or paper_select_on is None:
        return s
    notes = list(s.source.get("notes", []))
    if paper_select_on == "test":
        notes.append("paper protocol: train/ and val/ together are the training set; the best epoch is chosen on test")
        return dataclasses.replace(s, train=sorted(s.train + s.val), val=[], source={**s.source, "notes": notes,
                                                                                     "protocol": "paper"})
    if not index_mod:
        return dataclasses.replace(s, source={**s.source, "protocol": "paper"})
    m, k = index_mod
    pool = sorted(s.train + s.val)
    try:
        chosen = [int(Path(p).stem) % m == k for p, _ in pool]
    except ValueError:
        raise DataError(f"paper_val_index_mod needs files named by their index in the official train split (as "
                        f"`spinal-transfer prepare` writes them, e.g. 00042.png); {s.root} has e.g. "
                        f"{Path(pool[0][0]).name}") from None
    notes.append(f"paper protocol: val = the official-train images with index % {m} == {k}")
    return dataclasses.replace(s, train=[x for x, c in zip(pool, chosen) if not c],
                               val=[x for x, c in zip(pool, chosen) if c],
                               source={**s.source, "notes": notes, "protocol": "paper"})


def config_splits(cfg: Any, lenient: bool = False) -> Splits:
    """The splits a run of TrainConfig `cfg` trains, selects and tests on: its data folder scanned (a missing
    val/test carved with its fractions and split seed), then its protocol applied. The one way a config
    becomes file lists (train, lr-find, show-batch, and `evaluate` of a checkpoint without its splits.json);
    a run records the result in splits.json and reads that back from then on. `lenient`: see `scan`."""
    scanned = scan(cfg.data, cfg.val_fraction, cfg.test_fraction, cfg.split_seed, follow_links=cfg.follow_links,
                   lenient=lenient)
    _warn_unused_fractions(cfg, scanned)
    return apply_protocol(scanned, cfg.protocol, cfg.paper_select_on, cfg.paper_val_index_mod)


def _warn_unused_fractions(cfg: Any, s: Splits) -> None:
    """A --val-fraction or --test-fraction changed from its default carves nothing where the folder has that split
    folder: one line says so, instead of a flag silently ignored."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for name, split in (("val_fraction", "val"), ("test_fraction", "test")):
        if getattr(cfg, name) != defaults[name] and s.source.get(split, {}).get("kind") == "folder":
            log.warning(f"{option_value(name, getattr(cfg, name))} is not used: {s.root} has its own {split}/ "
                        f"folder, which is the {split} split")


# ------------------------------------------------------------------------------------------------
# The record: a run's file lists, fixed at its start

def record(s: Splits) -> dict:
    """What splits.json holds: root, classes, how each split was made, and every file with its label, size and
    modification time (paths relative to root)."""
    root = Path(s.root)

    def entry(p: str, y: int) -> list:
        st = os.stat(p)
        return [os.path.relpath(p, root), y, st.st_size, st.st_mtime_ns]

    return {"version": RECORD_VERSION, "root": str(root), "classes": s.classes, "source": s.source,
            "splits": {k: [entry(p, y) for p, y in s.get(k)] for k in SPLIT_NAMES},
            "skipped": [[os.path.relpath(p, root), r] for p, r in s.skipped]}


def fingerprints(s: Splits) -> dict[str, str]:
    """Per split, a sha256 of its files (paths relative to the data folder) and labels: what a checkpoint carries,
    so a split made again from its settings away from its run folder (no splits.json) can be checked to be the
    one the run used, wherever the folder now is. A name that is not UTF-8 is hashed as its own bytes
    (`encode_text`), as the file system holds it."""
    root = Path(s.root)

    def digest(samples: Sequence[Sample]) -> str:
        text = "".join(f"{os.path.relpath(p, root)}\0{y}\n" for p, y in sorted(samples))
        return hashlib.sha256(encode_text(text)).hexdigest()
    return {k: digest(s.get(k)) for k in SPLIT_NAMES}


def changed_splits(now: Optional[dict], recorded: Optional[dict]) -> list[str]:
    """The splits whose fingerprint in `now` differs from `recorded`'s (none when either side has none: a
    checkpoint from before fingerprints, a record of another version)."""
    return [k for k, v in (now or {}).items() if recorded and recorded.get(k) != v]


def recorded_fingerprints(doc: dict) -> Optional[dict[str, str]]:
    """`fingerprints` of the splits a run's splits.json records, from the record alone (no file is read): a
    checkpoint can be checked against the run folder it sits in before any of its files are looked for. None for
    a record of another version (`load_recorded` refuses it)."""
    if doc.get("version") != RECORD_VERSION:
        return None
    root = doc["root"]
    lists = [[(os.path.join(root, rel), y) for rel, y, *_ in doc["splits"][k]] for k in SPLIT_NAMES]
    return fingerprints(Splits(doc["classes"], *lists, root=root))


def holds_recorded(doc: dict, root: PathLike, split: str) -> bool:
    """Whether the folder `root` holds most of a run's recorded train images and of its `split`, each at its
    relative path with its recorded size: then it is the run's data folder, moved or copied, and `evaluate
    --data`/`export --data` read the run's recorded `split` from it; read as another folder, its images could
    include those the model trained on (all of a flat folder's are read). Most, not all: a moved folder that lost
    a file is still the run's (`load_recorded` then names the file)."""
    if doc.get("version") != RECORD_VERSION:
        return False
    for name in {"train", split}:
        files, found = doc["splits"].get(name, []), 0
        for rel, _, size, _ in files:
            try:
                found += os.stat(Path(root).expanduser() / rel).st_size == size
            except OSError:
                continue
        if files and 2 * found <= len(files):
            return False
    return True


# What `load_recorded` suggests when recorded files are gone: restore them, or what works for the command that
# reads the run's record (train --resume's below; evaluate, export --quantize and audit --run pass their own)
GONE_ADVICE = "start a new run on the folder as it is now"


def recorded_root(doc: dict, root: PathLike) -> Path:
    """`root` resolved, the data folder a run's record `doc` is read under, or DataError: a record of another
    version, or a folder that is not there (moved: each command that reads a run's record takes --data). The one
    check for them all (`load_recorded`, and `audit --run` before it checks where it writes)."""
    if doc.get("version") != RECORD_VERSION:
        raise DataError(f"the run's splits.json is of another version ({doc.get('version')}); it was made by an "
                        f"older spinal-transfer: start a new run")
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"{path}: the run's data folder does not exist (it was {doc['root']}); give its new "
                        f"place with --data (train --resume, evaluate, export --quantize, audit --run)")
    return path


def load_recorded(doc: dict, root: PathLike, log_changes: bool = True, advice: str = GONE_ADVICE,
                  needed: Sequence[str] = SPLIT_NAMES) -> Splits:
    """The recorded splits of a run, with their files found under `root` (the run's data folder, which may
    have moved). Files gone from the `needed` splits (what the calling command reads) -> DataError ending in
    `advice`, what else the command can do (the default is train --resume's); files gone from the other splits
    are dropped from them with one warning, since refusing would block a command they do not matter to (`evaluate
    --split test` without a train image). Added, modified files and new class folders -> one warning each
    (`log_changes`: these warnings, the gone files' included; off for a second read of one record)."""
    root = recorded_root(doc, root)
    out: dict[str, list[Sample]] = {}
    gone: dict[str, list[str]] = {}
    changed = []
    for split in SPLIT_NAMES:
        out[split], gone[split] = [], []
        for rel, y, size, mtime in doc["splits"][split]:
            p = root / rel
            try:
                st = os.stat(p)
            except OSError:
                gone[split].append(str(p))
                continue
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                changed.append(str(p))
            out[split].append((str(p), int(y)))
    refused = [p for s in SPLIT_NAMES if s in needed for p in gone[s]]
    if refused:
        shown = "; ".join(refused[:5]) + (f"; ... and {len(refused) - 5} more" if len(refused) > 5 else "")
        raise DataError(f"{len(refused)} file(s) this run uses are gone from {root}: {shown}. Restore them (if the "
                        f"folder moved, give its new place with --data), or {advice}")
    if root != Path(doc["root"]) and not all(holds_recorded(doc, root, s) for s in needed):
        raise DataError(f"{root} is not the run's data folder (it was {doc['root']}): most of the files its "
                        f"splits.json records have another size there, other images under the same names. Give the "
                        f"folder the run read (moved or copied) with --data, or {advice}")
    skipped = [(str(root / rel), reason) for rel, reason in doc.get("skipped", [])]
    if log_changes:
        _report_gone({s: v for s, v in gone.items() if v}, root)
        _report_changes(root, doc, out, skipped, changed)
    return Splits(doc["classes"], out["train"], out["val"], out["test"], skipped, dict(doc["source"]), str(root))


def _report_gone(gone: dict[str, list[str]], root: Path) -> None:
    """One warning for the recorded files gone from splits the command does not read (dropped from them)."""
    if gone:
        counts = ", ".join(f"{len(v)} of the {s} split" for s, v in gone.items())
        first = next(iter(gone.values()))[0]
        log.warning(f"{sum(map(len, gone.values()))} file(s) the run recorded are gone from {root} ({counts}), "
                    f"e.g. {first}; not used here")


def _report_changes(root: Path, doc: dict, out: dict, skipped: list, changed: list[str]) -> None:
    """Warn about what changed in the data folder since the run recorded it; nothing of it is used."""
    known = {p for v in out.values() for p, _ in v} | {p for p, _ in skipped}
    added = [str(f) for f in walk_files(root) if f.suffix.lower() in IMG_EXTENSIONS and str(f) not in known]
    if added:
        log.warning(f"{len(added)} image(s) added to {root} since the run started are not used (the run keeps the "
                    f"files it started with, listed in splits.json), e.g. {added[0]}")
    if changed:
        log.warning(f"{len(changed)} file(s) of the run changed on disk since it started (size or date), e.g. "
                    f"{changed[0]}; they are read as they are now")
    split_dirs = _find_split_dirs(root, []) or {"train": root}
    now = set(_subdirs(split_dirs["train"]))
    new = sorted(now - set(doc["classes"]))
    if new:
        log.warning(f"new class folder(s) {', '.join(new)} in {split_dirs['train']} are not used: the run keeps "
                    f"its {len(doc['classes'])} classes")
