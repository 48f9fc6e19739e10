"""Every benchmark runs end to end in its --quick mode (slow tests).

A benchmark rots silently with the code it measures: bench_data (a crop scale that became the policy's default,
None) and bench_cache (checkpoint writes it timed through a name the saver no longer reads) failed only when a
full `run_all.py` ran them. Here each script runs as run_all runs it, in its own process, and must exit 0 with its
machine line and its results (a table, a results line or a verdict); bench_gpu runs its own code on the CPU
(`--device cpu`).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_all import BENCHES  # noqa: E402

EXTRA_ARGS = {"gpu": ["--device", "cpu"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BENCHES))
def test_benchmark_runs_in_quick_mode(name: str, tmp_path: Path) -> None:
    script = ROOT / "benchmarks" / BENCHES[name][0]
    res = subprocess.run([sys.executable, str(script), "--quick", *EXTRA_ARGS.get(name, [])], cwd=tmp_path,
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, f"{script.name} --quick exited {res.returncode}:\n{res.stderr[-3000:]}"
    assert re.search(r"^cpu: .+, \d+ cores", res.stdout, re.M), res.stdout[:2000]
    results = re.search(r"^(\| .+ \| .+ \||results\b.+|.*\b(PASS|MISS)\b.*)$", res.stdout, re.M)
    assert results, f"{script.name} --quick printed no results (table, results line or verdict):\n{res.stdout[-2000:]}"
