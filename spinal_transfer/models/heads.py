"""Classifier heads: SpinalNet, MLP and linear, behind one factory (`create_head`).

Every head maps a (batch, in_features) vector to (batch, num_classes) logits and reports its own
parameter and multiply-accumulate counts in closed form, so `describe` can compare heads without
building a backbone.
"""
from __future__ import annotations

import inspect
from typing import List, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "leaky_relu": nn.LeakyReLU, "silu": nn.SiLU,
               "tanh": nn.Tanh, "identity": nn.Identity}

# The paper's two transfer heads (Kabir et al., SpinalNet_ResNet and SpinalNet_VGG in their scripts).
SPINAL_PRESETS = {
    "resnet": dict(dropout=0.0, batch_norm=False),
    "vgg": dict(dropout=0.5, batch_norm=True),
}


def split_sizes(in_features: int, num_splits: int) -> List[int]:
    """Contiguous part sizes that cover every feature.

    When `in_features` is not divisible, the first `in_features % num_splits` parts get one extra
    feature (as `torch.tensor_split`). For even widths and 2 splits this is the paper's two halves;
    the paper's own `round(D/2)` slicing would drop or overrun a feature for odd D.
    """
    if not 1 <= num_splits <= in_features:
        raise ConfigError(f"num_splits must be in [1, in_features={in_features}], got {num_splits}")
    base, extra = divmod(in_features, num_splits)
    return [base + (1 if i < extra else 0) for i in range(num_splits)]


class _Post(nn.Module):
    """What follows a spinal Linear: optional BatchNorm1d, then the activation."""

    def __init__(self, width: int, batch_norm: bool, activation: str):
        super().__init__()
        self.norm = nn.BatchNorm1d(width) if batch_norm else nn.Identity()
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(x))


class SpinalHead(nn.Module):
    """SpinalNet fully connected head (Kabir et al., IEEE TAI 2022).

    Layer i (0-based) sees input part `i % num_splits`, concatenated (part first) with layer
    i-1's output for i > 0; each layer is [dropout] -> Linear -> [BatchNorm1d] -> activation. All
    layer outputs are concatenated into a final [dropout] -> Linear. With `shared_weights`, layers
    1..L-1 share one Linear (the authors' "spinally shared layers"), which needs equal part sizes.
    """

    def __init__(self, in_features: int, num_classes: int, layer_width: int, num_layers: int = 4,
                 num_splits: int = 2, dropout: float = 0.0, batch_norm: bool = False,
                 activation: str = "relu", shared_weights: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation {activation!r} not in {sorted(ACTIVATIONS)}")
        if num_layers < 1 or layer_width < 1 or num_classes < 1:
            raise ConfigError("num_layers, layer_width and num_classes must be >= 1")
        sizes = split_sizes(in_features, num_splits)
        if shared_weights and len(set(sizes)) != 1:
            raise ConfigError(f"shared_weights needs in_features ({in_features}) divisible by num_splits ({num_splits})")
        self.in_features, self.num_classes, self.layer_width = in_features, num_classes, layer_width
        self.num_layers, self.num_splits, self.split_sizes = num_layers, num_splits, sizes
        self.dropout, self.batch_norm, self.activation = float(dropout), bool(batch_norm), activation
        self.shared_weights = bool(shared_weights)

        in_widths = [sizes[i % num_splits] + (layer_width if i else 0) for i in range(num_layers)]
        unique = in_widths[:2] if shared_weights else in_widths
        self.linears = nn.ModuleList(nn.Linear(w, layer_width) for w in unique)
        self.posts = nn.ModuleList(_Post(layer_width, batch_norm, activation) for _ in range(num_layers))
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc_out = nn.Linear(num_layers * layer_width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        parts = torch.split(x, self.split_sizes, dim=1)
        outs: List[torch.Tensor] = []
        last = len(self.linears) - 1
        for i, post in enumerate(self.posts):
            z = parts[i % self.num_splits]
            if i > 0:
                z = torch.cat([z, outs[i - 1]], dim=1)
            z = self.drop(z)
            # Pick layer i's Linear (the shared one for i >= 1 when weights are shared). A loop
            # rather than `self.linears[idx]` keeps the head scriptable with TorchScript.
            idx = min(i, last)
            for j, linear in enumerate(self.linears):
                if j == idx:
                    z = linear(z)
            outs.append(post(z))
        return self.fc_out(self.drop(torch.cat(outs, dim=1)))

    @classmethod
    def from_preset(cls, preset: str, in_features: int, num_classes: int, layer_width: int, **kw) -> "SpinalHead":
        if preset not in SPINAL_PRESETS:
            raise ConfigError(f"unknown spinal preset {preset!r}; choose from {sorted(SPINAL_PRESETS)}")
        return cls(in_features, num_classes, layer_width, **{**SPINAL_PRESETS[preset], **kw})

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, width={self.layer_width}, "
                f"layers={self.num_layers}, splits={self.split_sizes}, dropout={self.dropout}, "
                f"batch_norm={self.batch_norm}, shared={self.shared_weights}")

    def _in_widths(self) -> List[int]:
        return [self.split_sizes[i % self.num_splits] + (self.layer_width if i else 0) for i in range(self.num_layers)]

    def num_params(self) -> int:
        """Closed form: sum over distinct Linears of (in+1)*w, 2w per BatchNorm, L*w*C + C out."""
        w, C, L = self.layer_width, self.num_classes, self.num_layers
        widths = self._in_widths()
        linears = widths[:2] if self.shared_weights else widths
        return sum((n + 1) * w for n in linears) + (2 * w * L if self.batch_norm else 0) + L * w * C + C

    def macs(self) -> int:
        """Multiply-accumulates per sample (bias, BN and activations excluded, as in the paper)."""
        return sum(n * self.layer_width for n in self._in_widths()) + self.num_layers * self.layer_width * self.num_classes


class MLPHead(nn.Module):
    """[dropout] -> Linear -> activation per hidden width, then [dropout] -> Linear (VGG's classifier shape)."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (4096, 4096),
                 dropout: float = 0.5, activation: str = "relu"):
        super().__init__()
        self.in_features, self.num_classes, self.hidden = in_features, num_classes, list(hidden)
        self.dropout, self.activation = float(dropout), activation
        layers: List[nn.Module] = []
        width = in_features
        for h in self.hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, hidden={self.hidden}, num_classes={self.num_classes}, "
                f"dropout={self.dropout}, activation={self.activation}")

    def num_params(self) -> int:
        widths = [self.in_features, *self.hidden, self.num_classes]
        return sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))

    def macs(self) -> int:
        widths = [self.in_features, *self.hidden, self.num_classes]
        return sum(a * b for a, b in zip(widths[:-1], widths[1:]))


class LinearHead(nn.Linear):
    """A plain Linear that flattens first, so it also sits where a pooled map arrives."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(1))

    @property
    def num_classes(self) -> int:
        return self.out_features

    def num_params(self) -> int:
        return (self.in_features + 1) * self.out_features

    def macs(self) -> int:
        return self.in_features * self.out_features


HEAD_KINDS = ("linear", "mlp", "spinal")
MIN_LAYER_WIDTH = 32


def default_layer_width(in_features: int, num_classes: int) -> int:
    """The spinal layer width for a head of `num_classes` on `in_features` features when none is given:
    twice the class count, at least MIN_LAYER_WIDTH (32), at most a quarter of the feature width (but never below
    the floor), rounded up to a multiple of 8.

    Why: the paper sized its ResNet-preset heads by the class count (CIFAR-10: 20, CIFAR-100: 200, Caltech-101: 101,
    Flowers: 102, Cars: 196), i.e. C to 2C, not a constant. A constant 512 gives a 4-class folder a head of
    about 1.3M parameters on 2048 features, ~640x the linear head, with four 512-wide layers that each see only half
    the features; 2C keeps every layer wide enough to carry a score per class with room to spare, the floor keeps
    2- to 15-class heads from being a bottleneck of a few units, and the cap keeps a 1000-class head on a narrow
    backbone (e.g. 512 features) from being wider than the features it reads. Multiples of 8 suit matrix kernels.
    benchmarks/bench_defaults.py compares it with 512 and with the class count."""
    if in_features < 1 or num_classes < 1:
        raise ConfigError(f"in_features and num_classes must be >= 1, got {in_features}, {num_classes}")
    width = min(2 * num_classes, max(MIN_LAYER_WIDTH, in_features // 4))
    width = max(width, MIN_LAYER_WIDTH)
    return int(-(-width // 8) * 8)


def create_head(kind: str, in_features: int, num_classes: int, *, preset: Optional[str] = "resnet",
                layer_width: Optional[int] = None, num_layers: int = 4, num_splits: int = 2,
                dropout: Optional[float] = None, batch_norm: Optional[bool] = None, activation: str = "relu",
                shared_weights: bool = False, hidden: Sequence[int] = (4096, 4096)) -> nn.Module:
    """The one head factory. `dropout`/`batch_norm` left as None take the spinal preset's values
    (mlp: dropout 0.5 as in VGG's classifier); a spinal `layer_width` left as None is
    `default_layer_width(in_features, num_classes)`, so the rule sees the width that actually reaches the head.
    Arguments are checked here, each named as a caller spells it (a float width or a dropout of 1.5 would fail
    inside torch, and a negative dropout would be taken as none)."""
    for name, value in (("in_features", in_features), ("num_classes", num_classes), ("layer_width", layer_width),
                        ("num_layers", num_layers), ("num_splits", num_splits), *(("hidden", h) for h in hidden)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name}={value!r}: expected a whole number >= 1", key=name)
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                                or not 0 <= dropout < 1):
        raise ConfigError(f"dropout={dropout!r}: expected a probability in [0, 1)", key="dropout")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation={activation!r}: expected one of {sorted(ACTIVATIONS)}", key="activation")
    if kind == "linear":
        return LinearHead(in_features, num_classes)
    if kind == "mlp":
        return MLPHead(in_features, num_classes, hidden, 0.5 if dropout is None else dropout, activation)
    if kind == "spinal":
        if preset and preset not in SPINAL_PRESETS:
            raise ConfigError(f"unknown spinal preset {preset!r}; choose from {sorted(SPINAL_PRESETS)}")
        base = dict(SPINAL_PRESETS[preset]) if preset else dict(dropout=0.0, batch_norm=False)
        if dropout is not None:
            base["dropout"] = dropout
        if batch_norm is not None:
            base["batch_norm"] = batch_norm
        width = default_layer_width(in_features, num_classes) if layer_width is None else layer_width
        return SpinalHead(in_features, num_classes, width, num_layers, num_splits,
                          activation=activation, shared_weights=shared_weights, **base)
    raise ConfigError(f"unknown head kind {kind!r}; choose from {HEAD_KINDS}")


# create_head's keyword-only options: what build_model passes on to it
HEAD_OPTIONS = tuple(p.name for p in inspect.signature(create_head).parameters.values() if p.kind is p.KEYWORD_ONLY)


def head_options(cfg) -> dict:
    """The `create_head` keyword arguments a TrainConfig asks for."""
    return dict(preset=cfg.head_preset, layer_width=cfg.layer_width, num_layers=cfg.num_layers,
                num_splits=cfg.num_splits, dropout=cfg.head_dropout, shared_weights=cfg.shared_weights,
                hidden=tuple(cfg.mlp_hidden))
