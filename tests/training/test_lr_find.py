"""The learning-rate range test: the suggestion rule, a real sweep on the digits, nothing of the model changed."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import tiny_cfg
from spinal_transfer.cli import main as cli
from spinal_transfer.training.lr_find import find_lr, lr_find_for_config, steepest, suggest, sweep_lrs, valley
from spinal_transfer.training.step import StepSettings


def _curve(lrs, noise: float = 0.0, seed: int = 0):
    """Flat until 1e-4, falling until 1e-2, rising sharply after: the textbook range-test shape."""
    rng = np.random.default_rng(seed)
    out = []
    for lr in lrs:
        x = math.log10(lr)
        y = 2.3 if x < -4 else 2.3 - 0.9 * (x + 4) if x < -2 else 0.5 + 3.0 * (x + 2) ** 2
        out.append(y + noise * rng.standard_normal())
    return out


def test_sweep_is_exponential_from_start_to_end():
    lrs = sweep_lrs(1e-6, 1.0, 7)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert np.allclose(np.diff(np.log10(lrs)), 1.0)


@pytest.mark.parametrize("rule", ["valley", "steepest"])
def test_rules_pick_the_falling_stretch(rule):
    lrs = sweep_lrs(1e-7, 10, 200)
    lr = suggest(lrs, _curve(lrs), rule)
    assert 1e-4 < lr < 1e-2, lr


def test_valley_lies_half_way_along_the_longest_descent_and_survives_noise():
    lrs = sweep_lrs(1e-7, 10, 200)
    clean = valley(lrs, _curve(lrs))
    assert 10 ** -3.5 < clean < 10 ** -2.5                  # the middle of the 1e-4..1e-2 descent, in decades
    noisy = [valley(lrs, _curve(lrs, noise=0.02, seed=s)) for s in range(5)]
    assert all(1e-4 < v < 1e-2 for v in noisy), noisy
    assert steepest(lrs, _curve(lrs)) < 1e-2


def _model_and_batches(digits_folder):
    from spinal_transfer.models.heads import head_options
    from spinal_transfer.data.loaders import EpochSampler, make_loader
    from spinal_transfer.data.splits import scan
    from spinal_transfer.models.surgery import build_model
    from spinal_transfer.data.augment import Augmentation
    from spinal_transfer.data.transforms import build_transforms
    from spinal_transfer.models.preprocess import resolve_data_config

    cfg = tiny_cfg(digits_folder, "unused", head_preset="vgg")      # dropout and BatchNorm in the head
    splits = scan(digits_folder)
    torch.manual_seed(0)
    model = build_model(cfg.backbone, 10, head="spinal", weights="none", **head_options(cfg))
    dc = resolve_data_config(cfg.backbone, "none", model, img_size=32)
    loader = make_loader(splits.train, build_transforms(dc, True, Augmentation("light")), 32, 0,
                         torch.device("cpu"), EpochSampler(len(splits.train), 0))
    return model, [(x, y) for (x, y, *_), _ in zip(loader, range(8))]       # 8 batches, passed over again


def test_find_lr_leaves_model_and_rng_untouched_and_suggests_inside_the_sweep(digits_folder, tmp_path):
    from spinal_transfer.training.optim import FreezePolicy, make_optimizer

    model, batches = _model_and_batches(digits_folder)
    model.eval()
    FreezePolicy().apply(model, frozen=True)        # the copy is unfrozen below: this model's flags must stay
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    modes = {k: m.training for k, m in model.named_modules()}
    rng = torch.get_rng_state()
    result = find_lr(model, batches, lambda m: make_optimizer(m, "sgd", 1.0, backbone_lr_mult=0.1),
                     StepSettings(torch.device("cpu")), start_lr=1e-3, end_lr=100.0, num_steps=50,
                     prepare=lambda m: FreezePolicy().apply(m, frozen=False))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)                 # weights and BN statistics
    assert grads == {k: p.requires_grad for k, p in model.named_parameters()}
    assert modes == {k: m.training for k, m in model.named_modules()}
    assert torch.equal(rng, torch.get_rng_state())
    assert result.lrs[0] <= result.suggestion <= result.lrs[-1]
    assert 1e-3 <= result.lrs[0] and result.lrs[-1] <= 100.0 and result.suggestion < result.lrs[-1] / 3
    assert result.stopped == "loss diverged" and len(result.lrs) < 50        # lr 100 blows up a fresh head
    assert min(result.losses) < max(result.losses[:10])                      # a valley before the divergence


def test_lr_find_cli_on_the_digits_writes_the_plot_and_prints_the_lr(digits_folder, tmp_path, capsys):
    png = tmp_path / "lr_find.png"
    args = ["lr-find", "--data", str(digits_folder), "--backbone", "timm/test_resnet", "--weights", "none",
            "--layer-width", "32", "--img-size", "32", "--workers", "0", "--augment", "none",
            "--optimizer", "sgd", "--weight-decay", "0", "--freeze-epochs", "0",      # as tiny_cfg below, whose
            "--label-smoothing", "0",                                                  # loss has no smoothing
            "--num-steps", "30", "--start-lr", "1e-3", "--out", str(png)]
    assert cli(args) == 0
    out, err = capsys.readouterr()
    lr = float(out.strip())
    assert 1e-3 <= lr <= 10 and "valley rule" in err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    again = lr_find_for_config(tiny_cfg(digits_folder, "unused", augment="none"), None, start_lr=1e-3,
                               num_steps=30)
    assert again.suggestion == pytest.approx(lr, rel=1e-2)      # seeded: the same sweep gives the same answer


def test_a_train_split_smaller_than_a_batch_is_said(three_digits, tmp_path):
    import shutil

    from spinal_transfer.data.splits import config_splits

    for d in sorted((three_digits / "train").iterdir())[:2]:       # 2 classes x 10 images, split off as the user's
        (tmp_path / "small" / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[:10]:
            shutil.copy(f, tmp_path / "small" / d.name)
    cfg = tiny_cfg(tmp_path / "small", tmp_path / "unused", augment="none")
    n = len(config_splits(cfg).train)
    notes = {b: [note for note in lr_find_for_config(tiny_cfg(tmp_path / "small", tmp_path / "unused", augment="none",
                                                              batch_size=b), None, start_lr=1e-3,
                                                     num_steps=10).notes if "fewer than one batch" in note]
             for b in (n, n + 1)}
    assert notes == {n: [], n + 1: [
        f"the train split has {n} images, fewer than one batch (--batch-size {n + 1}): every sweep step trains on "
        "the same images, so the loss falls as they are memorised and the suggestion is rough"]}
