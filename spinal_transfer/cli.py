"""`spinal-transfer` command line: a thin shell over the library's functions."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Callable, Optional

from .config import TrainConfig, add_config_args, config_from_args


def _parser(sub, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog="examples:\n" + examples,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import NonFiniteLoss, run

    if args.resume:
        cfg = None
    else:
        base = TrainConfig.from_yaml(args.recipe) if args.recipe else TrainConfig()
        if base.stages and (args.epochs is not None or args.lr is not None) and args.stages is None:
            base = dataclasses.replace(base, stages=[])     # --epochs/--lr on the command line replace the recipe's stages
        cfg = config_from_args(args, base)
        if not cfg.data:
            raise SystemExit("train: --data DIR is required (or a --recipe that sets data)")
    try:
        report = run(cfg if cfg is not None else TrainConfig(), resume=args.resume)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    from .utils import is_main

    if is_main():
        print(json.dumps({"best_epoch": report["best_epoch"], "val": _short(report["val"]),
                          "test": _short(report["test"])}, indent=1))
    return 0


def _short(m: dict) -> dict:
    from .metrics import summary

    return summary(m)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .metrics import summary
    from .train import evaluate

    m = evaluate(args.run, args.data, args.split, args.device, args.batch_size, args.workers)
    out = m if args.full else {**summary(m), "num_samples": m["num_samples"]}
    print(json.dumps(out, indent=1))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .surgery import list_backbones

    names = list_backbones(args.filter)
    print("\n".join(names))
    print(f"# {len(names)} backbones", file=sys.stderr)
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from .heads import head_options
    from .surgery import build_model, get_head

    cfg = config_from_args(args)
    model = build_model(cfg.backbone, args.num_classes, head=cfg.head, weights=None, replace=cfg.replace,
                        **head_options(cfg))
    info, head = model.spinal_info, get_head(model)
    total = sum(p.numel() for p in model.parameters())
    rows = [("backbone", info.backbone), ("classifier replaced", ", ".join(info.head_paths) + f" ({info.replace})"),
            ("feature width", info.feature_width), ("input size", info.input_size),
            ("default head params", f"{info.default_head_params:,}"),
            ("default head MACs/sample", f"{info.default_head_macs:,}"),
            (f"new {info.head} head", repr(head).splitlines()[0] if info.head != "spinal" else head.extra_repr()),
            ("new head params", f"{head.num_params():,}"), ("new head MACs/sample", f"{head.macs():,}"),
            ("MACs ratio default/new", f"{info.default_head_macs / max(head.macs(), 1):.2f}x"),
            ("params ratio default/new", f"{info.default_head_params / max(head.num_params(), 1):.2f}x"),
            ("model params (with new head)", f"{total:,}")]
    if len(info.head_paths) > 1:
        rows.append(("auxiliary heads", ", ".join(info.head_paths[1:])))
    rows += [("note", n) for n in info.notes]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


PLUGGED = ("prepare", "reproduce", "export", "predict")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spinal-transfer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = _parser(sub, "train", "fine-tune a backbone with a new head on an image folder", """\
  spinal-transfer train --data ~/pets --backbone timm/resnet50 --head spinal --epochs 10 --out runs/pets
  spinal-transfer train --data ~/pets --backbone torchvision/vgg19_bn --head spinal --head-preset vgg \\
      --weights default --img-size 224 --lr 1e-3 --optimizer sgd --out runs/pets_vgg
  spinal-transfer train --recipe recipes/stl10_wrn101_spinal.yaml --data data/stl10 --out runs/stl10
  spinal-transfer train --resume runs/pets          # continue an interrupted run
ROOT is ROOT/{train,val,test}/<class>/<image> or ROOT/<class>/<image>; missing val/test splits are
made (stratified) and saved in RUN/splits.json. Every option can also be set in a YAML --recipe;
flags win over the recipe. --epochs/--lr replace a recipe's multi-stage schedule.""")
    t.add_argument("--recipe", help="YAML file of options (see recipes/)")
    t.add_argument("--resume", metavar="RUN", help="continue RUN from RUN/checkpoints/last.pt")
    add_config_args(t)
    t.set_defaults(func=cmd_train)

    e = _parser(sub, "evaluate", "metrics of a trained run (best.pt) or checkpoint on one split", """\
  spinal-transfer evaluate runs/pets --data ~/pets --split test
  spinal-transfer evaluate runs/pets/checkpoints/last.pt --data ~/other_pets --split val --full""")
    e.add_argument("run", metavar="RUN_OR_CHECKPOINT")
    e.add_argument("--data", required=True, help="image folder (same layout as for train)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=int)
    e.add_argument("--workers", type=int)
    e.add_argument("--full", action="store_true", help="also print per-class metrics and the confusion matrix")
    e.set_defaults(func=cmd_evaluate)

    m = _parser(sub, "models", "list the backbones build_model can use", """\
  spinal-transfer models --filter 'torchvision/*'
  spinal-transfer models --filter convnext""")
    m.add_argument("--filter", metavar="PATTERN", help="glob (or substring) on 'library/name'")
    m.set_defaults(func=cmd_models)

    d = _parser(sub, "describe", "feature width, head sizes and MACs of a backbone with a new head", """\
  spinal-transfer describe torchvision/vgg19_bn --num-classes 225 --head spinal --head-preset vgg --layer-width 1024
  spinal-transfer describe torchvision/wide_resnet101_2 --num-classes 196 --layer-width 196
  spinal-transfer describe timm/convnext_tiny --num-classes 10 --head mlp --mlp-hidden '[512]'""")
    d.add_argument("backbone", help="torchvision/<name> or timm/<name>")
    d.add_argument("--num-classes", type=int, required=True)
    add_config_args(d, skip=("backbone",))
    d.set_defaults(func=cmd_describe)

    # Commands that live in their own module: each module has HELP, EXAMPLES, add_args(parser), main(args).
    import importlib

    for name in PLUGGED:
        mod = importlib.import_module(f".{name}", __package__)
        sp = _parser(sub, name, mod.HELP, mod.EXAMPLES)
        mod.add_args(sp)
        sp.set_defaults(func=mod.main)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except BrokenPipeError:        # output piped into `head` & co.: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        from .checkpoint import UnsafeCheckpointError
        from .data import DataError
        from .weights import WeightsUnavailable

        if isinstance(e, (DataError, UnsafeCheckpointError, WeightsUnavailable, FileNotFoundError, ValueError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
