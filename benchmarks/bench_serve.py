"""`spinal-transfer serve` under load: throughput and p50/p99 latency for 1, 8 and 32 concurrent clients, with
dynamic batching (--max-batch 32) against none (--max-batch 1), for the PyTorch fp32 runner and the int8 ONNX one.

  python benchmarks/bench_serve.py [BUNDLE] [--quick] [--clients 1 8 32] [--seconds 10] [--rounds 3]

BUNDLE: any bundle folder (`spinal-transfer export RUN --out BUNDLE --format onnx --quantize int8`; without
its int8 file only torch is measured). Without one, a bundle is made here from random weights, trained one
step so that it is a real export (timm/resnet18 + spinal head at 224 px; --quick: timm/test_resnet at 32 px):
speed only, its predictions mean nothing.

Every server setting (runner x max batch) is a real `spinal-transfer serve` subprocess, all started before
measuring and all on this machine. Clients are asyncio loops with keep-alive connections, each POSTing one
real JPEG at a time (the folder of `_common.make_jpeg_folder`: crops of scikit-learn's photos and digits,
32-900 px, so decoding is part of the cost) and sending the next as soon as the answer arrives. One
measurement is `--seconds` of N clients against one server: answers per second, and the median and 99th
percentile of their latencies. Measurements alternate in rounds (rotating order); throughput ratios are per
round against the same runner's --max-batch 1 server at the same client count, median over rounds. The client
loops run in this process, on the same cores as the server: on a small machine they take a share of it.
Target (issue 27): with 32 clients, --max-batch 32 answers >= 2x the images/s of --max-batch 1.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, Rounds, header, make_jpeg_folder, print_table, verdict  # noqa: E402

TARGET_SPEEDUP = 2.0             # 32 clients: dynamic batching vs --max-batch 1
BATCHES = (32, 1)
RUNNERS = ("torch", "onnx-int8")


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "spinal_transfer", *args], check=True, env=env, cwd=REPO,
                          stdout=subprocess.DEVNULL, **kw)


def make_bundle(work: Path, quick: bool) -> Path:
    """A bundle with its ONNX and int8 files from a run of one training step on the digits (random weights)."""
    backbone, size = ("timm/test_resnet", 32) if quick else ("timm/resnet18", 224)
    cli("prepare", "digits", "--root", str(work / "data"))
    cli("train", "--data", str(work / "data" / "digits"), "--backbone", backbone, "--weights", "none", "--img-size",
        str(size), "--epochs", "1", "--freeze-epochs", "0", "--limit-train-batches", "1", "--batch-size", "16",
        "--out", str(work / "run"), stderr=subprocess.DEVNULL)
    cli("export", str(work / "run"), "--out", str(work / "bundle"), "--format", "onnx", "--quantize", "int8",
        "--force", stderr=subprocess.DEVNULL)
    return work / "bundle"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `spinal-transfer serve` subprocess (its access log to /dev/null, its other lines to `log`)."""

    def __init__(self, bundle: Path, runner: str, max_batch: int, log: Path):
        self.name = f"{runner} b{max_batch}"
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "spinal_transfer", "serve", str(bundle), "--runner",
                                          runner, "--max-batch", str(max_batch), "--port", self.url.rsplit(":", 1)[1]],
                                         stdout=subprocess.DEVNULL, stderr=out, env=env, cwd=REPO)
        self.log = log

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready in {timeout:.0f} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


async def _load(url: str, images: list[bytes], clients: int, seconds: float) -> tuple[int, float, list[float]]:
    """`clients` closed loops for `seconds`: (answers, wall seconds until the last answer, latencies)."""
    import httpx

    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.perf_counter()
        stop = start + seconds

        async def client(k: int) -> None:
            i = k
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = await http.post(url + "/predict", content=images[i % len(images)],
                                    headers={"Content-Type": "image/jpeg"})
                r.raise_for_status()
                latencies.append(time.perf_counter() - t)
                i += clients
        await asyncio.gather(*(client(k) for k in range(clients)))
        return len(latencies), time.perf_counter() - start, latencies


def measurement(server: Server, images: list[bytes], clients: int, seconds: float,
                latencies: list[float]) -> Callable[[], tuple[float, float]]:
    """A Rounds measurement (answers, seconds); every latency is kept in `latencies`."""
    def measure() -> tuple[float, float]:
        n, wall, lat = asyncio.run(_load(server.url, images, clients, seconds))
        latencies.extend(lat)
        return n, wall
    return measure


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", nargs="?", type=Path, help="bundle folder (default: one made here, see above)")
    ap.add_argument("--quick", action="store_true", help="tiny model (when no bundle), 1 s per measurement, 2 rounds")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, help="per measurement (default: 10; --quick: 1)")
    ap.add_argument("--rounds", type=int, help="(default: 3; --quick: 2)")
    ap.add_argument("--images", type=int, help="JPEGs the clients send, in turn (default: 200; --quick: 40)")
    args = ap.parse_args()
    seconds = args.seconds or (1.0 if args.quick else 10.0)
    rounds = args.rounds or (2 if args.quick else 3)
    header("serve: throughput and latency of `spinal-transfer serve`", args)

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        bundle = args.bundle or make_bundle(work, args.quick)
        n_images = args.images or (40 if args.quick else 200)
        folder = make_jpeg_folder(work / "jpegs", n_photo=n_images * 3 // 4, n_digits=n_images // 4)
        images = [p.read_bytes() for p in sorted(folder.rglob("*.jpg"))]
        runners = [r for r in RUNNERS if r == "torch" or (bundle / "model.int8.onnx").is_file()]
        print(f"bundle: {bundle}{' (made here: random weights, one training step)' if not args.bundle else ''}; "
              f"runners {', '.join(runners)}; {len(images)} JPEGs, {sum(map(len, images)) / len(images) / 1e3:.0f} kB "
              f"on average ({time.perf_counter() - t:.0f} s)", flush=True)
        servers = {f"{r} b{b}": Server(bundle, r, b, work / f"{r}-{b}.log") for r in runners for b in BATCHES}
        try:
            for s in servers.values():
                s.wait_ready()
            latencies: dict[str, list[float]] = {}
            fns = {}
            for c in args.clients:
                for name, server in servers.items():
                    latencies[f"{name} c{c}"] = []
                    fns[f"{name} c{c}"] = measurement(server, images, c, seconds, latencies[f"{name} c{c}"])
            print(f"{len(fns)} measurements of {seconds:g} s, {rounds} rounds, after a warm-up of each:", flush=True)
            for name, fn in fns.items():           # warm-up (first batches, connections), not kept
                fn()
                latencies[name].clear()
            R = Rounds(fns, next(iter(fns))).run(rounds)
        finally:
            for s in servers.values():
                s.stop()

    rows = []
    for c in args.clients:
        for r in runners:
            for b in BATCHES:
                name, ref = f"{r} b{b} c{c}", f"{r} b1 c{c}"
                lat = latencies[name]
                med, lo, hi = R.ratio(name, ref)
                target = "(reference)" if b == 1 else verdict(med, TARGET_SPEEDUP) if c == 32 else "(reported)"
                rows.append((f"{r}, --max-batch {b}, {c} client(s)",
                             f"{R.median_rate(name):.1f} img/s, p50 {1e3 * percentile(lat, 50):.0f} ms, "
                             f"p99 {1e3 * percentile(lat, 99):.0f} ms",
                             f"{med:.2f}x (min {lo:.2f}, max {hi:.2f})", target))
    print(f"\nresults (median over {len(R.rates[next(iter(fns))])} rounds of answers/s; ratio vs the same runner "
          f"with --max-batch 1 and the same clients, in the same round; latencies over every answer of all rounds):")
    print_table(rows)
    if len(runners) > 1:
        rows = [(f"onnx-int8 vs torch, --max-batch {b}, {c} client(s)", f"{R.median_rate(f'onnx-int8 b{b} c{c}'):.1f} "
                 f"vs {R.median_rate(f'torch b{b} c{c}'):.1f} img/s",
                 "{:.2f}x (min {:.2f}, max {:.2f})".format(*R.ratio(f"onnx-int8 b{b} c{c}", f"torch b{b} c{c}")),
                 "(reported)") for c in args.clients for b in BATCHES]
        print("\nint8 ONNX runner against PyTorch fp32, same settings, same rounds:")
        print_table(rows)


if __name__ == "__main__":
    main()
