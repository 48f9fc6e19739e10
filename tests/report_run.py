"""A run folder in the post-restructure contract, built from a real (tiny) training run.

The logits are real: a linear classifier on 8x8 block-averaged pixels of the digits folder
(`conftest.write_digits_folder`), trained here with SGD in two learning-rate stages, the first
epoch with the "backbone" frozen (only the bias trains, standing in for the head-only phase).
Metrics come from `spinal_transfer.metrics.classification_metrics`, the best epoch is picked on
val, the test CSV is written with `interpret.write_predictions_csv`. config.yaml is the
TrainConfig that such a run would have (its backbone and head are what the page shows; the
numbers are this stand-in's, so a page test checks what the page does with them).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spinal_transfer.config import TrainConfig
from spinal_transfer.images import BadImage, load_image
from spinal_transfer.interpret import write_predictions_csv
from spinal_transfer.metrics import classification_metrics, summary


def _split(data: Path, split: str, classes: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    paths, feats, ys = [], [], []
    for y, c in enumerate(classes):
        for p in sorted((data / split / c).glob("*.png")):
            img = load_image(p).astype(np.float32).mean(axis=2) / 255.0     # 32x32 grey
            feats.append(img.reshape(8, 4, 8, 4).mean(axis=(1, 3)).ravel())  # 8x8 blocks
            paths.append(str(p))
            ys.append(y)
    return paths, np.stack(feats), np.asarray(ys)


def _bad_files(root: Path) -> list[tuple[str, str]]:
    """Two files the decoder refuses, with the reason it gives (as the data scan would list them)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.png").write_bytes(b"")
    png = (root / "ok.png")
    Image.new("RGB", (16, 16), (200, 10, 10)).save(png)
    (root / "truncated.png").write_bytes(png.read_bytes()[:40])
    png.unlink()
    out = []
    for p in sorted(root.iterdir()):
        try:
            load_image(p)
        except BadImage as e:
            out.append((str(p), str(e)))
    return out


def make_run_folder(run: Path, data: Path, epochs: tuple[int, int] = (4, 2), seed: int = 0) -> Path:
    """Train, evaluate and write RUN/ as the restructured `train` will; returns `run`."""
    classes = sorted(d.name for d in (data / "train").iterdir() if d.is_dir())
    (tr_p, tr_x, tr_y), (va_p, va_x, va_y), (te_p, te_x, te_y) = (_split(data, s, classes)
                                                                  for s in ("train", "val", "test"))
    torch.manual_seed(seed)
    model = torch.nn.Linear(64, len(classes))
    X = {k: torch.tensor(v) for k, v in (("train", tr_x), ("val", va_x), ("test", te_x))}
    Y = {k: torch.tensor(v) for k, v in (("train", tr_y), ("val", va_y), ("test", te_y))}
    stages = [{"epochs": epochs[0], "lr": 0.5}, {"epochs": epochs[1], "lr": 0.05}]
    cfg = TrainConfig(data=str(data), backbone="timm/resnet18", weights="default", head="spinal", layer_width=64,
                      stages=stages, freeze_epochs=1, batch_size=64, augment="modern", out=str(run), img_size=32,
                      resize_size=32, interpolation="bilinear", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    run.mkdir(parents=True, exist_ok=True)
    cfg.save(run / "config.yaml")
    (run / "classes.json").write_text(json.dumps(classes, indent=1))
    skipped = _bad_files(run.parent / f"{run.name}-unreadable")
    (run / "skipped_files.txt").write_text("".join(f"{p}\t{r}\n" for p, r in skipped))

    rows, best, best_epoch, best_state, epoch = [], -1.0, 0, None, 0
    g = torch.Generator().manual_seed(seed)
    for si, st in enumerate(stages, 1):
        opt = torch.optim.SGD(model.parameters(), lr=st["lr"], momentum=0.9)
        for _ in range(st["epochs"]):
            epoch += 1
            frozen = epoch <= cfg.freeze_epochs
            model.weight.requires_grad_(not frozen)
            t0, losses, correct = time.perf_counter(), [], 0
            for idx in torch.randperm(len(Y["train"]), generator=g).split(cfg.batch_size):
                out = model(X["train"][idx])
                loss = torch.nn.functional.cross_entropy(out, Y["train"][idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item() * len(idx))
                correct += int((out.argmax(1) == Y["train"][idx]).sum())
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                val_m = classification_metrics(model(X["val"]), Y["val"], classes)
            rows.append({"epoch": epoch, "stage": si, "lr": opt.param_groups[0]["lr"],
                         "train_loss": sum(losses) / len(Y["train"]), "train_top1": correct / len(Y["train"]),
                         "train_images_per_s": len(Y["train"]) / max(seconds, 1e-9), "frozen": frozen,
                         "seconds": seconds, "val": summary(val_m)})
            if val_m["top1"] > best:
                best, best_epoch = val_m["top1"], epoch
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model.load_state_dict(best_state)
    with torch.no_grad():
        val_logits, test_logits = model(X["val"]), model(X["test"])
    val_m = classification_metrics(val_logits, Y["val"], classes)
    test_m = classification_metrics(test_logits, Y["test"], classes)
    write_predictions_csv(run / "test_predictions.csv", te_p, test_logits, Y["test"], classes)
    report = {"best_epoch": best_epoch, "selected_on": "val", "val": val_m, "test": test_m, "classes": classes,
              "num_skipped_files": len(skipped), "num_images": {"train": len(tr_p), "val": len(va_p), "test": len(te_p)},
              "head": {"backbone": cfg.backbone, "head": "spinal", "feature_width": 512, "head_params": 84_170,
                       "head_macs": 83_840, "default_head_params": 5_130, "default_head_macs": 5_120}}
    (run / "report.json").write_text(json.dumps(report, indent=1))
    _batch_preview(tr_p[:: max(1, len(tr_p) // 16)][:16], run / "plots" / "batch.png")
    assert not math.isnan(test_m["loss"])
    return run


def _batch_preview(paths: list[str], out: Path) -> None:
    """A 4x4 mosaic of training images, as the training loop's batch preview would be."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tiles = [Image.fromarray(load_image(p)).resize((64, 64)) for p in paths]
    sheet = Image.new("RGB", (4 * 66, 4 * 66), (255, 255, 255))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % 4) * 66 + 1, (i // 4) * 66 + 1))
    sheet.save(out)
