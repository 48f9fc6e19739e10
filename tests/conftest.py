"""Shared fixtures: real data (scikit-learn's bundled digits) written out as PNG image folders."""
from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from PIL import Image, PngImagePlugin


def write_digits_folder(root: Path, digits: tuple[int, ...] = tuple(range(10)), size: int = 32,
                        splits: tuple[str, ...] = ("train", "val", "test"), seed: int = 0) -> Path:
    """Write sklearn's 8x8 digits as `size`x`size` RGB PNGs in ROOT/{train,val,test}/<digit>/.

    Split is stratified 60/20/20 with a fixed seed; with `splits=()` the flat ROOT/<class>/ layout is written.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    keep = np.isin(ds.target, digits)
    images, labels = ds.images[keep], ds.target[keep]
    idx = np.arange(len(labels))
    parts: dict[str, np.ndarray]
    if splits:
        tr, rest = train_test_split(idx, test_size=0.4, stratify=labels, random_state=seed)
        va, te = train_test_split(rest, test_size=0.5, stratify=labels[rest], random_state=seed)
        parts = dict(zip(("train", "val", "test"), (tr, va, te)))
        parts = {k: v for k, v in parts.items() if k in splits}
    else:
        parts = {"": idx}
    for split, ids in parts.items():
        for i in ids:
            d = root / split / f"digit_{labels[i]}"
            d.mkdir(parents=True, exist_ok=True)
            arr = (images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(arr, mode="L").resize((size, size), Image.BILINEAR).convert("RGB")
            img.save(d / f"{i:04d}.png")
    return root


def bomb_png(side: int = 20000) -> bytes:
    """A PNG whose header claims side x side pixels (400 M at 20000: over PIL's decompression-bomb bound)
    with nearly no data: what a decompression bomb looks like before it is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


XMP = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       '<rdf:Description rdf:about="" xmlns:tiff="http://ns.adobe.com/tiff/1.0/"{}>{}</rdf:Description>'
       '</rdf:RDF></x:xmpmeta>')


def save_oriented(im: Image.Image, path: Path, orientation: int, where: str) -> Path:
    """`im` saved with its orientation kept in EXIF ("exif"), or only in XMP (a JPEG's or WebP's APP1 packet, a PNG's
    iTXt), as an attribute ("xmp") or an element ("xmp-element"): the two forms Pillow reads."""
    if where == "exif":
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(path, exif=exif.tobytes())
        return path
    packet = (XMP.format(f' tiff:Orientation="{orientation}"', "") if where == "xmp"
              else XMP.format("", f"<tiff:Orientation>{orientation}</tiff:Orientation>"))
    if path.suffix == ".png":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", packet)
        im.save(path, pnginfo=info)
    else:
        im.save(path, xmp=packet.encode())
    return path


def truncated_jpeg(path: Path, seed: int = 0) -> Path:
    """A JPEG cut after its header and part of its scan data: the cheap header check passes, decoding fails."""
    from io import BytesIO

    rng = np.random.default_rng(seed)
    buf = BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


# Sends `signal` to its own process (or rank) right after optimizer step `k`, or with NAME@group to its whole process
# group: the test then knows exactly how many steps were done before the signal. A real signal, a real handler.
SIGNAL_AT_STEP = """
import os, signal, subprocess, sys, time
import spinal_transfer.training.train as T
k, name, times, only_rank = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
name, _, to = name.partition("@")            # NAME@group: to the whole process group (start it in a session)


def send(sig):
    if to != "group":
        return os.kill(os.getpid(), sig)
    # sent by another process, as timeout and Slurm send it: a DataLoader worker tells its parent's SIGTERM from others'
    subprocess.run(["kill", "-s", sig.name[3:], "--", f"-{os.getpgid(0)}"], start_new_session=True, check=True)
    time.sleep(1)             # the step in flight goes on a while (a real one's forward and backward) meanwhile
real, fired = T.train_one_epoch, []

def patched(*args, **kw):
    progress = kw["progress"]

    def on_step():
        if progress.step == k and not fired and only_rank in (-1, int(os.environ.get("RANK", 0))):
            fired.append(k)
            for _ in range(times):
                send(getattr(signal, "SIG" + name))
    return real(*args, **{**kw, "on_step": on_step})

T.train_one_epoch = patched
from spinal_transfer.cli import main
sys.exit(main(sys.argv[5:]))
"""


# A small backbone from random init: ~0.4M parameters, 32x32 inputs, CPU-friendly.
TINY = dict(backbone="timm/test_resnet", weights="none", head="spinal", layer_width=32, img_size=32,
            batch_size=32, workers=0, augment="none", optimizer="sgd", lr=0.05, weight_decay=0.0,
            scheduler="none", freeze_epochs=0, log_interval=1000, min_steps=0, label_smoothing=0.0)


def tiny_cfg(data: Path, out: Path, **kw):
    from spinal_transfer.config import TrainConfig

    return TrainConfig(**{**TINY, "data": str(data), "out": str(out), **kw})


def signal_after(cmd: list[str], line: str, sig: int, env: Optional[dict] = None,
                 timeout: float = 600) -> tuple[int, str]:
    """Run `cmd`, send `sig` the moment its stderr shows `line` (timed on what the command logs, not on a sleep):
    (exit code, all of stderr)."""
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for text in proc.stderr:
        seen.append(text)
        if line in text:
            proc.send_signal(sig)
            break
    rest = proc.communicate(timeout=timeout)[1]
    return proc.returncode, "".join(seen) + rest


def cli_flags(**options) -> list[str]:
    """--key value flags of TrainConfig options (None: the flag is left out)."""
    return [a for k, v in options.items() if v is not None for a in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture
def cli_run(capsys):
    """`spinal-transfer ARGS` in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from types import SimpleNamespace

    from spinal_transfer.cli import main

    def call(*args) -> SimpleNamespace:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return call


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a folder and its bytes (the lock file aside: it is the lock, not the run)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="session")
def three_digits(tmp_path_factory) -> Path:
    """Digits 0, 1, 2 only (537 images, 32x32): a folder that trains in seconds."""
    return write_digits_folder(tmp_path_factory.mktemp("d3") / "digits", digits=(0, 1, 2))


@pytest.fixture(scope="session")
def finished_run(three_digits, tmp_path_factory) -> Path:
    """A finished 2-epoch run on `three_digits` (tests copy it before changing anything)."""
    from spinal_transfer.training.train import run

    out = tmp_path_factory.mktemp("finished") / "run"
    run(tiny_cfg(three_digits, out, epochs=2, limit_train_batches=3))
    return out


@pytest.fixture(scope="session")
def other_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, finished 1-epoch run) on digits 3, 4, 5: another run, on other images than `finished_run`'s,
    whose checkpoints tests copy into that run's folder."""
    from spinal_transfer.training.train import run

    root = tmp_path_factory.mktemp("other")
    data = write_digits_folder(root / "digits", digits=(3, 4, 5))
    run(tiny_cfg(data, root / "run", epochs=1, limit_train_batches=2))
    return data, root / "run"


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """All ten digits, ROOT/{train,val,test}/digit_<k>/*.png (1797 images, 32x32)."""
    return write_digits_folder(tmp_path_factory.mktemp("digits"))


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (small images; see runtime.torch_threads)."""
    from spinal_transfer.utils.runtime import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """Runs in this process may switch torch's deterministic mode (--deterministic): restore it after each test."""
    import torch

    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_transfer(tmp_path_factory) -> tuple[Path, Path]:
    """(digits 5-9 folder at 16 px, a checkpoint trained on digits 0-4): a backbone whose frozen features
    carry over to classes it never saw, for comparing and searching heads on it (compare, tune)."""
    import torch

    from spinal_transfer.training.train import run

    root = tmp_path_factory.mktemp("transfer")
    low = write_digits_folder(root / "low", digits=(0, 1, 2, 3, 4), size=16)
    high = write_digits_folder(root / "high", digits=(5, 6, 7, 8, 9), size=16)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(tiny_cfg(low, root / "pre", epochs=3, scheduler="cosine", img_size=16, batch_size=64, device="cpu"))
    finally:
        torch.set_num_threads(n)
    return high, root / "pre" / "checkpoints" / "best.pt"


HUB_COMMIT = hashlib.sha1(b"spinal-transfer test commit").hexdigest()


def put_in_hub_cache(cache: Path, repo: str, folder: Path, commit: str = HUB_COMMIT) -> Path:
    """Copy the files of `folder` into `cache` the way huggingface_hub stores a download: content in
    blobs/<etag> (sha256 for LFS files such as safetensors, git blob sha1 for small text files),
    snapshots/<commit>/<name> as relative symlinks to them, refs/main holding the commit."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        etag = (hashlib.sha256(data).hexdigest() if f.suffix == ".safetensors"
                else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
        (repo_dir / "blobs" / etag).write_bytes(data)
        (repo_dir / "snapshots" / commit / f.name).symlink_to(Path("..", "..", "blobs", etag))
    (repo_dir / "refs" / "main").write_text(commit)
    return repo_dir


def chromium_or_skip() -> str:
    """The headless browser's executable, or skip the test saying why (the browser tests of report.html, audit.html
    and serve's page)."""
    from spinal_transfer.evaluation.browser import find_chromium

    exe = find_chromium()
    if exe is None:
        reason = "no Chromium on this machine (.ci/run installs Debian's chromium; set $CHROMIUM to another)"
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    return exe
