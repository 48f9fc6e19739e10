"""channels_last vs NCHW: fp32 training step time per architecture, the evidence for its default.

  python benchmarks/bench_channels_last.py [--quick] [--models torchvision/resnet50 timm/vit_tiny_patch16_224 ...]

For each backbone (+ spinal head, weights none): the same model weights in both memory formats, one
forward + backward + SGD step on the same random batch (batch 16, the model's pretrained input size),
alternating the formats in rounds after one warm-up step each. Ratio =
NCHW step time / channels_last step time, median over rounds (> 1: channels_last is faster). The
library turns channels_last on by default on CUDA and CPU (`--channels-last false` turns it off).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import Rounds, header, print_table  # noqa: E402
from torch import nn  # noqa: E402

from spinal_transfer.models.surgery import build_model  # noqa: E402
from spinal_transfer.utils.runtime import tune_cpu_allocator  # noqa: E402

MODELS = ["torchvision/resnet50", "torchvision/densenet121", "torchvision/vgg11_bn", "torchvision/mobilenet_v3_large",
          "timm/efficientnet_b0", "timm/regnety_016", "timm/convnext_tiny", "timm/vit_tiny_patch16_224"]
QUICK = ["torchvision/resnet18", "timm/vit_tiny_patch16_224"]


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, channels_last: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    x = x.contiguous(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    criterion = nn.CrossEntropyLoss()

    def step() -> tuple[int, float]:
        t = time.perf_counter()
        criterion(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return len(x), time.perf_counter() - t
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK)}; 3 rounds")
    ap.add_argument("--models", nargs="+", default=None, help="default: " + " ".join(MODELS))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--img-size", type=int, default=None, help="default: each model's pretrained input size")
    ap.add_argument("--rounds", type=int, default=None, help="default 6; quick 3")
    args = ap.parse_args()
    models = args.models or (QUICK if args.quick else MODELS)
    rounds = args.rounds or (3 if args.quick else 6)
    header("bench_channels_last: fp32 training step, NCHW vs channels_last", args)
    tune_cpu_allocator(torch.device("cpu"))                     # as the library's runs do
    rows = []
    for name in models:
        torch.manual_seed(0)
        model = build_model(name, 10, head="spinal", weights="none")
        size = args.img_size or model.spinal_info.input_size
        x, y = torch.randn(args.batch_size, 3, size, size), torch.randint(0, 10, (args.batch_size,))
        fns = {"nchw": step_fn(model, x, y, False), "channels_last": step_fn(copy.deepcopy(model), x, y, True)}
        R = Rounds(fns, reference="nchw").run(rounds, warmup=True, verbose=False)
        med, lo, hi = R.ratio("channels_last")
        rows.append((f"{name} {size} px", f"{1e3 / R.median_rate('nchw') * args.batch_size:.0f} vs "
                     f"{1e3 / R.median_rate('channels_last') * args.batch_size:.0f} ms/step",
                     f"{med:.2f}x (min {lo:.2f}, max {hi:.2f})", "(reported)"))
        print(f"  {rows[-1][0]}: {rows[-1][1]}, {rows[-1][2]}", flush=True)
    print(f"\nresults (batch {args.batch_size}, fp32, median over {rounds} rounds; measured: NCHW vs channels_last "
          f"step time; ratio = NCHW time / channels_last time):")
    print_table(rows)


if __name__ == "__main__":
    main()
