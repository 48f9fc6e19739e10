"""build_model on torchvision and timm backbones.

For each backbone and head kind: the output is (batch, num_classes) at the model's input size, backward
runs, every backbone state-dict entry equals (key and value) the one of the same model built without
surgery from the same seed, the head is called (hook) and its input width equals the feature width
measured independently on the ORIGINAL model (a hook on its classifier's input for torchvision, timm's
`forward_head(pre_logits=True)`). Auxiliary heads (Inception v3, GoogLeNet) are checked in train mode.

The default run uses one small model per torchvision family and timm's tiny `test_*` models plus the
families that needed special handling; every torchvision model and one model of every timm family
(`timm.list_modules()`) run under `-m slow`. Also: weights files (torch and safetensors) through
`build_model(weights=PATH)`, offline `weights="default"`, and argument errors.
"""
from __future__ import annotations

import functools
import hashlib
import re
import time
from typing import Any, Optional

import pytest
import torch
from torch import nn

from spinal_transfer.errors import ConfigError, WeightsUnavailable
from spinal_transfer.models.heads import LinearHead, MLPHead, SpinalHead
from spinal_transfer.models.surgery import build_model, get_head, head_param_names, list_backbones

C = 5                                              # classes of the new heads
HEAD_OPTS = {"linear": {}, "mlp": {"hidden": (16,)}, "spinal": {"layer_width": 8}}
HEAD_TYPES = {"linear": LinearHead, "mlp": MLPHead, "spinal": SpinalHead}


# ----------------------------------------------------------------------------------------------------
# reference (un-modified) models, measured independently of surgery.py


def _digest(t: torch.Tensor) -> tuple:
    """Exact fingerprint of a tensor (dtype, shape, sha256 of its bytes): keeps the comparison exact
    without holding a second copy of a large model in memory."""
    t = t.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)
    return str(t.dtype), tuple(t.shape), hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def _tv_kwargs(name: str) -> dict:
    # what build_model asks torchvision for (auxiliary heads on, init as without weights)
    return dict(aux_logits=True, init_weights=True) if name in ("inception_v3", "googlenet") else {}


def _tv_classifier(name: str, model: nn.Module) -> tuple[str, list[str]]:
    """(main classifier path, auxiliary classifier paths) of an original torchvision model, by family."""
    if name.startswith("squeezenet"):
        return "classifier.1", []
    if name.startswith("vit_"):
        return "heads.head", []
    if name.startswith("swin"):
        return "head", []
    if name == "inception_v3":
        return "fc", ["AuxLogits.fc"]
    if name == "googlenet":
        return "fc", ["aux1.fc2", "aux2.fc2"]
    if hasattr(model, "fc"):
        return "fc", []
    cls = model.classifier
    return (f"classifier.{len(cls) - 1}" if isinstance(cls, nn.Sequential) else "classifier"), []


def _recorder(store: dict, key: Any):
    """A forward hook that records the module's first input shape (and returns None: a hook that
    returns a value would replace the module's output)."""
    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        store.setdefault(key, inputs[0].shape)
    return hook


@functools.lru_cache(maxsize=None)
def tv_reference(name: str) -> dict:
    """Digests of the state dict of torchvision/<name> built from seed 0, and the input widths its
    classifiers (and its whole `classifier` block) receive in a train-mode forward."""
    import torchvision.models as tvm

    torch.manual_seed(0)
    model = tvm.get_model(name, weights=None, **_tv_kwargs(name))
    sd = {k: _digest(v) for k, v in model.state_dict().items()}
    main, aux = _tv_classifier(name, model)
    watch = {p: model.get_submodule(p) for p in [main, *aux]}
    if hasattr(model, "classifier"):
        watch["<classifier block>"] = model.classifier
    shapes: dict[str, torch.Size] = {}
    hooks = [m.register_forward_hook(_recorder(shapes, p)) for p, m in watch.items()]
    size = 299 if name == "inception_v3" else getattr(model, "image_size", 224)
    with torch.no_grad():
        model.train()(torch.randn(2, 3, size, size))
    for h in hooks:
        h.remove()
    widths = {p: (s[1] if p != "<classifier block>" else s[1:].numel()) for p, s in shapes.items()}
    return dict(state=sd, main=main, aux=aux, widths=widths, size=size)


@functools.lru_cache(maxsize=None)
def timm_reference(name: str) -> dict:
    """Digests of the state dict of timm/<name> built from seed 0 and the width of its pre-logits."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name)
    sd = {k: _digest(v) for k, v in model.state_dict().items()}
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    with torch.no_grad():
        feats = model.eval().forward_head(model.forward_features(torch.randn(1, 3, size, size)), pre_logits=True)
    return dict(state=sd, pre_logits=feats.flatten(1).shape[1], size=size)


# ----------------------------------------------------------------------------------------------------
# the common checks


def _logits(out: Any) -> list[torch.Tensor]:
    """Main logits first, then auxiliary ones (torchvision's train-mode namedtuples)."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if t is not None]


def check_model(model: nn.Module, ref_state: dict, batch: int = 2) -> dict[str, torch.Size]:
    """Backbone unchanged, head(s) called in a train-mode forward at the model's input size, output and
    auxiliary outputs (batch, C), backward reaches head and backbone. Returns each head's input shape."""
    info = model.spinal_info
    assert info.num_classes == C and info.input_size > 0
    # backbone: the same keys and exactly the same values as without surgery
    head_keys = set(head_param_names(model))
    prefixes = tuple(p + "." for p in info.head_paths)
    assert head_keys and all(k.startswith(prefixes) for k in head_keys)
    ours = {k: _digest(v) for k, v in model.state_dict().items() if k not in head_keys}
    theirs = {k: v for k, v in ref_state.items() if not k.startswith(prefixes)}
    assert ours.keys() == theirs.keys(), (sorted(ours.keys() ^ theirs.keys())[:10])
    changed = [k for k in ours if ours[k] != theirs[k]]
    assert not changed, changed[:10]

    heads = [model.get_submodule(p) for p in info.head_modules]
    assert heads[0] is get_head(model)
    assert all(isinstance(h, HEAD_TYPES[info.head]) and h.num_classes == C for h in heads)
    seen: dict[int, torch.Size] = {}
    hooks = [h.register_forward_hook(_recorder(seen, k)) for k, h in enumerate(heads)]
    model.train()
    try:
        x = torch.randn(batch, 3, info.input_size, info.input_size)
        outs = _logits(model(x))
    finally:
        for h in hooks:
            h.remove()
    assert sorted(seen) == list(range(len(heads))), f"heads called: {sorted(seen)} of {info.head_modules}"
    for k, h in enumerate(heads):
        assert seen[k][1:].numel() == h.in_features, (info.head_modules[k], seen[k], h.in_features)
    assert seen[0][1:].numel() == info.feature_width
    for o in outs:
        assert tuple(o.shape) == (batch, C)
    sum(o.float().logsumexp(1).sum() for o in outs).backward()
    for k, h in enumerate(heads):
        assert all(p.grad is not None for p in h.parameters()), info.head_modules[k]
    assert any(p.grad is not None for n, p in model.named_parameters() if n not in head_keys)
    return {info.head_modules[k]: seen[k] for k in sorted(seen)}  # main head first, as head_modules


def check_torchvision(name: str, head: str, replace: str = "auto") -> nn.Module:
    ref = tv_reference(name)
    torch.manual_seed(0)
    model = build_model(f"torchvision/{name}", C, head=head, replace=replace, **HEAD_OPTS[head])
    info = model.spinal_info
    assert info.input_size == ref["size"]
    whole = info.replace == "classifier"
    assert whole == (replace == "classifier" or (replace == "auto" and head != "linear"
                                                  and name.startswith(("vgg", "alexnet"))))
    expected_main = ref["widths"]["<classifier block>"] if whole else ref["widths"][ref["main"]]
    assert info.feature_width == expected_main
    assert len(info.head_modules) == 1 + len(ref["aux"])
    seen = check_model(model, ref["state"])
    widths = [s[1:].numel() for s in seen.values()]
    assert widths == [expected_main] + [ref["widths"][a] for a in ref["aux"]]
    return model


def check_timm(name: str, head: str) -> nn.Module:
    ref = timm_reference(name)
    torch.manual_seed(0)
    model = build_model(f"timm/{name}", C, head=head, **HEAD_OPTS[head])
    info = model.spinal_info
    assert info.input_size == ref["size"]
    seen = check_model(model, ref["state"])
    widths = [s[-1] if len(s) == 3 else s[1:].numel() for s in seen.values()]
    # one head: it gets the pre-logits; several (distilled / multi-branch): each gets the pre-logits
    # (DeiT/LeViT-distilled, EfficientFormer) or they split them (CrossViT, EfficientViM)
    assert (all(w == ref["pre_logits"] for w in widths) or sum(widths) == ref["pre_logits"]), \
        (widths, ref["pre_logits"])
    return model


# ----------------------------------------------------------------------------------------------------
# torchvision


TV_FAST = ["resnet18", "alexnet", "squeezenet1_1", "densenet121", "inception_v3", "googlenet", "mobilenet_v2",
           "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "shufflenet_v2_x0_5", "mnasnet0_5",
           "convnext_tiny", "vit_b_32", "swin_t", "maxvit_t", "vgg11"]
TV_FAST_HEADS = {  # the larger models get the spinal head only in the default run (all heads under -m slow)
    "convnext_tiny": ("spinal",), "vit_b_32": ("spinal",), "swin_t": ("spinal",), "maxvit_t": ("spinal",),
    "densenet121": ("spinal", "linear"), "inception_v3": ("spinal", "linear"),
}


def _tv_all() -> list[str]:
    import torchvision.models as tvm

    return tvm.list_models(module=tvm)


@pytest.mark.parametrize("name,head", [(n, h) for n in TV_FAST if n != "vgg11"
                                       for h in TV_FAST_HEADS.get(n, ("linear", "mlp", "spinal"))])
def test_torchvision_fast(name, head):
    check_torchvision(name, head)


@pytest.mark.parametrize("name", ["vgg11", "alexnet"])
@pytest.mark.parametrize("replace", ["classifier", "last"])
def test_vgg_alexnet_replace_modes(name, replace):
    model = check_torchvision(name, "spinal", replace)
    info = model.spinal_info
    if replace == "classifier":
        assert info.feature_width == {"vgg11": 25088, "alexnet": 9216}[name]
        assert info.head_paths == ["classifier"] and isinstance(model.classifier, SpinalHead)
    else:
        assert info.feature_width == 4096 and info.head_paths == ["classifier.6"]
        assert isinstance(model.classifier[6], SpinalHead)
        assert sum(isinstance(m, nn.Linear) for m in model.classifier) == 2  # the hidden layers stay


def test_replace_auto_rules():
    m = build_model("torchvision/alexnet", C, head="linear")
    assert m.spinal_info.replace == "last" and m.spinal_info.feature_width == 4096
    m = build_model("torchvision/alexnet", C, head="mlp", hidden=(16,))
    assert m.spinal_info.replace == "classifier" and m.spinal_info.feature_width == 9216
    m = build_model("torchvision/squeezenet1_1", C, head="spinal", layer_width=8)
    assert m.spinal_info.replace == "last"


@pytest.mark.parametrize("name,aux", [("inception_v3", ["AuxLogits.fc"]), ("googlenet", ["aux1.fc2", "aux2.fc2"])])
def test_auxiliary_heads(name, aux):
    model = build_model(f"torchvision/{name}", C, head="spinal", layer_width=8)
    info = model.spinal_info
    assert info.head_paths == ["fc"] + aux
    assert all(isinstance(model.get_submodule(p), SpinalHead) for p in info.head_paths)
    size = info.input_size
    with torch.no_grad():
        out = model.train()(torch.randn(2, 3, size, size))
        assert len(_logits(out)) == 1 + len(aux) and all(o.shape == (2, C) for o in _logits(out))
        ev = model.eval()(torch.randn(1, 3, size, size))
    assert isinstance(ev, torch.Tensor) and ev.shape == (1, C)


# Every model with the spinal head, and with a linear or an MLP head in turn: where the head goes does not depend
# on its kind (every kind on every fast model above), and the largest models take most of CI's time limit.
@pytest.mark.slow
@pytest.mark.parametrize("name,head", [(n, h) for i, n in enumerate(_tv_all()) for h in ("spinal", ("linear", "mlp")[i % 2])])
def test_torchvision_every_model(name, head):
    check_torchvision(name, head)
    if name.startswith(("vgg", "alexnet")):          # the other replace mode too
        check_torchvision(name, head, "last" if head != "linear" else "classifier")


def test_every_torchvision_model_is_listed():
    names = _tv_all()
    assert len(names) == 80
    assert {f"torchvision/{n}" for n in names} <= set(list_backbones("torchvision/*"))


# ----------------------------------------------------------------------------------------------------
# timm


SIZE_WORDS = ["test", "atto", "femto", "pico", "nano", "xxs", "xxsmall", "xxtiny", "micro", "xs", "xsmall",
              "tiny", "ti", "t", "mini", "small", "s", "lite", "light", "b0", "m0", "s0", "t0", "s1"]


def _size_rank(name: str) -> tuple:
    """Name heuristic for "small": the smallest-size word it contains, then the name's length."""
    toks = re.split(r"[_\-.]|(?<=[a-z])(?=\d)", name.lower())
    rank = min((i for t in toks for i, w in enumerate(SIZE_WORDS) if t == w or (len(w) > 2 and t.startswith(w))),
               default=len(SIZE_WORDS))
    return rank, len(name), name


def _meta_params(name: str) -> Optional[int]:
    import timm

    try:
        with torch.device("meta"):
            return sum(p.numel() for p in timm.create_model(name).parameters())
    except Exception:
        return None


@functools.lru_cache(maxsize=None)
def timm_family_model(module: str) -> Optional[str]:
    """One model of a timm family (module): a tiny `test_*` model if there is one, else the variant with
    the fewest parameters (counted on the meta device) among the 12 whose names look smallest; by name
    alone when none builds on the meta device."""
    import timm

    names = timm.list_models(module=module)
    if not names:
        return None
    cands = [n for n in names if n.startswith("test_")] or sorted(names, key=_size_rank)[:12]
    counted = [(p, n) for n in cands if (p := _meta_params(n)) is not None]
    return min(counted)[1] if counted else min(cands, key=_size_rank)


def _timm_modules() -> list[str]:
    import timm

    return timm.list_modules()


# families whose tiny test_* model is cheap, plus families that needed handling in surgery:
# classifier wrapped (cpubone: ClsHead called with pre_logits=; LeViT: NormLinear, BN kept), several
# classifiers (CrossViT: branches of different widths; DeiT-distilled / LeViT: averaged), a 1x1-conv
# classifier on a pooled map (DLA), a feature backbone created without a classifier (DINOv3 ViT).
# EfficientViT-MSRA (NormLinear) and EfficientViM (4 weighted heads) are covered under -m slow.
TIMM_FAST = ["test_resnet", "test_convnext", "test_efficientnet", "test_vit", "test_byobnet", "test_nfnet",
             "test_mambaout", "test_coatnet", "test_vit_relpos"]
TIMM_SPECIAL = {   # name: (head_paths, head_modules, widths)
    "cpubone_nano": (["head.classifier.linear"], None, [1600]),
    "crossvit_tiny_240": (["head.0", "head.1"], None, [96, 192]),
    "levit_128s": (["head.linear", "head_dist.linear"], None, [384, 384]),
    "deit_tiny_distilled_patch16_224": (["head", "head_dist"], None, [192, 192]),
    "dla46x_c": (["fc"], ["fc.head"], [256]),
    "vit_tiny_patch16_dinov3_qkvb": (["head"], None, [192]),
}


@pytest.mark.parametrize("name,head", [(n, h) for n in TIMM_FAST for h in ("linear", "mlp", "spinal")]
                         + [(n, "spinal") for n in TIMM_SPECIAL])
def test_timm_fast(name, head):
    model = check_timm(name, head)
    if name in TIMM_SPECIAL:
        paths, modules, widths = TIMM_SPECIAL[name]
        info = model.spinal_info
        assert info.head_paths == paths and info.head_modules == (modules or paths)
        assert [model.get_submodule(p).in_features for p in info.head_modules] == widths
        assert model.num_classes == C
    if name == "levit_128s":        # the wrapper's BatchNorm stays (backbone), only its Linear is new
        assert isinstance(model.head.bn, nn.BatchNorm1d) and isinstance(model.head.linear, SpinalHead)


def test_timm_family_picker():
    assert timm_family_model("resnet").startswith("test_")
    name = timm_family_model("vgg")
    assert name == "vgg11"                                        # fewest parameters of timm's VGGs


@pytest.mark.slow
@pytest.mark.parametrize("i,module", list(enumerate(_timm_modules())), ids=lambda v: v if isinstance(v, str) else "")
def test_timm_every_family(i, module):
    name = timm_family_model(module)
    assert name, f"timm family {module} lists no model"
    for head in ("spinal", ("linear", "mlp")[i % 2]):        # as for torchvision: every kind on the fast models
        start = time.time()
        check_timm(name, head)
        print(f"timm family {module}: {name} {head} ok in {time.time() - start:.1f}s")


# ----------------------------------------------------------------------------------------------------
# weights files


def _eval_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_weights_file_roundtrip(tmp_path, fmt):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_model("torchvision/mobilenet_v3_small", C, head="spinal", preset="vgg", layer_width=8)
    with torch.no_grad():            # make BN statistics and the head non-default, so a fresh one would differ
        model.train()(torch.randn(4, 3, 224, 224))
        for p in get_head(model).parameters():
            p.add_(0.1)
    x = torch.randn(2, 3, 224, 224)
    want = _eval_logits(model, x)
    path = tmp_path / ("m.pth" if fmt == "torch" else "m.safetensors")
    sd = model.state_dict()
    torch.save(sd, path) if fmt == "torch" else save_file({k: v.contiguous() for k, v in sd.items()}, str(path))

    torch.manual_seed(123)
    again = build_model("torchvision/mobilenet_v3_small", C, head="spinal", preset="vgg", layer_width=8,
                        weights=str(path))
    assert again.spinal_info.weights == str(path)
    assert any("loaded" in n for n in again.spinal_info.notes)
    # a plain state dict records no class names, so its head is not restored (a run checkpoint's or bundle's is)
    assert any("head: new" in n for n in again.spinal_info.notes)
    get_head(again).load_state_dict(get_head(model).state_dict())
    torch.testing.assert_close(_eval_logits(again, x), want, rtol=0, atol=0)


def test_backbone_only_transfer(tmp_path):
    """A file with a head for other classes (a fine-tuned model, and the original ImageNet model): the
    backbone is loaded and the new head keeps its fresh initialisation."""
    import torchvision.models as tvm

    torch.manual_seed(0)
    donor = build_model("torchvision/mobilenet_v3_small", 7, head="spinal", layer_width=8)
    with torch.no_grad():
        for p in donor.parameters():
            p.add_(0.01)
    torch.save(donor.state_dict(), tmp_path / "other_classes.pt")
    torch.manual_seed(1)
    imagenet = tvm.mobilenet_v3_small()
    torch.save(imagenet.state_dict(), tmp_path / "imagenet.pt")

    for path, source in [(tmp_path / "other_classes.pt", donor), (tmp_path / "imagenet.pt", imagenet)]:
        torch.manual_seed(5)
        fresh = build_model("torchvision/mobilenet_v3_small", C, head="spinal", layer_width=8)
        torch.manual_seed(5)
        model = build_model("torchvision/mobilenet_v3_small", C, head="spinal", layer_width=8, weights=str(path))
        assert any("head: new" in n for n in model.spinal_info.notes)
        head_keys = set(head_param_names(model))
        src = source.state_dict()
        for k, v in model.state_dict().items():
            if k in head_keys:
                assert torch.equal(v, fresh.state_dict()[k]), k        # fresh head, as without the file
            else:
                assert torch.equal(v, src[k]), k                       # backbone from the file


def test_weights_file_that_does_not_match(tmp_path):
    torch.manual_seed(0)
    other = build_model("torchvision/squeezenet1_1", C, head="linear")
    torch.save(other.state_dict(), tmp_path / "squeeze.pt")
    with pytest.raises(ValueError, match="does not match this backbone"):
        build_model("torchvision/mobilenet_v3_small", C, weights=str(tmp_path / "squeeze.pt"))
    sd = build_model("torchvision/mobilenet_v3_small", C, head="linear").state_dict()
    sd["features.0.0.weight"] = torch.zeros(3, 3, 3, 3)                       # wrong shape
    torch.save(sd, tmp_path / "bad_shape.pt")
    with pytest.raises(ValueError, match="shape mismatch"):
        build_model("torchvision/mobilenet_v3_small", C, weights=str(tmp_path / "bad_shape.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError):
        build_model("torchvision/mobilenet_v3_small", C, weights=str(tmp_path / "junk.pt"))
    with pytest.raises(ConfigError, match="does not exist"):
        build_model("torchvision/mobilenet_v3_small", C, weights=str(tmp_path / "missing.pth"))


def test_timm_weights_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_model("timm/test_resnet", C, head="spinal", layer_width=8)
    save_file(model.state_dict(), str(tmp_path / "r.safetensors"))
    x = torch.randn(2, 3, 160, 160)
    again = build_model("timm/test_resnet", C, head="spinal", layer_width=8, weights=str(tmp_path / "r.safetensors"))
    get_head(again).load_state_dict(get_head(model).state_dict())      # a plain file's head is never restored
    torch.testing.assert_close(_eval_logits(again, x), _eval_logits(model, x), rtol=0, atol=0)


def test_default_weights_offline_torchvision(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    start = time.time()
    with pytest.raises(WeightsUnavailable) as err:
        build_model("torchvision/squeezenet1_1", C, weights="default")
    msg = str(err.value)
    assert "squeezenet1_1-b8a52dc0.pth" in msg
    assert str(tmp_path / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth") in msg
    assert time.time() - start < 60


def test_default_weights_offline_timm(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.time()
    with pytest.raises(WeightsUnavailable) as err:
        build_model("timm/resnet18", C, weights="default")
    assert "timm/resnet18" in str(err.value) and "Hugging Face repo timm/resnet18.a1_in1k" in str(err.value)
    with pytest.raises(WeightsUnavailable):
        build_model("timm/resnet18", C, weights="a1_in1k")
    assert time.time() - start < 30


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(backbone="resnet18"), ValueError, "torchvision/<name>"),
    (dict(backbone="keras/resnet18"), ValueError, "torchvision/<name>"),
    (dict(backbone="torchvision/"), ValueError, "torchvision/<name>"),
    (dict(backbone="torchvision/resnet9000"), ValueError, "no classification model"),
    (dict(backbone="timm/resnet9000"), ValueError, "timm has no model"),
    (dict(backbone="torchvision/resnet18", weights="IMAGENET1K_V9"), ValueError, "has no weights"),
    (dict(backbone="timm/resnet18", weights="not_a_tag"), ValueError, "has no pretrained tag"),
    (dict(backbone="torchvision/resnet18", head="conv"), ValueError, "unknown head kind"),
    (dict(backbone="torchvision/resnet18", replace="middle"), ValueError, "replace must be"),
    (dict(backbone="torchvision/resnet18", replace="classifier"), ValueError, "no multi-layer classifier"),
    (dict(backbone="timm/test_resnet", replace="classifier"), ValueError, "torchvision VGG/AlexNet"),
    (dict(backbone="torchvision/resnet18", num_classes=0), ValueError, "num_classes"),
    (dict(backbone="torchvision/resnet18", preset="big"), ValueError, "unknown spinal preset"),
])
def test_bad_arguments(kwargs, exc, match):
    kwargs = {"num_classes": C, **kwargs}
    with pytest.raises(exc, match=match):
        build_model(kwargs.pop("backbone"), kwargs.pop("num_classes"), **kwargs)


def test_get_head_on_foreign_model():
    with pytest.raises(ValueError, match="not built by"):
        get_head(nn.Linear(2, 2))


def test_head_info_round_trip():
    m = build_model("timm/test_resnet", C, head="spinal", layer_width=8, preset="vgg")
    d = m.spinal_info.to_dict()
    assert d["backbone"] == "timm/test_resnet" and d["head_options"] == {"layer_width": 8, "preset": "vgg"}
    assert d["feature_width"] == get_head(m).in_features and d["replace"] == "last"
    assert d["default_head_params"] == (d["feature_width"] + 1) * C


def test_a_timm_model_of_fixed_input_size_is_built_for_the_asked_size_and_its_weights_fitted(tmp_path, caplog,
                                                                                              monkeypatch):
    """timm/test_vit is built for 160 px (a 10x10 patch grid); asked for 64 px it is built for a 4x4 grid, and a
    weights file of the 160 px model has its position embedding resampled as timm's own loader does
    (vision_transformer.checkpoint_filter_fn), every other tensor taken as it is. A size the model cannot run on
    (smaller than one patch) is one line naming the model's own size, not a traceback."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    from spinal_transfer.models import surgery

    built, original = [], surgery.create_timm
    monkeypatch.setattr(surgery, "create_timm", lambda *a, **k: built.append(k) or original(*a, **k))
    with caplog.at_level("INFO", logger="spinal_transfer"):
        model = build_model("timm/test_vit", 3, head="linear", img_size=64)
    assert model.spinal_info.input_size == 64 and model.patch_embed.grid_size == (4, 4)
    assert built == [{"pretrained": False, "img_size": 64}]        # built once, for the asked size
    assert "timm/test_vit: built for 64 px, not its own 160 px (4x4 patches)" in caplog.messages
    assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    native = timm.create_model("test_vit", pretrained=False)
    torch.save(native.state_dict(), tmp_path / "vit160.pth")
    loaded = build_model("timm/test_vit", 3, head="linear", weights=str(tmp_path / "vit160.pth"), img_size=64)
    expected = checkpoint_filter_fn(native.state_dict(), timm.create_model("test_vit", pretrained=False, img_size=64))
    got = loaded.state_dict()
    assert torch.allclose(got["pos_embed"], expected["pos_embed"], atol=1e-6)
    assert torch.equal(got["blocks.0.attn.qkv.weight"], native.state_dict()["blocks.0.attn.qkv.weight"])
    assert any("pos_embed resampled from (1, 101, 64) to (1, 17, 64)" in n for n in loaded.spinal_info.notes)
    assert build_model("timm/resnet18", 3, head="linear", img_size=64).spinal_info.input_size == 224  # not fixed
    with pytest.raises(ConfigError, match=r"^timm/test_vit does not run on 8 px images \(Input height \(8\) should be "
                                          r"divisible by patch size \(16\)\.\); use --img-size 160 \(its own size\)"):
        build_model("timm/test_vit", 3, head="linear", img_size=8)


@pytest.mark.parametrize("num_classes", [1000, 4])
def test_the_default_heads_macs_count_every_position_a_1x1_conv_classifier_runs_on(num_classes):
    """SqueezeNet's classifier is a 1x1 conv on the feature map, then a pool: its MACs are in x out at each of
    the map's positions at the model's input size (13x13 at 224 px), measured here by running the model's own
    features; a pooled Linear (ResNet) is one position."""
    model = build_model("torchvision/squeezenet1_0", num_classes, head="spinal", weights="none")
    size = model.spinal_info.input_size
    with torch.no_grad():
        h, w = model.features(torch.zeros(1, 3, size, size)).shape[2:]
    assert (size, h, w) == (224, 13, 13) and model.spinal_info.default_head_macs == 512 * num_classes * h * w
    resnet = build_model("torchvision/resnet18", 4, head="linear", weights="none")
    assert resnet.spinal_info.default_head_macs == 512 * 4


def test_a_size_only_the_auxiliary_heads_cannot_take_is_refused_before_training():
    """Inception v3 runs on 80 px in eval mode, but its AuxLogits (train mode only) fail there: the size check
    probed eval mode alone, so train crashed with a traceback in its first step (QA 25). A model with auxiliary
    heads is probed in train mode too, without changing its BatchNorm statistics (GoogLeNet at 96 px runs)."""
    from spinal_transfer.models.surgery import check_input_size

    inception = build_model("torchvision/inception_v3", 3, head="linear", weights="none")
    with pytest.raises(ConfigError, match=r"^torchvision/inception_v3 does not run on 80 px images \(.*\); use "
                                          r"--img-size 299 \(its own size\)"):
        check_input_size(inception, 80)
    googlenet = build_model("torchvision/googlenet", 3, head="linear", weights="none")
    before = {k: b.clone() for k, b in googlenet.named_buffers()}
    check_input_size(googlenet, 96)
    assert all(torch.equal(b, before[k]) for k, b in googlenet.named_buffers()) and googlenet.training
