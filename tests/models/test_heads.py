"""SpinalHead / MLPHead / LinearHead: parameter and MAC counts against closed forms and the reference
tables (paper-recipes.md A4 and E), forward against an independent matmul-by-matmul computation of the
definition, TorchScript / torch.compile parity, batch-1 behaviour and argument validation."""
from __future__ import annotations

import itertools
import time

import pytest
import torch
from torch import nn

from spinal_transfer.models.heads import SPINAL_PRESETS, LinearHead, MLPHead, SpinalHead, create_head, split_sizes

# ----------------------------------------------------------------------------------------------------
# helpers written independently of heads.py


def expected_parts(d: int, n: int) -> list[tuple[int, int]]:
    """Contiguous [a, b) column ranges: the first d % n parts one wider (torch.tensor_split's rule)."""
    bounds = [0]
    for i in range(n):
        bounds.append(bounds[-1] + d // n + (1 if i < d % n else 0))
    return list(zip(bounds[:-1], bounds[1:]))


def formula_params(d: int, c: int, w: int, layers: int, splits: int, bn: bool, shared: bool) -> int:
    """Closed form, written out: layer 0 sees part 0; layer i>0 sees part i%n plus w; each Linear has a bias."""
    parts = [b - a for a, b in expected_parts(d, splits)]
    ins = [parts[i % splits] + (w if i else 0) for i in range(layers)]
    distinct = ins[:2] if shared else ins
    return sum(n * w + w for n in distinct) + (2 * w * layers if bn else 0) + layers * w * c + c


def formula_macs(d: int, c: int, w: int, layers: int, splits: int) -> int:
    parts = [b - a for a, b in expected_parts(d, splits)]
    return sum((parts[i % splits] + (w if i else 0)) * w for i in range(layers)) + layers * w * c


def counted_macs(head: nn.Module, d: int) -> int:
    """Multiplies per sample actually performed by the head's Linear calls (shared Linears count per call)."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        total += m.in_features * m.out_features

    hooks = [m.register_forward_hook(hook) for m in head.modules() if isinstance(m, nn.Linear)]
    head.eval()
    with torch.no_grad():
        out = head(torch.zeros(1, d))
    assert out.shape == (1, head.num_classes)
    for h in hooks:
        h.remove()
    return total


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_head(*args, **kw) -> nn.Module:
    """Big heads are built on the meta device: shapes and counts without allocating or initialising."""
    with torch.device("meta"):
        return create_head(*args, **kw)


# ----------------------------------------------------------------------------------------------------
# parameter and MAC counts


GRID = list(itertools.product(
    [7, 10, 64, 101],          # in_features: odd, even, power of two, prime
    [1, 3, 10],                # num_classes
    [1, 5, 16],                # layer_width
    [1, 2, 4, 5, 7],           # num_layers (also not multiples of num_splits)
    [1, 2, 3, 4],              # num_splits
    [False, True],             # batch_norm
    [False, True],             # shared_weights
))


def test_num_params_grid():
    checked = skipped = 0
    for d, c, w, layers, splits, bn, shared in GRID:
        if shared and d % splits:
            with pytest.raises(ValueError, match="divisible"):
                SpinalHead(d, c, w, layers, splits, batch_norm=bn, shared_weights=shared)
            skipped += 1
            continue
        want = formula_params(d, c, w, layers, splits, bn, shared)
        head = SpinalHead(d, c, w, layers, splits, batch_norm=bn, shared_weights=shared)
        assert numel(head) == head.num_params() == want, (d, c, w, layers, splits, bn, shared)
        # MACs: closed form, and counted from the Linear calls an eval forward actually makes
        assert head.macs() == formula_macs(d, c, w, layers, splits) == counted_macs(head, d)
        assert head.split_sizes == [b - a for a, b in expected_parts(d, splits)]
        checked += 1
    assert checked > 600 and skipped > 100


@pytest.mark.parametrize("d,n", [(7, 2), (7, 3), (10, 4), (2048, 2), (25088, 2), (1024, 8), (5, 5), (1, 1)])
def test_split_sizes(d, n):
    assert split_sizes(d, n) == [b - a for a, b in expected_parts(d, n)]
    assert [t.shape[1] for t in torch.tensor_split(torch.zeros(1, d), n, dim=1)] == split_sizes(d, n)


@pytest.mark.parametrize("d,w,c", [(2048, 196, 196), (2048, 20, 10), (512, 5, 2), (9216, 20, 10), (2, 3, 1)])
def test_resnet_and_vgg_preset_formula(d, w, c):
    """paper-recipes A4: ResNet preset = 4hw + 3w^2 + 4w + 4wC + C with h = D/2; VGG preset adds 8w
    (BatchNorm gamma/beta) and 8w running-stat buffers; multiplies = 4hw + 3w^2 + 4wC for both."""
    h = d // 2
    resnet = meta_head("spinal", d, c, preset="resnet", layer_width=w)
    vgg = meta_head("spinal", d, c, preset="vgg", layer_width=w)
    assert numel(resnet) == resnet.num_params() == 4 * h * w + 3 * w * w + 4 * w + 4 * w * c + c
    assert numel(vgg) == vgg.num_params() == 4 * h * w + 3 * w * w + 4 * w + 4 * w * c + c + 8 * w
    assert sum(b.numel() for n, b in vgg.named_buffers() if not n.endswith("num_batches_tracked")) == 8 * w
    assert resnet.macs() == vgg.macs() == 4 * h * w + 3 * w * w + 4 * w * c
    assert vgg.dropout == 0.5 and vgg.batch_norm and resnet.dropout == 0.0 and not resnet.batch_norm


# (recipe, D, C, w, preset, params, multiplies): paper-recipes.md A4
A4_SPINAL = [
    ("Stanford Cars WRN", 2048, 196, 196, "resnet", 1_072_708, 1_071_728),
    ("Oxford WRN", 2048, 102, 102, "resnet", 491_130, 490_620),
    ("Fruits WRN", 2048, 131, 131, "resnet", 657_358, 656_703),
    ("Caltech WRN w1024", 2048, 101, 1024, "resnet", 7_757_925, 7_753_728),
    ("Caltech WRN w1024 VGG var.", 2048, 101, 1024, "vgg", 7_766_117, 7_753_728),
    ("Caltech WRN nb", 2048, 101, 101, "resnet", 485_608, 485_103),
    ("Bird WRN VGG var.", 2048, 225, 1024, "vgg", 8_274_145, 8_261_632),
    ("Bird VGG-19-bn", 25088, 225, 1024, "vgg", 55_460_065, 55_447_552),
    ("CIFAR-10 / CINIC WRN", 2048, 10, 20, "resnet", 84_010, 83_920),
    ("CIFAR-10 / SVHN VGG-19-bn", 25088, 10, 20, "vgg", 1_005_770, 1_005_520),
    ("CIFAR-100 WRN VGG var.", 2048, 100, 512, "vgg", 3_094_628, 3_088_384),
    ("STL-10 WRN VGG var.", 2048, 10, 512, "vgg", 2_910_218, 2_904_064),
    ("MNIST VGG-19-bn", 25088, 10, 1024, "vgg", 54_579_210, 54_566_912),
    ("AlexNet 10-Monkey", 9216, 10, 20, "resnet", 370_730, 370_640),
]


@pytest.mark.parametrize("recipe,d,c,w,preset,params,mults", A4_SPINAL, ids=[r[0] for r in A4_SPINAL])
def test_a4_table_spinal(recipe, d, c, w, preset, params, mults):
    head = meta_head("spinal", d, c, preset=preset, layer_width=w)
    assert numel(head) == head.num_params() == params
    assert head.macs() == mults


# default heads of A4: (recipe, head kind, D, C, params, multiplies)
A4_DEFAULT = [
    ("Stanford Cars WRN", "linear", 2048, 196, 401_604, 401_408),
    ("Caltech WRN", "linear", 2048, 101, 206_949, 206_848),
    ("CIFAR-10 WRN", "linear", 2048, 10, 20_490, 20_480),
    ("Bird VGG-19-bn classifier", "mlp", 25088, 225, 120_467_681, 120_459_264),
    ("MNIST VGG-19-bn classifier", "mlp", 25088, 10, 119_586_826, 119_578_624),
    ("AlexNet classifier", "mlp", 9216, 10, 54_575_114, 54_566_912),
]


@pytest.mark.parametrize("recipe,kind,d,c,params,mults", A4_DEFAULT, ids=[r[0] for r in A4_DEFAULT])
def test_a4_table_default_heads(recipe, kind, d, c, params, mults):
    head = meta_head(kind, d, c, hidden=(4096, 4096))
    assert numel(head) == head.num_params() == params
    assert head.macs() == mults
    if kind == "mlp":          # VGG-19-bn: 119,545,856 + 4097C; AlexNet: 54,534,144 + 4097C
        assert params == (119_545_856 if d == 25088 else 54_534_144) + 4097 * c


# paper-recipes.md E: shared-weight (SW) spinal: (run, D, splits, w, layers, C, params)
E_SW = [
    ("WRN STL-10", 2048, 8, 20, 8, 10, 12_290),
    ("ViT-L w10", 1024, 8, 10, 8, 10, 3_490),
    ("ViT-L w20", 1024, 8, 20, 8, 10, 7_170),
    ("ViT-L w50", 1024, 8, 50, 8, 10, 19_410),
    ("ViT-L w100", 1024, 8, 100, 8, 10, 43_810),
]


@pytest.mark.parametrize("run,d,splits,w,layers,c,params", E_SW, ids=[r[0] for r in E_SW])
def test_e_table_shared_weights(run, d, splits, w, layers, c, params):
    head = create_head("spinal", d, c, preset=None, layer_width=w, num_layers=layers, num_splits=splits,
                       shared_weights=True)
    s = d // splits
    assert numel(head) == head.num_params() == params
    assert params == s * w + w + (s + w) * w + w + layers * w * c + c            # E's formula
    assert head.macs() == s * w + (layers - 1) * (s + w) * w + layers * w * c == counted_macs(head, d)
    assert len(head.linears) == 2


def test_e_customizable_and_default_linear():
    # Customizable SpinalNet on STL-10: D 2048, 2 splits, w 512, 10 layers (separate weights) = 7,658,506
    head = meta_head("spinal", 2048, 10, preset=None, layer_width=512, num_layers=10, num_splits=2)
    s, w, L, c = 1024, 512, 10, 10
    assert numel(head) == head.num_params() == 7_658_506 == s * w + w + (L - 1) * ((s + w) * w + w) + L * w * c + c
    assert create_head("linear", 1024, 10).num_params() == 10_250      # ViT-L default head (E)
    assert create_head("linear", 2048, 10).num_params() == 20_490      # WRN default head (E)


def test_mlp_and_linear_counts():
    for d, c, hidden in [(7, 3, ()), (10, 4, (5,)), (64, 10, (32, 16)), (25088, 10, (4096, 4096))]:
        head = meta_head("mlp", d, c, hidden=hidden) if d > 1000 else create_head("mlp", d, c, hidden=hidden)
        widths = [d, *hidden, c]
        assert numel(head) == head.num_params() == sum((a + 1) * b for a, b in zip(widths, widths[1:]))
        assert head.macs() == sum(a * b for a, b in zip(widths, widths[1:]))
        if d < 1000:
            assert head.macs() == counted_macs(head, d)
    lin = create_head("linear", 33, 4)
    assert isinstance(lin, LinearHead) and numel(lin) == lin.num_params() == 34 * 4 and lin.macs() == 132
    assert lin(torch.randn(2, 33, 1, 1)).shape == (2, 4)         # flattens a pooled map


# ----------------------------------------------------------------------------------------------------
# forward equals the definition


def reference_forward(head: SpinalHead, x: torch.Tensor) -> torch.Tensor:
    """The SpinalNet definition, matmul by matmul, from the head's weights (eval mode: no dropout, BN on
    running statistics). Layer i reads part i % n of the input, then (i > 0) the previous output."""
    d, n, w, L = x.shape[1], head.num_splits, head.layer_width, head.num_layers
    parts = expected_parts(d, n)
    linears = list(head.linears)
    outs = []
    for i in range(L):
        a, b = parts[i % n]
        lin = linears[min(i, 1)] if head.shared_weights else linears[i]
        z = x[:, a:b] if i == 0 else torch.cat([x[:, a:b], outs[-1]], dim=1)
        assert z.shape[1] == lin.in_features
        z = z @ lin.weight.T + lin.bias
        if head.batch_norm:
            bn = head.posts[i].norm
            z = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        z = torch.clamp(z, min=0)                                    # ReLU
        assert z.shape[1] == w
        outs.append(z)
    y = torch.cat(outs, dim=1)
    return y @ head.fc_out.weight.T + head.fc_out.bias


def randomize(head: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial parameters and BatchNorm running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        for m in head.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=m.running_mean.dtype))
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=m.running_var.dtype) * 2 + 0.1)
    return head


REF_CASES = [
    # (D, C, kwargs for create_head)
    (2048, 10, dict(preset="resnet", layer_width=20)),
    (2048, 10, dict(preset="vgg", layer_width=20)),
    (512, 2, dict(preset="resnet", layer_width=5)),
    (9, 3, dict(preset="vgg", layer_width=4)),                       # odd D: parts 5 and 4
    (10, 3, dict(preset="resnet", layer_width=6, num_layers=5, num_splits=3)),
    (1024, 10, dict(preset=None, layer_width=20, num_layers=8, num_splits=8, shared_weights=True)),
    (64, 7, dict(preset="vgg", layer_width=8, num_layers=6, num_splits=4, shared_weights=True)),
    (12, 4, dict(preset="resnet", layer_width=3, num_layers=1)),
]


@pytest.mark.parametrize("d,c,kw", REF_CASES)
def test_forward_matches_definition(d, c, kw):
    torch.manual_seed(0)
    head = randomize(create_head("spinal", d, c, **kw)).double().eval()
    x = torch.randn(5, d, dtype=torch.float64)
    with torch.no_grad():
        got = head(x)
        want = reference_forward(head, x)
    assert got.shape == (5, c)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # copied weights: a second head of the same configuration, loaded from the first, gives the same output
    twin = create_head("spinal", d, c, **kw).double().eval()
    twin.load_state_dict(head.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(twin(x), want, rtol=1e-6, atol=1e-6)


def test_paper_halves_for_even_width():
    """Even D, 2 splits: layer 1 reads x[:, :h], layer 2 x[:, h:], layer 3 x[:, :h] ... (h = D/2)."""
    d, h = 8, 4
    head = randomize(SpinalHead(d, 2, 3, num_layers=4, num_splits=2)).double().eval()
    assert head.split_sizes == [h, h]
    seen = []
    hooks = [lin.register_forward_pre_hook(lambda m, inp: seen.append(inp[0])) for lin in head.linears]
    x = torch.arange(2 * d, dtype=torch.float64).reshape(2, d)
    with torch.no_grad():
        head(x)
    for hk in hooks:
        hk.remove()
    assert [s.shape[1] for s in seen] == [h, h + 3, h + 3, h + 3]     # part, then part + previous output
    for i, s in enumerate(seen):
        torch.testing.assert_close(s[:, :h], x[:, :h] if i % 2 == 0 else x[:, h:])


def test_resnet_preset_train_equals_eval():
    head = randomize(create_head("spinal", 30, 4, preset="resnet", layer_width=7)).double()
    x = torch.randn(3, 30, dtype=torch.float64)
    with torch.no_grad():
        a = head.train()(x)
        b = head.eval()(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(b, reference_forward(head, x), rtol=1e-6, atol=1e-6)


def test_vgg_preset_train_mode_uses_dropout_and_batch_stats():
    head = randomize(create_head("spinal", 40, 4, preset="vgg", layer_width=8)).double()
    x = torch.randn(16, 40, dtype=torch.float64)
    torch.manual_seed(1)
    a = head.train()(x)
    torch.manual_seed(2)
    b = head.train()(x)
    assert not torch.allclose(a, b)                                  # dropout is random in train mode
    assert all(m.num_batches_tracked.item() == 2 for m in head.modules() if isinstance(m, nn.BatchNorm1d))


def test_backward_reaches_every_parameter():
    for kw in ({"preset": "resnet"}, {"preset": "vgg"}, {"preset": None, "num_splits": 4, "num_layers": 6,
                                                          "shared_weights": True}):
        head = create_head("spinal", 32, 5, layer_width=6, **kw).train()
        head(torch.randn(8, 32)).logsumexp(1).sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters()), kw


# ----------------------------------------------------------------------------------------------------
# batch of one


def test_batch_of_one():
    """VGG preset (BatchNorm1d) in train mode cannot normalise a single sample: torch raises a
    ValueError; the training loop avoids this with drop_last. Eval mode and the ResNet preset are fine."""
    vgg = create_head("spinal", 16, 3, preset="vgg", layer_width=4)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        vgg.train()(torch.randn(1, 16))
    assert vgg.eval()(torch.randn(1, 16)).shape == (1, 3)
    assert vgg.train()(torch.randn(2, 16)).shape == (2, 3)
    assert create_head("spinal", 16, 3, preset="resnet", layer_width=4).train()(torch.randn(1, 16)).shape == (1, 3)
    assert create_head("mlp", 16, 3, hidden=(8,)).train()(torch.randn(1, 16)).shape == (1, 3)


# ----------------------------------------------------------------------------------------------------
# TorchScript and torch.compile


SCRIPT_CASES = [dict(preset="resnet", layer_width=6), dict(preset="vgg", layer_width=6),
                dict(preset=None, layer_width=5, num_layers=6, num_splits=4, shared_weights=True),
                dict(preset="resnet", layer_width=4, num_layers=5, num_splits=3, activation="gelu")]


@pytest.mark.parametrize("kw", SCRIPT_CASES)
def test_torchscript_matches_eager(kw, tmp_path):
    head = randomize(create_head("spinal", 24, 5, **kw)).eval()
    scripted = torch.jit.script(head)
    x = torch.randn(4, 24)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), head(x), rtol=1e-6, atol=1e-6)
    scripted.save(str(tmp_path / "head.pt"))
    loaded = torch.jit.load(str(tmp_path / "head.pt"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), head(x), rtol=1e-6, atol=1e-6)
    # scripted training mode runs and back-propagates
    scripted.train()
    scripted(torch.randn(4, 24)).sum().backward()


@pytest.mark.parametrize("kw", [dict(preset="vgg", layer_width=6),
                                dict(preset=None, layer_width=5, num_layers=6, num_splits=4, shared_weights=True)])
@pytest.mark.slow      # 9-16 s; the default suite stays near 10 minutes
def test_torch_compile_matches_eager(kw):
    head = randomize(create_head("spinal", 24, 5, **kw)).eval()
    x = torch.randn(4, 24)
    start = time.time()
    try:
        compiled = torch.compile(head, backend="inductor" if _have_compiler() else "aot_eager")
        with torch.no_grad():
            got = compiled(x)
    finally:
        torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(got, head(x), rtol=1e-5, atol=1e-5)
    assert time.time() - start < 120


def _have_compiler() -> bool:
    import shutil

    return shutil.which("g++") is not None or shutil.which("c++") is not None


# ----------------------------------------------------------------------------------------------------
# validation


def test_create_head_kinds_and_presets():
    assert isinstance(create_head("linear", 10, 3), LinearHead)
    assert isinstance(create_head("mlp", 10, 3, hidden=(4,)), MLPHead)
    for preset, opts in SPINAL_PRESETS.items():
        h = create_head("spinal", 10, 3, preset=preset, layer_width=4)
        assert (h.dropout, h.batch_norm) == (opts["dropout"], opts["batch_norm"])
    h = create_head("spinal", 10, 3, preset="vgg", layer_width=4, dropout=0.1, batch_norm=False)
    assert (h.dropout, h.batch_norm) == (0.1, False)
    h = SpinalHead.from_preset("vgg", 10, 3, 4, num_layers=3)
    assert h.batch_norm and h.num_layers == 3


@pytest.mark.parametrize("call,match", [
    (lambda: create_head("conv", 10, 3), "unknown head kind"),
    (lambda: create_head("spinal", 10, 3, preset="alexnet"), "unknown spinal preset"),
    (lambda: SpinalHead.from_preset("alexnet", 10, 3, 4), "unknown spinal preset"),
    (lambda: create_head("spinal", 10, 3, activation="swish"), "activation"),
    (lambda: create_head("spinal", 4, 3, num_splits=5), "num_splits"),
    (lambda: create_head("spinal", 4, 3, num_splits=0), "num_splits"),
    (lambda: create_head("spinal", 10, 3, num_splits=3, shared_weights=True), "divisible"),
    (lambda: create_head("spinal", 10, 3, num_layers=0), ">= 1"),
    (lambda: create_head("spinal", 10, 3, layer_width=0), ">= 1"),
    (lambda: create_head("spinal", 10, 0), ">= 1"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_wrong_input_width_is_an_error():
    head = create_head("spinal", 10, 3, layer_width=4)
    with pytest.raises(RuntimeError):
        head(torch.randn(2, 11))


@pytest.mark.parametrize("kw, says", [
    ({"layer_width": 16.5}, "layer_width=16.5: expected a whole number >= 1"),
    ({"num_splits": 2.0}, "num_splits=2.0: expected a whole number >= 1"),
    ({"dropout": -0.1}, "dropout=-0.1: expected a probability in [0, 1)"),
    ({"dropout": 1.5}, "dropout=1.5: expected a probability in [0, 1)"),
    ({"activation": "foo"}, "activation='foo': expected one of"),
    ({"hidden": [-1]}, "hidden=-1: expected a whole number >= 1"),
])
def test_create_head_names_a_bad_argument_as_python_spells_it(kw, says):
    from spinal_transfer.errors import ConfigError

    kind = "mlp" if "hidden" in kw else "spinal"
    with pytest.raises(ConfigError) as e:
        create_head(kind, 64, 3, **kw)
    assert str(e.value).startswith(says)


@pytest.mark.parametrize("args, kw, says", [
    (("timm/test_resnet", "10"), {}, "num_classes='10': expected a whole number >= 1"),
    ((123, 3), {}, "backbone=123: expected a name such as 'timm/resnet18'"),
    (("timm/test_resnet", 3), {"layer_wdth": 32}, "build_model: unknown head option(s) layer_wdth; the head takes"),
])
def test_build_model_names_a_bad_argument(args, kw, says):
    from spinal_transfer.errors import ConfigError
    from spinal_transfer.models.surgery import build_model

    with pytest.raises(ConfigError) as e:
        build_model(*args, weights="none", **kw)
    assert str(e.value).startswith(says)
