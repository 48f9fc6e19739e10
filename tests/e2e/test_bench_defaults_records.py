"""bench_defaults shares one record between settings that train the same way, and only those: its key is the
configuration as it trains on the folder (the length rule resolved to epochs), so --min-steps 600 and the defaults
share digits100's 20 epochs while every setting that changes training keeps its own runs."""
from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import pytest  # noqa: E402

import bench_defaults as bd  # noqa: E402
from spinal_transfer.config import TrainConfig  # noqa: E402


@pytest.fixture(autouse=True)
def auto_chooses(monkeypatch) -> list:
    """--bn-stats auto measured on a folder: here its choice is set (these keys name no folder); [0] is it."""
    choice = ["update"]
    monkeypatch.setattr(bd, "bn_choice", lambda *a: (choice[0], 0.5))
    return choice


def key(n_train: int, **options) -> str:
    return bd.run_key(bd.as_trained(TrainConfig(**options), n_train))


def epochs(n_train: int, **options) -> int:
    return bd.as_trained(TrainConfig(**options), n_train)["epochs"]


def test_the_length_rule_resolves_to_trains_epochs():
    d = TrainConfig()
    for n in (40, 150, 192, 320, 1000, 5000):           # one partial batch, then full batches only (drop_last)
        steps = n // d.batch_size if n >= 2 * d.batch_size else math.ceil(n / d.batch_size)
        assert epochs(n) == max(d.min_epochs, math.ceil(d.min_steps / steps)), n
    assert epochs(1000, epochs=7) == 7 and epochs(150, limit_train_batches=2) == 150     # 300 steps of 2 batches


def test_settings_that_train_alike_share_a_key_and_the_others_do_not():
    assert key(1000) == key(1000, min_steps=600)                        # 31 steps an epoch: 20 epochs both
    assert key(1000, min_epochs=10) == key(1000, epochs=10)             # the old floor is --epochs 10 there
    assert key(150) != key(150, min_steps=600)                          # 75 against 150 epochs
    assert key(150) == key(150, min_epochs=10)                          # the floor does not bind on 150 images
    assert key(1000) != key(1000, lr=2e-3) and key(1000, seed=1) != key(1000)
    assert key(1000, randaugment_m=9) == key(1000, randaugment_m=9.0)   # 9 and 9.0 are one setting


def test_the_crop_scale_and_flip_in_force_are_the_key_not_none(monkeypatch):
    """A record of the policy's own crop scale is keyed by that scale: the explicit same scale shares it, and a
    changed policy default (here the default policy's, as adopting timm's crops did) does not reuse the old records."""
    from spinal_transfer.data import augment

    scale = list(augment.DEFAULT_CROP_SCALE[TrainConfig().augment])
    assert key(150) == key(150, rrc_scale=scale) == key(150, hflip=augment.DEFAULT_HFLIP[TrainConfig().augment])
    before = key(150)
    monkeypatch.setitem(augment.DEFAULT_CROP_SCALE, TrainConfig().augment, (0.5, 1.0))
    assert key(150) != before and key(150) == key(150, rrc_scale=[0.5, 1.0])


def test_auto_bn_stats_shares_the_record_of_what_it_chose(auto_chooses):
    """--bn-stats auto (the default) is keyed as the folder resolves it: the record of BN stats update or of BN stats
    frozen, whichever it chose; a head with dropout updates whatever the folder (train's bn_stats.resolve); and a run
    recorded before the option existed, which updated its statistics, keeps its key."""
    assert key(150) == key(150, bn_stats="update") != key(150, bn_stats="frozen")
    auto_chooses[0] = "frozen"
    assert key(150) == key(150, bn_stats="frozen") != key(150, bn_stats="update")
    assert key(150, head_dropout=0.5) == key(150, head_dropout=0.5, bn_stats="update")
    assert key(150, head="linear") == key(150, head="linear", bn_stats="frozen")
    assert "bn_stats" not in bd.run_key(bd.as_trained(TrainConfig(bn_stats="update"), 150))   # as before the option


def test_every_named_setting_is_a_valid_config_and_the_variants_change_training(auto_chooses):
    for choice in ("update", "frozen"):
        auto_chooses[0] = choice
        base = key(150)
        same_as_defaults = {"defaults", "10-epoch floor", f"BN stats {choice}"}
        for name in bd.settings_to_run(list(bd.SETTINGS)):
            cfg = TrainConfig(**bd.SETTINGS[name])
            assert name == "defaults" or cfg != TrainConfig(), name
            assert name in same_as_defaults or key(150, **bd.SETTINGS[name]) != base, name
