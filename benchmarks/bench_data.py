"""Decode + augment throughput: our pipeline (ImageDataset + build_transforms, OpenCV/albumentations,
large JPEGs decoded at reduced scale where the recipe's first step shrinks them anyway) vs the same
recipe written with torchvision transforms on PIL images (torchvision ImageFolder), as the paper's
scripts did.

  python benchmarks/bench_data.py [--quick]

Per worker: one process, one thread (torch.set_num_threads(1), as inside a DataLoader worker), a plain
loop over every image of a folder of real JPEGs of mixed sizes. All workers: DataLoader with
num_workers=2 (ours: `train.make_loader`; reference: a DataLoader over ImageFolder with the same batch
size, worker count and persistent workers, so that only the pipelines differ). Ratios are
ours / reference images/s, median over alternating rounds. Target: >= 1.4x per worker.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import Rounds, folder_samples, header, make_jpeg_folder, print_table, size_summary, verdict  # noqa: E402
from PIL import Image  # noqa: E402

from spinal_transfer.data.augment import Augmentation
from spinal_transfer.data.images import load_image  # noqa: E402
from spinal_transfer.data.loaders import EpochSampler, ImageDataset, make_loader  # noqa: E402
from spinal_transfer.data.transforms import build_transforms  # noqa: E402
from spinal_transfer.models.preprocess import resolve_data_config

TARGET_PER_WORKER = 1.4


def reference_transform(recipe: str, size: int, resize: int, mean, std, rotation: float, scale):
    """The paper-style torchvision pipeline on PIL images (what the upstream scripts wrote)."""
    import torchvision.transforms as T

    if recipe == "paper":
        aug = [T.Resize((resize, resize)), T.RandomRotation(rotation), T.RandomCrop(size), T.RandomHorizontalFlip()]
    else:
        aug = [T.RandomResizedCrop(size, scale=tuple(scale)), T.RandomHorizontalFlip()]
    return T.Compose([*aug, T.ToTensor(), T.Normalize(mean, std)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images and rounds (< 2 min)")
    ap.add_argument("--img-size", type=int, default=224, help="crop size (paper recipe resizes to img-size+6 first, "
                                                              "as the Caltech/Bird scripts: 230 -> 224)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    header("bench_data: decode + augment images/s, ours vs torchvision-on-PIL", args)
    n_photo, n_digits = (120, 40) if args.quick else (300, 100)
    rounds = args.rounds or (3 if args.quick else 15)
    budget = 100 if args.quick else 540

    tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
    root = make_jpeg_folder(Path(tmp.name) / "jpegs", n_photo, n_digits)
    samples, classes = folder_samples(root)
    print("data:", size_summary(samples))

    size, resize = args.img_size, args.img_size + 6
    results = []
    recipes = ("paper", "modern")
    ours_tf, ref_tf = {}, {}
    for recipe in recipes:
        aug = Augmentation(policy=recipe)
        dc = resolve_data_config("torchvision/resnet18", "none", img_size=size, resize_size=resize)
        ours_tf[recipe] = (aug, build_transforms(dc, train=True, aug=aug))
        ref_tf[recipe] = reference_transform(recipe, size, resize, dc.mean, dc.std, aug.rotation, aug.crop_scale())
        print(f"{recipe} recipe, ours: {[type(t).__name__ for t in ours_tf[recipe][1].transforms]} "
              f"(interpolation {dc.interpolation}, INTER_AREA when downscaling)")
        print(f"{recipe} recipe, reference: {[type(t).__name__ for t in ref_tf[recipe].transforms]}")

    # ---- per worker: a single-threaded per-image loop ------------------------------------------
    from torchvision.datasets import ImageFolder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ours_ds = {r: ImageDataset(samples, ours_tf[r][1]) for r in recipes}
    ref_ds = {r: ImageFolder(str(root), transform=ref_tf[r]) for r in recipes}
    assert [s for s in ref_ds["paper"].samples] == samples

    def loop(ds):
        def f():
            t = time.perf_counter()
            for i in range(len(ds)):
                ds[i]
            return len(ds), time.perf_counter() - t
        return f

    def decode_ours():
        t = time.perf_counter()
        for p, _ in samples:
            load_image(p)
        return len(samples), time.perf_counter() - t

    def decode_ref():          # torchvision's default_loader / pil_loader
        t = time.perf_counter()
        for p, _ in samples:
            with open(p, "rb") as f:
                Image.open(f).convert("RGB")
        return len(samples), time.perf_counter() - t

    for ds in (*ours_ds.values(), *ref_ds.values()):        # warm the page cache and lazy imports
        for i in range(min(len(ds), 20)):
            ds[i]
    print(f"\nper worker (1 process, 1 thread), {len(samples)} images per pass:")
    fns = {"ours_decode": decode_ours, "ref_decode": decode_ref}
    for r in recipes:
        fns[f"ours_{r}"], fns[f"ref_{r}"] = loop(ours_ds[r]), loop(ref_ds[r])
    per = Rounds(fns, reference="ref_paper").run(rounds, budget_s=budget * 0.6, min_rounds=3)
    torch.set_num_threads(threads)

    for r in recipes:
        m, lo, hi = per.ratio(f"ours_{r}", f"ref_{r}")
        results.append((f"per worker, {r} recipe", f"{per.median_rate(f'ours_{r}'):.0f} vs {per.median_rate(f'ref_{r}'):.0f} img/s",
                        f"{m:.2f}x (min {lo:.2f}, max {hi:.2f})", verdict(m, TARGET_PER_WORKER)))
    m, lo, hi = per.ratio("ours_decode", "ref_decode")
    results.append(("per worker, decode only (load_image vs PIL open+convert)",
                    f"{per.median_rate('ours_decode'):.0f} vs {per.median_rate('ref_decode'):.0f} img/s",
                    f"{m:.2f}x (min {lo:.2f}, max {hi:.2f})", "(diagnostic)"))

    # ---- all workers: DataLoader(num_workers=2) ---------------------------------------------------
    from torch.utils.data import DataLoader

    dev = torch.device("cpu")
    loaders = {}
    for r in recipes:
        loaders[f"ours_{r}"] = make_loader(samples, ours_tf[r][1], args.batch_size, args.workers, dev,
                                           EpochSampler(len(samples), 0))
        loaders[f"ref_{r}"] = DataLoader(ref_ds[r], batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                         persistent_workers=args.workers > 0)

    def epoch(loader):
        def f():
            t, n = time.perf_counter(), 0
            for batch in loader:
                n += len(batch[0])
            return n, time.perf_counter() - t
        return f

    for ld in loaders.values():         # start the persistent workers
        epoch(ld)()
    print(f"\nall workers (DataLoader num_workers={args.workers}, batch {args.batch_size}), one epoch per measurement:")
    allw = Rounds({k: epoch(v) for k, v in loaders.items()}, reference="ref_paper").run(
        rounds, budget_s=budget * 0.4, min_rounds=3)
    for r in recipes:
        m, lo, hi = allw.ratio(f"ours_{r}", f"ref_{r}")
        results.append((f"{args.workers} workers, {r} recipe",
                        f"{allw.median_rate(f'ours_{r}'):.0f} vs {allw.median_rate(f'ref_{r}'):.0f} img/s",
                        f"{m:.2f}x (min {lo:.2f}, max {hi:.2f})", "(reported)"))
    print(f"\nresults (ours vs reference; img_size {size}, paper resize {resize}; medians over "
          f"{len(per.rates['ref_paper'])} / {len(allw.rates['ref_paper'])} rounds):")
    print_table(results)
    del loaders
    tmp.cleanup()


if __name__ == "__main__":
    main()
