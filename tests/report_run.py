"""A real run folder for the report-page tests: a tiny `train.run` on a copy of the digits folder with two
unreadable files in it, two learning-rate stages, the first epoch with the backbone frozen."""
from __future__ import annotations

import shutil
from pathlib import Path

import timm
import torch
from PIL import Image

from spinal_transfer.config import TrainConfig
from spinal_transfer.data.images import load_image
from spinal_transfer.training.train import run as train


def make_run_folder(run: Path, data: Path, epochs: tuple[int, int] = (2, 1), seed: int = 0) -> Path:
    """Train into `run` on a copy of `data` (plus an empty and a text '.png', which the scan skips); returns
    `run`."""
    folder = run.parent / f"{run.name}-data"
    shutil.copytree(data, folder)
    (folder / "train" / "digit_0" / "empty.png").write_bytes(b"")
    (folder / "train" / "digit_1" / "notes.png").write_text("not a picture\n")
    stages = [{"epochs": epochs[0], "lr": 0.05}, {"epochs": epochs[1], "lr": 0.005}]
    weights = run.parent / f"{run.name}-backbone.pt"      # a weights file: --weights none would skip the frozen epoch
    torch.manual_seed(seed)
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    train(TrainConfig(data=str(folder), backbone="timm/test_resnet", weights=str(weights), head="spinal",
                      layer_width=64, stages=stages, freeze_epochs=1, batch_size=64, augment="none", out=str(run),
                      img_size=32, workers=0, seed=seed, scheduler="none", limit_train_batches=8))
    if not (run / "plots" / "batch.png").exists():
        _batch_preview(sorted(str(p) for p in (folder / "train").rglob("*.png"))[::60][:16],
                       run / "plots" / "batch.png")
    return run


def _batch_preview(paths: list[str], out: Path) -> None:
    """A 4x4 mosaic of training images, as the training loop's batch preview would be."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tiles = [Image.fromarray(load_image(p)).resize((64, 64)) for p in paths]
    sheet = Image.new("RGB", (4 * 66, 4 * 66), (255, 255, 255))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % 4) * 66 + 1, (i // 4) * 66 + 1))
    sheet.save(out)
