"""How text that holds file names becomes bytes, and back: UTF-8, with a name that is not valid UTF-8 kept as its
own bytes (Python's `surrogateescape`, the convention of `os.fsencode`/`os.fsdecode`).

On Linux a file name is any bytes; Python hands one that is not UTF-8 over as a str with lone surrogates, which a
plain `.encode()` or `open()` refuses with UnicodeEncodeError/UnicodeDecodeError. Every file we write that names
images (splits hashes, skipped_files.txt, predictions CSVs, reports) goes through here, so such a name is written as
the bytes the file system has and reads back to the same path. JSON needs nothing: `json.dumps` writes a lone
surrogate as a `\\udcXX` escape, which `json.loads` turns back into the same str.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TextIO, Union

ENCODING = "utf-8"
ERRORS = "surrogateescape"

PathLike = Union[str, os.PathLike]


def encode_text(text: str) -> bytes:
    """`text` as UTF-8, a file name that is not UTF-8 as its own bytes (what `os.fsencode` gives on Linux)."""
    return text.encode(ENCODING, ERRORS)


def read_text(path: PathLike) -> str:
    """A text file of ours as a str whose file names are the paths of the files they name."""
    return Path(path).read_bytes().decode(ENCODING, ERRORS)


def open_text(path: PathLike) -> TextIO:
    """A text file of ours opened for reading (newline="", as the csv module wants), decoded like `read_text`."""
    return open(path, newline="", encoding=ENCODING, errors=ERRORS)
