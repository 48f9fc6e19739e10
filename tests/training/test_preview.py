"""`show-batch` / plots/batch.png: the grid shows exactly what the training pipeline gives the model."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_cfg
from PIL import Image

from spinal_transfer.cli import main as cli
from spinal_transfer.data.augment import Augmentation
from spinal_transfer.data.loaders import EpochSampler, ImageDataset
from spinal_transfer.data.splits import scan
from spinal_transfer.data.transforms import build_transforms
from spinal_transfer.models.preprocess import resolve_data_config
from spinal_transfer.training.preview import denormalize, show_batch, training_pipeline, write_batch_preview


def _tile(png: np.ndarray, box: tuple[int, int, int], scale: int) -> np.ndarray:
    top, left, side = box
    return png[top:top + side:scale, left:left + side:scale]


@pytest.mark.parametrize("policy", ["light", "trivial"])
def test_grid_pixels_are_the_pipelines_output_for_that_image_and_seed(digits_folder, tmp_path, policy):
    samples = scan(digits_folder).train
    classes = scan(digits_folder).classes
    dc = resolve_data_config("timm/test_resnet", "none", img_size=32)
    aug = Augmentation(policy, random_erase=0.3)
    preview = write_batch_preview(samples, build_transforms(dc, True, aug), classes, dc.mean, dc.std,
                                  tmp_path / "plots" / "batch.png", n=12, seed=7)
    png = np.asarray(Image.open(preview.path).convert("RGB"))
    sampler = EpochSampler(len(samples), 7)
    sampler.set_epoch(1)
    assert list(zip(preview.indices, preview.seeds)) == list(sampler)[:12]      # the run's first batch
    fresh = ImageDataset(samples, build_transforms(dc, True, aug))              # built independently
    plain = ImageDataset(samples, build_transforms(dc, False))
    augmented = 0
    for j, (i, s) in enumerate(zip(preview.indices, preview.seeds)):
        expected = denormalize(fresh[(i, s)][0], dc.mean, dc.std)
        shown = _tile(png, preview.boxes[j], preview.scale)
        assert np.array_equal(shown, expected), j
        augmented += not np.array_equal(shown, denormalize(plain[i][0], dc.mean, dc.std))
    assert augmented >= 10                  # it shows the training transforms, not the evaluation pipeline
    assert preview.scale == 3 and png.shape[1] == 8 * (96 + 4) + 4


def test_show_batch_cli_builds_trains_pipeline_offline(digits_folder, tmp_path, capsys):
    out = tmp_path / "b.png"
    args = ["show-batch", "--data", str(digits_folder), "--backbone", "timm/test_resnet", "--weights", "none",
            "--img-size", "32", "--augment", "modern", "--batch-size", "8", "--seed", "3", "--out", str(out)]
    assert cli(args) == 0
    assert "wrote" in capsys.readouterr().err and out.is_file()
    cfg = tiny_cfg(digits_folder, tmp_path / "unused", augment="modern", batch_size=8, seed=3)
    samples, classes, dc, tf = training_pipeline(cfg)
    again = show_batch(cfg, tmp_path / "again.png")
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again.path)))      # deterministic
    assert len(again.indices) == 8 and dc.img_size == 32 and classes[0] == "digit_0"


def test_cached_feature_mode_shows_and_reports_no_augmentation(digits_folder, tmp_path, capsys):
    """QA 29: with --freeze-backbone --cache-features the backbone runs once on unaugmented images, but show-batch
    drew RandAugment'ed ones and the report page said "augmentation randaugment"."""
    from spinal_transfer.evaluation.report_page import run_settings

    cfg = tiny_cfg(digits_folder, tmp_path / "unused", augment="randaugment", freeze_backbone=True,
                   cache_features=True, batch_size=8)
    samples, classes, dc, tf = training_pipeline(cfg)
    plain = ImageDataset(samples, build_transforms(dc, False))
    preview = show_batch(cfg, tmp_path / "b.png")
    png = np.asarray(Image.open(preview.path).convert("RGB"))
    for j, i in enumerate(preview.indices):
        assert np.array_equal(_tile(png, preview.boxes[j], preview.scale), denormalize(plain[i][0], dc.mean, dc.std))
    assert run_settings(cfg.to_dict())["augmentation"].startswith("none (cached features: the backbone ran once")
    assert run_settings({**cfg.to_dict(), "cache_features": False})["augmentation"].startswith("randaugment")


def test_show_batch_without_data_is_a_one_line_error(capsys):
    assert cli(["show-batch", "--backbone", "timm/test_resnet"]) == 2
    assert "--data DIR is required" in capsys.readouterr().err
