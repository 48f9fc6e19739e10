"""The mark a file written by spinal-transfer carries, so that a command told to write over an existing file
replaces only one of its own (`cli.output_file`), never the user's photo that happens to be a PNG or their
labels that happen to be a CSV.

A PNG carries it as its `Software` text chunk, a page as its `generator` meta tag, Markdown as an HTML comment, a
recipe (YAML) as a comment line and JSON as its first key `generator`; a CSV, which a comment would break for its
readers, is known by its header (predict's, or the one the writing command passes) and a skip list by its
`path<TAB>reason` lines (formats no user file is likely to share).

`refuse_others` is the rule for a command's output FOLDER: a file there under a name the command writes is
replaced only when it is ours (`cli.output_file` is the same rule for an output FILE); so is an Optuna study
(`study.db`, which tune keeps there and continues) and a folder of run folders (compare's `runs/`)."""
from __future__ import annotations

import contextlib
import re
import sqlite3
import struct
import zlib
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

from .. import __version__
from ..errors import ConfigError

STAMP = "spinal-transfer"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SQLITE_SIGNATURE = b"SQLite format 3\0"
SEED_FOLDER = re.compile(r"seed\d+")          # a run's folder in a folder of runs: runs/<head or recipe>/seed<k>/


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
    folder). A CSV is ours when it begins with the columns `csv_header` (default: predict's); a `.db` when it is
    tune's Optuna study (`is_optuna_study`), which no mark can be put in."""
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
    if suffix == ".db":
        return is_optuna_study(p, head)
    return False


def is_optuna_study(path: Path, head: bytes) -> bool:
    """Whether the SQLite file at `path` (beginning with `head`) is an Optuna study tune may keep and continue:
    one with Optuna's `studies` table. Also one still empty, or an SQLite database without tables yet: a tune
    process starting beside this one is creating its study (Optuna makes `studies` first), and there is nothing
    of the user's to lose. A lock held past the wait (a tune writing it) is not a reason to refuse."""
    if not head:
        return True
    if not head.startswith(SQLITE_SIGNATURE):
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.OperationalError:     # busy: another process holds it; Optuna waits on it and says what is wrong
        return True
    except sqlite3.DatabaseError:        # not a database after all, or corrupt
        return False
    return not tables or "studies" in tables


def refuse_others(folder: Union[str, Path], names: Iterable[str], csv_header: Sequence[str] = (),
                  option: str = "--out", run_folder: Optional[Callable[[Path], bool]] = None) -> None:
    """Before a command writes `names` into its output `folder` (and before its work starts): ConfigError for
    the first of them that is there and not ours (`is_ours`; a CSV by the command's `csv_header`; a `.db` name is
    the Optuna study tune keeps there), so that a user's own audit.csv, report.html or SQLite file is never
    replaced or written into. A name ending in `/` is the command's folder of run folders,
    `<name>/<head or recipe>/seed<k>/`: refused when it holds anything else (`stray_run`; `run_folder` is how a
    run's folder is known, RunDir's marks, which this layer cannot import). Ours, from an earlier run, are
    replaced: reruns and resumes into the same folder go on. A folder holding the command's CSV (known by its
    header, which versions before these marks wrote too) is the command's own: its other files, perhaps
    unmarked, are replaced too, so an older version's study or comparison goes on after an upgrade."""
    paths = [(Path(folder).expanduser() / n, n.endswith("/")) for n in names]
    present = [(p, tree) for p, tree in paths if p.exists() or p.is_symlink()]
    if csv_header and any(p.suffix == ".csv" and is_ours(p, csv_header) for p, _ in present):
        return
    for p, tree in present:
        stray = stray_run(p, run_folder or (lambda _: False)) if tree else None
        if stray is not None:
            raise ConfigError(f"{option} {folder}: {stray} is not one of this command's run folders "
                              f"({p}/NAME/seed<k>/), and this command would put its runs beside it; it is left as it "
                              f"is: give another {option}, or move it")
        if not tree and not is_ours(p, csv_header):
            what = ("an Optuna study (an SQLite database with Optuna's tables), and this command would keep its study "
                    "in it; it is left as it is" if p.suffix == ".db" else
                    "a file spinal-transfer wrote, and this command would replace it; it is not replaced")
            raise ConfigError(f"{option} {folder}: {p} is not {what}: give another {option}, or move the file")


def _entries(folder: Path) -> list[Path]:
    """A folder's entries, sorted; none when it is gone (another process removed the folders its lock made)."""
    try:
        return sorted(folder.iterdir())
    except FileNotFoundError:
        return []


def stray_run(runs: Path, run_folder: Callable[[Path], bool]) -> Optional[Path]:
    """The first entry of a folder of runs, `runs/<head or recipe>/seed<k>/`, that is not one of its runs (None
    when all are): a file, a folder of another shape, or a seed<k> folder that `run_folder` does not know as a
    run's. An empty folder is fine: a starting run's lock makes its folders before its file, and an empty folder
    holds nothing to lose. `runs` itself not a folder is returned."""
    if not runs.is_dir():
        return runs
    for group in _entries(runs):
        if not group.is_dir():
            return group
        for run in _entries(group):
            if not (run.is_dir() and SEED_FOLDER.fullmatch(run.name) and (run_folder(run) or not _entries(run))):
                return run
    return None
