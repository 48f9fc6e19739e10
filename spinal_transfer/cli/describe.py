"""`spinal-transfer describe`."""
from __future__ import annotations

import argparse

from ..config import add_config_args, given_flags, resolve_config
from ..errors import ConfigError

EXAMPLES = """\
  spinal-transfer describe torchvision/vgg19_bn --num-classes 225 --head spinal --head-preset vgg --layer-width 1024
  spinal-transfer describe torchvision/wide_resnet101_2 --num-classes 196 --layer-width 196
  spinal-transfer describe timm/convnext_tiny --num-classes 10 --head mlp --mlp-hidden '[512]'
  spinal-transfer describe timm/vit_small_patch16_224 --num-classes 10 --img-size 96   # built for 96 px"""

OPTIONS = ("head", "head_preset", "layer_width", "num_layers", "num_splits", "shared_weights", "head_dropout",
           "mlp_hidden", "replace", "img_size")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("backbone", help="torchvision/<name> or timm/<name>")
    parser.add_argument("--num-classes", type=int, required=True)
    add_config_args(parser, only=OPTIONS)


def compare(default: int, new: int) -> str:
    """How the new head compares with the default one, readable either way round."""
    if new == default:
        return "the same"
    if new < default:
        return f"{default / max(new, 1):.2f}x fewer"
    return f"{new / max(default, 1):.2f}x more"


def main(args: argparse.Namespace) -> int:
    from ..models.heads import head_options  # lazy: no torch at --help
    from ..models.surgery import build_model, check_input_size, get_head, inference_heads  # lazy: no torch at --help

    if args.num_classes < 2:
        raise ConfigError(f"--num-classes must be >= 2, got {args.num_classes}")
    cfg = resolve_config(flags={**given_flags(args), "backbone": args.backbone})
    model = build_model(cfg.backbone, args.num_classes, head=cfg.head, weights=None, replace=cfg.replace,
                        img_size=cfg.img_size, **head_options(cfg))
    info, head = model.spinal_info, get_head(model)
    if cfg.img_size:
        check_input_size(model, cfg.img_size)     # what train would refuse, said here first
    size = str(info.input_size) + (f" (its own size; it runs on the asked {cfg.img_size} too)"
                                   if cfg.img_size and cfg.img_size != info.input_size else "")
    total = sum(p.numel() for p in model.parameters())
    rows = [("backbone", info.backbone), ("classifier replaced", ", ".join(info.head_paths) + f" ({info.replace})"),
            ("feature width", info.feature_width), ("input size", size),
            ("default head params", f"{info.default_head_params:,}"),
            ("default head MACs/sample", f"{info.default_head_macs:,}"),
            (f"new {info.head} head", head.extra_repr()),
            ("new head params", f"{head.num_params():,}"), ("new head MACs/sample", f"{head.macs():,}"),
            ("new head MACs vs default", compare(info.default_head_macs, head.macs())),
            ("new head params vs default", compare(info.default_head_params, head.num_params())),
            ("model params (with new head)", f"{total:,}")]
    if len(info.head_paths) > 1:       # DeiT-distilled's second head runs at inference, GoogLeNet's aux heads do not
        called = inference_heads(model)
        rows.append(("other heads replaced", ", ".join(
            f"{p} ({'at inference too' if m in called else 'training only'})"
            for p, m in zip(info.head_paths[1:], info.head_modules[1:]))))
        if len(called) > 1:
            rows.append(("note", f"{len(called)} heads run at inference and the model combines their outputs; the "
                                 f"head params and MACs above are of one of them"))
    rows += [("note", n) for n in info.notes]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
