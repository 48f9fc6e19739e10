"""Cached-feature mode: same metrics as the uncached frozen run, and a stale cache is never reused."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import write_digits_folder
from spinal_transfer.config import TrainConfig
from spinal_transfer.train import run

BASE = dict(backbone="timm/test_resnet", weights="none", head="spinal", head_preset="resnet", layer_width=16,
            img_size=32, batch_size=64, workers=0, augment="none", lr=0.05, scheduler="none", epochs=2,
            freeze_backbone=True, log_interval=1000)


def _features(run_dir):
    return sorted(p.name for p in (run_dir / "features").glob("*.npy"))


def test_cached_run_matches_uncached_frozen_run(digits_folder, tmp_path):
    cfg = TrainConfig(**BASE, data=str(digits_folder), out=str(tmp_path / "plain"))
    plain = run(cfg)
    cached = run(dataclasses.replace(cfg, cache_features=True, out=str(tmp_path / "cached")))
    assert len(_features(tmp_path / "cached")) == 3
    for split in ("val", "test"):
        for k in ("top1", "top5", "macro_f1"):
            assert cached[split][k] == pytest.approx(plain[split][k], abs=1e-6), (split, k)
        assert cached[split]["loss"] == pytest.approx(plain[split]["loss"], rel=1e-4, abs=1e-5)
    a = torch.load(tmp_path / "plain" / "checkpoints" / "best.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cached" / "checkpoints" / "best.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_changed_preprocessing_or_weight_file_invalidates_cache(tmp_path):
    digits_folder = write_digits_folder(tmp_path / "digits", digits=(0, 1, 2))
    # a backbone checkpoint to start from, saved by a short run
    src = tmp_path / "src"
    run(TrainConfig(**{**BASE, "epochs": 1, "freeze_backbone": False, "limit_train_batches": 2},
                    data=str(digits_folder), out=str(src)))
    weights = src / "checkpoints" / "best.pt"
    out = tmp_path / "cached"
    cfg = TrainConfig(**{**BASE, "epochs": 1, "weights": str(weights)}, data=str(digits_folder), out=str(out),
                      cache_features=True)
    run(cfg)
    first = _features(out)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "features").glob("*.npy")}
    run(cfg)                                   # unchanged: the cache is reused, not rewritten
    assert _features(out) == first
    assert {p: p.stat().st_mtime_ns for p in (out / "features").glob("*.npy")} == mtimes

    run(dataclasses.replace(cfg, mean=[0.4, 0.4, 0.4]))          # other preprocessing
    second = _features(out)
    assert second != first and len(second) == 3

    ckpt = torch.load(weights, weights_only=True)                # same file name, other contents
    ckpt["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, weights)
    run(dataclasses.replace(cfg, mean=[0.4, 0.4, 0.4]))
    third = _features(out)
    assert third != second and len(third) == 3
    meta = json.loads(next((out / "features").glob("train-*.json")).read_text())
    assert f"train-{meta['fingerprint']}.npy" in third


def test_cache_requires_frozen_backbone():
    with pytest.raises(ValueError, match="freeze_backbone"):
        TrainConfig(cache_features=True).validate()
