"""Validation accuracy reached in fp32 vs bf16 autocast (`amp: bf16`), same seed, same data.

  python benchmarks/bench_bf16_accuracy.py [--quick]

Data: scikit-learn's digits written as 32x32 PNG folders by tests/conftest.py `write_digits_folder`
(train/val/test 60/20/20). Model: timm/test_resnet (weights none) + spinal head, 32 px, 6 epochs
with cosine decay, `spinal_transfer.training.train.run` with only `amp` changed, for 3 seeds. Prints both
accuracies per seed (best-epoch val top1, test top1 at that epoch, per-epoch val top1), the mean
difference, and the train-throughput ratio bf16 / fp32 from metrics.jsonl for information. "bf16
must not cost accuracy": PASS when the mean val top1 of bf16 is within one validation image of fp32
or better.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import header  # noqa: E402
from conftest import write_digits_folder  # noqa: E402

from spinal_transfer.config import TrainConfig  # noqa: E402
from spinal_transfer.training.train import run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits 0-4 only (half the images), one seed")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; quick 1)")
    args = ap.parse_args()
    seeds = args.seeds or (1 if args.quick else 3)
    header("bench_bf16_accuracy: val accuracy, fp32 vs bf16 autocast", args)
    tmp = tempfile.TemporaryDirectory(prefix="bench_bf16_")
    digits = tuple(range(5)) if args.quick else tuple(range(10))
    root = write_digits_folder(Path(tmp.name) / "digits", digits=digits)
    base = TrainConfig(data=str(root), backbone="timm/test_resnet", weights="none", head="spinal",
                       head_preset="resnet", layer_width=64, img_size=32, batch_size=64, workers=0, augment="none",
                       epochs=args.epochs, lr=0.05, scheduler="cosine", device="cpu", log_interval=1000)
    print(f"config: timm/test_resnet + spinal w64, 32 px, batch 64, {base.optimizer} lr {base.lr:g} wd "
          f"{base.weight_decay:g} {base.scheduler}, label smoothing {base.label_smoothing:g} (train's defaults but "
          f"lr), {args.epochs} epochs, seeds 0-{seeds - 1}, digits {digits[0]}-{digits[-1]}", flush=True)
    res: dict[str, list] = {"none": [], "bf16": []}
    for seed in range(seeds):
        for amp in ("none", "bf16"):
            out = Path(tmp.name) / f"{amp}_{seed}"
            report = run(dataclasses.replace(base, amp=amp, seed=seed, out=str(out)))
            rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines() if r]
            res[amp].append((report, rows))
            print(f"  seed {seed} amp {amp:4s}: best epoch {report['best_epoch']} of {len(rows)}, val top1 "
                  f"{report['val']['top1']:.4f} (loss {report['val']['loss']:.4f}), test top1 "
                  f"{report['test']['top1']:.4f}; per-epoch val top1 {[round(r['val']['top1'], 4) for r in rows]}; "
                  f"train {statistics.median(r['train_images_per_s'] for r in rows):.0f} img/s", flush=True)
    n_val = res["none"][0][0]["val"]["num_samples"]

    def mean(amp: str, split: str) -> float:
        return statistics.mean(rep[split]["top1"] for rep, _ in res[amp])

    d = mean("bf16", "val") - mean("none", "val")
    speed = statistics.median(y["train_images_per_s"] / x["train_images_per_s"]
                              for (_, ra), (_, rb) in zip(res["none"], res["bf16"]) for x, y in zip(ra, rb))
    print(f"\nresults (mean over {seeds} seed(s)): val top1 fp32 {mean('none', 'val'):.4f} vs bf16 "
          f"{mean('bf16', 'val'):.4f} (bf16 - fp32 = {d:+.4f}, {d * n_val:+.1f} of {n_val} images); test top1 fp32 "
          f"{mean('none', 'test'):.4f} vs bf16 {mean('bf16', 'test'):.4f}; train throughput bf16/fp32 {speed:.2f}x "
          f"(median over epochs; this model is too small for bf16 to pay off, see bench_train)")
    print(f"bf16 does not cost accuracy (mean val top1 >= fp32 - 1 image): {'PASS' if d >= -1.0 / n_val - 1e-9 else 'MISS'}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
