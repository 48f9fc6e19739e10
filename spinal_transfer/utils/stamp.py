"""The mark a file written by spinal-transfer carries, so that a command told to write over an existing file
replaces only one of its own (`cli.output_file`), never the user's photo that happens to be a PNG or their
labels that happen to be a CSV.

A PNG carries it as its `Software` text chunk, a page as its `generator` meta tag, Markdown as an HTML comment, a
recipe (YAML) as a comment line and JSON as its first key `generator`; a CSV, which a comment would break for its
readers, is known by its header (predict's, or the one the writing command passes) and a skip list by its
`path<TAB>reason` lines (formats no user file is likely to share).

`refuse_others` is the rule for a command's output FOLDER: a file there under a name the command writes is
replaced only when it is ours (`cli.output_file` is the same rule for an output FILE)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Iterable, Sequence, Union

from .. import __version__
from ..errors import ConfigError

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


def md_generator() -> str:
    """The last line of a Markdown file of ours (a comment: no viewer shows it)."""
    return f"<!-- generator: {STAMP} {__version__} -->\n"


def yaml_generator() -> str:
    """A comment line of a YAML file of ours (its readers skip it)."""
    return f"# generator: {STAMP} {__version__}\n"


def json_generator() -> dict[str, str]:
    """The first key of a JSON object of ours (`json.dumps(..., indent=1)`: recognised by how the text begins)."""
    return {"generator": f"{STAMP} {__version__}"}


def is_ours(path: Union[str, Path], csv_header: Sequence[str] = ()) -> bool:
    """Whether the file at `path` is one spinal-transfer wrote (by its kind's mark; False when unreadable or a
    folder). A CSV is ours when it begins with the columns `csv_header` (default: predict's)."""
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        with open(p, "rb") as f:
            head = f.read() if suffix in (".txt", ".md") else f.read(65536)   # a skip list: every line is checked
    except OSError:
        return False
    if suffix == ".png":
        return head.startswith(PNG_SIGNATURE) and f"Software\0{STAMP} ".encode() in head.split(b"IDAT", 1)[0]
    text = head.decode("utf-8", "replace")
    if suffix == ".csv":
        return text.startswith((",".join(csv_header),) if csv_header else CSV_HEADERS)
    if suffix in (".md", ".yaml", ".yml"):
        return f"generator: {STAMP} " in text
    if suffix == ".json":
        return text.lstrip("{ \n").startswith(f'"generator": "{STAMP} ')
    if suffix in (".html", ".htm"):
        return f'<meta name="generator" content="{STAMP} ' in text[:4096]
    if suffix == ".txt":                 # a skip list: empty, or every line a path and a reason
        return all(line.count("\t") == 1 for line in text.splitlines())
    return False


def refuse_others(folder: Union[str, Path], names: Iterable[str], csv_header: Sequence[str] = (),
                  option: str = "--out") -> None:
    """Before a command writes `names` into its output `folder` (and before its work starts): ConfigError for
    the first of them that is there and not ours (`is_ours`; a CSV by the command's `csv_header`), so that a
    user's own audit.csv or report.html is never replaced. Ours, from an earlier run, are replaced: reruns and
    resumes into the same folder go on. A folder holding the command's CSV (known by its header, which versions
    before these marks wrote too) is the command's own: its other files, perhaps unmarked, are replaced too, so an
    older version's study or comparison goes on after an upgrade."""
    paths = [Path(folder).expanduser() / n for n in names]
    present = [p for p in paths if p.exists() or p.is_symlink()]
    if csv_header and any(p.suffix == ".csv" and is_ours(p, csv_header) for p in present):
        return
    for p in present:
        if not is_ours(p, csv_header):
            raise ConfigError(f"{option} {folder}: {p} is not a file spinal-transfer wrote, and this command would "
                              f"replace it; it is not replaced: give another {option}, or move the file")
