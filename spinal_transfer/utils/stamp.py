"""The mark a file written by spinal-transfer carries, so that a command told to write over an existing file
replaces only one of its own (`cli.output_file`), never the user's photo that happens to be a PNG or their
labels that happen to be a CSV.

A PNG carries it as its `Software` text chunk, a page as its `generator` meta tag; predict's CSV is known by its
header and a skip list by its `path<TAB>reason` lines (formats no user file is likely to share)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Union

from .. import __version__

STAMP = "spinal-transfer"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def csv_header(k: int, gate: bool) -> list[str]:
    """predict's CSV columns for its top `k` (`gate`: with --min-confidence's `prediction` column)."""
    return ["path"] + (["prediction"] if gate else []) + [f"{col}_{j}" for j in range(1, k + 1)
                                                          for col in ("label", "prob")]


CSV_HEADERS = tuple(",".join(csv_header(1, gate)) for gate in (False, True))     # how each CSV of ours begins


def png_metadata() -> dict[str, str]:
    """matplotlib's `savefig(metadata=...)` for a PNG of ours (replacing its own "Matplotlib version" mark)."""
    return {"Software": f"{STAMP} {__version__}"}


def stamp_png(data: bytes) -> bytes:
    """PNG bytes from elsewhere (Chromium's screenshot) with our Software text chunk after the header chunk."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not PNG data")
    ihdr_end = len(PNG_SIGNATURE) + 8 + struct.unpack(">I", data[8:12])[0] + 4
    body = b"tEXt" + b"Software\0" + png_metadata()["Software"].encode("latin-1")
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    return data[:ihdr_end] + chunk + data[ihdr_end:]


def html_generator() -> str:
    return f'<meta name="generator" content="{STAMP} {__version__}">'


def is_ours(path: Union[str, Path]) -> bool:
    """Whether the file at `path` is one spinal-transfer wrote (by its kind's mark; False when unreadable)."""
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        with open(p, "rb") as f:
            head = f.read() if suffix == ".txt" else f.read(65536)      # a skip list: every line is checked
    except OSError:
        return False
    if suffix == ".png":
        return head.startswith(PNG_SIGNATURE) and f"Software\0{STAMP} ".encode() in head.split(b"IDAT", 1)[0]
    text = head.decode("utf-8", "replace")
    if suffix == ".csv":
        return text.startswith(CSV_HEADERS)
    if suffix in (".html", ".htm"):
        return f'<meta name="generator" content="{STAMP} ' in text[:4096]
    if suffix == ".txt":                 # a skip list: empty, or every line a path and a reason
        return all(line.count("\t") == 1 for line in text.splitlines())
    return False
