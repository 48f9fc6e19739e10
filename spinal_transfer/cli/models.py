"""`spinal-transfer models`."""
from __future__ import annotations

import argparse
import sys

EXAMPLES = """\
  spinal-transfer models timm/                 # every timm architecture
  spinal-transfer models 'torchvision/resnet*'
  spinal-transfer models convnext              # a plain word matches anywhere in the name"""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", metavar="PATTERN",
                        help="glob (or substring) on 'library/name', e.g. timm/ or 'torchvision/vgg*'")
    parser.add_argument("--filter", dest="filter", metavar="PATTERN", help="the same as PATTERN")


def main(args: argparse.Namespace) -> int:
    from ..models.surgery import list_backbones  # lazy: no torch at --help

    pattern = args.pattern or args.filter
    names = list_backbones(pattern)
    if names:
        print("\n".join(names))
    print(f"# {len(names)} backbone{'' if len(names) == 1 else 's'}" + (
        f": none matches {pattern!r} (a glob, or a word found anywhere in 'library/name' in any case; `spinal-transfer "
        f"models` lists all)" if pattern and not names else ""), file=sys.stderr)
    return 0
