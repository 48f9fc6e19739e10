"""Run the benchmarks and write benchmarks/RESULTS.md from what they print.

  python benchmarks/run_all.py                 # all of them, ~5 h on 2 CPU cores (defaults ~2.7 h, predict ~70 min)
  python benchmarks/run_all.py --keep benchmarks/records   # the same, reusing and adding to the committed records of
                                                           # bench_defaults' fine-tunes (benchmarks/records/defaults)
  python benchmarks/run_all.py --only train    # rerun one (or several); the other sections are kept
  python benchmarks/run_all.py --quick         # every benchmark's --quick mode (a smoke run)

Each benchmark is its own process (so one's threads and DataLoader workers never overlap another's) and
prints its own machine line, command and ratios against a reference measured in the same run. This
script only collects that output: the summary at the top is every line that states a target (PASS/MISS).
"""
from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
BENCHES = {   # short name: (script, what it measures)
    "head": ("bench_head.py", "SpinalHead forward+backward vs a paper-style implementation; MACs vs the original heads"),
    "data": ("bench_data.py", "decode + augment images/s, ours vs torchvision-on-PIL, per worker and all workers"),
    "train": ("bench_train.py", "training images/s, our loop vs a paper-style loop (fp32 defaults, fp32 NCHW, bf16)"),
    "cache": ("bench_cache.py", "cached-feature head training vs frozen backbone without the cache; metric equality"),
    "compare": ("bench_compare.py", "frozen compare, 4 heads x 3 seeds: one shared feature cache vs a cache per run"),
    "bf16": ("bench_bf16_accuracy.py", "validation accuracy on the digits folder, fp32 vs bf16 autocast"),
    "channels_last": ("bench_channels_last.py", "fp32 training step per architecture, NCHW vs channels_last (its default)"),
    "defaults": ("bench_defaults.py", "train's defaults on real ImageNet weights (EfficientNet-Lite0; two few-shot "
                                      "folders, a 100-a-class and a texture folder) vs a linear probe, timm-like and fastai-like "
                                      "settings and one-change variants"),
    "lr_auto": ("bench_lr_auto.py", "train --lr auto (lr-find first, fastai's valley rule) vs the default lr on real "
                                    "ImageNet weights, the four folders of bench_defaults"),
    "gpu": ("bench_gpu.py", "GPU training images/s and MFU, fp32 vs bf16 + channels_last (+ compile); CUDA only"),
    "predict": ("bench_predict.py", "prediction images/s per runner (eager, channels_last, compile, ONNX Runtime fp32 "
                                    "and int8) and their top-1: fine-tuned real EfficientNet-Lite0, a trained ResNet-18, CNN and ViT"),
    "serve": ("bench_serve.py", "`spinal-transfer serve` answers/s and p50/p99 latency for 1, 8, 32 clients, dynamic "
                                "batching vs --max-batch 1, PyTorch fp32 vs int8 ONNX"),
    "audit": ("bench_audit.py", "audit on a folder with flipped labels, test images copied into train and foreign "
                                "images: precision/recall@k of the flips, leak recall, outlier ranks, time"),
}
_SECTION = re.compile(r"<!-- begin (\w+) -->\n(.*?)<!-- end \1 -->\n", re.S)


# benchmarks whose finished runs a rerun can reuse (--keep DIR: their records), and the folder under DIR they keep
# them in: lr_auto's defaults runs are bench_defaults' own configurations, so the two share one folder
KEEPS = {"defaults": "defaults", "lr_auto": "defaults"}


def run(name: str, quick: bool, keep: str | None = None) -> str:
    script, what = BENCHES[name]
    cmd = [sys.executable, str(HERE / script), *(["--quick"] if quick else []),
           *(["--keep", str(Path(keep) / KEEPS[name])] if keep and name in KEEPS else [])]
    print(f"== {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t = time.time()
    # stdout is the benchmark's report; stderr (progress bars of the runs it makes) goes to the terminal
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
    status = "" if res.returncode == 0 else f"\n**exit status {res.returncode}: the benchmark failed**\n"
    return (f"<!-- begin {name} -->\n## {name}: {what}\n\n`python benchmarks/{script}{' --quick' if quick else ''}`"
            f" ({time.time() - t:.0f} s){status}\n\n```text\n{res.stdout.rstrip()}\n```\n\n<!-- end {name} -->\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(BENCHES), help="run these; keep the other sections of RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (smoke run)")
    ap.add_argument("--keep", metavar="DIR", help=f"keep records of the runs of {', '.join(KEEPS)} in DIR/defaults; a "
                                                  "rerun reuses the finished ones whose configuration is unchanged")
    args = ap.parse_args()
    kept = _SECTION.finditer(RESULTS.read_text()) if RESULTS.exists() and args.only else ()
    sections = {m.group(1): m.group(0) for m in kept}
    for name in args.only or BENCHES:
        sections[name] = run(name, args.quick, args.keep)
        write(sections)
    print(f"wrote {RESULTS}", file=sys.stderr)


def _cell(line: str) -> str:
    """A verdict line as one cell of the Targets table: a line that is itself a table row keeps its pipes escaped,
    or Markdown would drop every cell past the header's two, the verdict among them."""
    return line.strip().strip("|").strip().replace("|", "\\|")


def write(sections: dict[str, str]) -> None:
    body = [sections[n] for n in BENCHES if n in sections]
    targets = [f"| {n} | {_cell(line)} |" for n in BENCHES if n in sections
               for line in sections[n].splitlines() if re.search(r"\b(PASS|MISS)\b", line)]
    RESULTS.write_text(
        "# Benchmark results\n\n"
        f"Written by `python benchmarks/run_all.py` (last run {datetime.date.today().isoformat()}); every number "
        "below is printed by the benchmark named in its section, whose first lines give the machine and the exact "
        "command. Speed is always a ratio against a reference measured in the same run, in alternating "
        "rounds: absolute times on a shared 2-core machine mean little. `--only` reruns some sections and keeps the "
        "others, so sections may come from different runs and machines: each one's `cpu:` line names its "
        "machine.\n\n"
        "## Targets\n\n| benchmark | line |\n|---|---|\n" + "\n".join(targets) + "\n\n" + "\n".join(body))


if __name__ == "__main__":
    main()
