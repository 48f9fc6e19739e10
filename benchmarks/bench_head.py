"""SpinalHead forward+backward time vs a straightforward paper-style implementation, and its
multiply-accumulates vs the original classifier, both as ratios.

  python benchmarks/bench_head.py [--quick]

Shapes (the paper's transfer heads, batch 64):
  vgg     VGG-19-bn features 25088 -> spinal w1024 -> 225 classes, VGG preset (dropout 0.5 + BN)
          (the Bird-225 recipe); original head: torchvision's 25088-4096-4096-C classifier
  resnet  WRN-101-2 features 2048 -> spinal w196 -> 196 classes, ResNet preset (Stanford Cars);
          original head: Linear(2048, C)
The reference head is written the way the paper's scripts wrote it: four named layers fed with
explicit slices x[:, 0:h] / x[:, h:2h] and torch.cat. Both heads get identical weights (the forward
outputs are compared), train mode, fp32. Rounds alternate the two (and the original head,
timed for information); the ratio is the median over rounds of reference time / SpinalHead time
(> 1: SpinalHead is faster).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import Rounds, header, print_table  # noqa: E402
from torch import nn  # noqa: E402

from spinal_transfer.models.heads import LinearHead, MLPHead, SpinalHead  # noqa: E402


class PaperSpinalHead(nn.Module):
    """The upstream scripts' structure: fc_spinal_layer1..4 as Sequentials, explicit half slices,
    pairwise torch.cat for the output."""

    def __init__(self, in_features: int, layer_width: int, num_classes: int, vgg: bool):
        super().__init__()
        self.h = h = round(in_features / 2)

        def block(n_in: int) -> nn.Sequential:
            if vgg:
                return nn.Sequential(nn.Dropout(p=0.5), nn.Linear(n_in, layer_width), nn.BatchNorm1d(layer_width),
                                     nn.ReLU(inplace=True))
            return nn.Sequential(nn.Linear(n_in, layer_width), nn.ReLU(inplace=True))

        self.fc_spinal_layer1 = block(h)
        self.fc_spinal_layer2 = block(h + layer_width)
        self.fc_spinal_layer3 = block(h + layer_width)
        self.fc_spinal_layer4 = block(h + layer_width)
        out = [nn.Dropout(p=0.5)] if vgg else []
        self.fc_out = nn.Sequential(*out, nn.Linear(layer_width * 4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.h
        x1 = self.fc_spinal_layer1(x[:, 0:h])
        x2 = self.fc_spinal_layer2(torch.cat([x[:, h:2 * h], x1], dim=1))
        x3 = self.fc_spinal_layer3(torch.cat([x[:, 0:h], x2], dim=1))
        x4 = self.fc_spinal_layer4(torch.cat([x[:, h:2 * h], x3], dim=1))
        x = torch.cat([x1, x2], dim=1)
        x = torch.cat([x, x3], dim=1)
        x = torch.cat([x, x4], dim=1)
        return self.fc_out(x)


def copy_weights(ours: SpinalHead, ref: PaperSpinalHead) -> None:
    """Give the reference exactly our parameters and buffers."""
    with torch.no_grad():
        for i in range(4):
            block = getattr(ref, f"fc_spinal_layer{i + 1}")
            lin = [m for m in block if isinstance(m, nn.Linear)][0]
            lin.weight.copy_(ours.linears[i].weight)
            lin.bias.copy_(ours.linears[i].bias)
            bn = [m for m in block if isinstance(m, nn.BatchNorm1d)]
            if bn:
                bn[0].load_state_dict(ours.posts[i].norm.state_dict())
        out = [m for m in ref.fc_out if isinstance(m, nn.Linear)][0]
        out.weight.copy_(ours.fc_out.weight)
        out.bias.copy_(ours.fc_out.bias)


SHAPES = {
    # name: (in_features, width, classes, vgg preset, original head)
    "vgg19_bn w1024 C225": (25088, 1024, 225, True, lambda D, C: MLPHead(D, C, (4096, 4096))),
    "wrn101_2 w196 C196": (2048, 196, 196, False, lambda D, C: LinearHead(D, C)),
}
# The paper-recipes reference (A4 table) multiply counts, to check the closed forms against.
EXPECTED = {"vgg19_bn w1024 C225": (55_447_552, 120_459_264), "wrn101_2 w196 C196": (1_071_728, 401_408)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and iterations (< 1 min)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    header("bench_head: SpinalHead vs paper-style head, time and MACs", args)
    rounds = args.rounds or (5 if args.quick else 21)
    B = args.batch_size
    rows = []
    for name, (D, w, C, vgg, original) in SHAPES.items():
        torch.manual_seed(0)
        ours = SpinalHead.from_preset("vgg" if vgg else "resnet", D, C, w)
        ref = PaperSpinalHead(D, w, C, vgg)
        copy_weights(ours, ref)
        x = torch.randn(B, D)
        y = torch.randint(0, C, (B,))
        ours.eval(), ref.eval()
        with torch.no_grad():
            diff = (ours(x) - ref(x)).abs().max().item()
        ours.train(), ref.train()
        iters = 1 if vgg else 100         # enough work per measurement to dwarf timer noise
        orig = original(D, C)
        orig.train()

        def fwd_bwd(m):
            def f():
                t = time.perf_counter()
                for _ in range(iters):
                    m.zero_grad(set_to_none=True)
                    nn.functional.cross_entropy(m(x), y).backward()
                return iters, time.perf_counter() - t
            return f

        for m in (ours, ref, orig):
            fwd_bwd(m)()                    # warm-up
        print(f"{name}: batch {B}, {iters} forward+backward per measurement; eval-mode outputs max |diff| "
              f"{diff:.2e}", flush=True)
        R = Rounds({"ours": fwd_bwd(ours), "ref": fwd_bwd(ref), "orig": fwd_bwd(orig)}, reference="ref").run(
            rounds, verbose=False)
        m, lo, hi = R.ratio("ours")
        rows.append((f"{name}: fwd+bwd time", f"{1e3 / R.median_rate('ours'):.1f} vs {1e3 / R.median_rate('ref'):.1f} ms",
                     f"{m:.2f}x (reference time / ours; min {lo:.2f}, max {hi:.2f})", "(reported)"))
        m, lo, hi = R.ratio("ours", "orig")
        rows.append((f"{name}: fwd+bwd time vs original head", f"{1e3 / R.median_rate('ours'):.1f} vs "
                     f"{1e3 / R.median_rate('orig'):.1f} ms", f"{m:.2f}x (original time / spinal; min {lo:.2f}, max {hi:.2f})", "(reported)"))
        mo, mr = ours.macs(), orig.macs()
        exp = EXPECTED[name]
        check = "matches A4" if (mo, mr) == exp else f"A4 says {exp[0]:,} / {exp[1]:,}"
        rows.append((f"{name}: MACs/sample", f"{mo:,} vs original {mr:,}",
                     f"{mo / mr:.3f}x ({mr / mo:.2f}x fewer)" if mo < mr else f"{mo / mr:.2f}x ({mo / mr:.2f}x more)",
                     check))
    print(f"\nresults (time: median over {rounds} alternating rounds, reference / ours; MACs: spinal / original):")
    print_table(rows)


if __name__ == "__main__":
    main()
