"""Result tables for people and machines: one table of display cells written as Markdown and as a
self-contained HTML page, a CSV beside them, all files replaced atomically.

Why one module: `compare` and `tune` (and `reproduce`'s layout, which these follow) each write a table that
must read the same in every format; building Markdown and HTML from the same cell dictionaries makes a
number that differs between two files impossible. Pages carry no external assets (no scripts, links or
remote images), so they open anywhere and can be attached to a report; pictures are embedded as data URIs.

No torch here: the tables are plain text.
"""
from __future__ import annotations

import base64
import csv
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from ..utils.atomic import atomic_write_text
from ..utils.stamp import html_generator, md_generator

PathLike = Union[str, Path]

STYLE = """body { font-family: system-ui, sans-serif; margin: 2em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #eee; }
tr.muted td { background: #fff4d6; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
img { max-width: 100%; }"""


@dataclass
class Table:
    """A titled table: `columns` are (header, cell key); each row is a dict of display text by cell key.
    `intro` sentences come before it, `notes` after; `muted` rows (by index) are shaded in HTML."""

    title: str
    columns: Sequence[tuple[str, str]]
    rows: Sequence[dict[str, str]]
    intro: Sequence[str] = ()
    notes: Sequence[str] = ()
    muted: Sequence[int] = field(default_factory=tuple)


def to_markdown(t: Table) -> str:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|")

    lines = ["| " + " | ".join(h for h, _ in t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(esc(r.get(k, "")) for _, k in t.columns) + " |" for r in t.rows]
    intro = "".join(f"{s}\n\n" for s in t.intro)
    return (f"# {t.title}\n\n{intro}" + "\n".join(lines) + "\n\n" + "".join(f"* {n}\n" for n in t.notes)
            + "\n" + md_generator())


def table_html(t: Table) -> str:
    """The <table> element alone (to place inside a page with other content)."""
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h, _ in t.columns)
    muted = ' class="muted"'
    body = "\n".join(f"<tr{muted if i in t.muted else ''}>"
                     + "".join(f"<td>{e(str(r.get(k, '')))}</td>" for _, k in t.columns) + "</tr>"
                     for i, r in enumerate(t.rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"


def page(title: str, body: str) -> str:
    """A complete HTML document around `body` (already HTML), with the shared style and nothing external."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{html_generator()}'
            f'<title>{html.escape(title)}</title>\n'
            f"<style>\n{STYLE}\n</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def to_html(t: Table) -> str:
    e = html.escape
    intro = "".join(f"<p>{e(s)}</p>\n" for s in t.intro)
    notes = "".join(f"<li>{e(n)}</li>" for n in t.notes)
    return page(t.title, f"{intro}{table_html(t)}\n<ul>{notes}</ul>")


def png_img(png: bytes, alt: str) -> str:
    """An <img> with the picture inside the page (data URI), so the page stays one file."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def to_csv(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    w.writerows(rows)
    return buf.getvalue()


def join(values: Iterable[Any]) -> str:
    """Several values in one CSV cell, ';'-separated (per seed, per trial)."""
    return ";".join(str(v) for v in values)


def write_files(folder: PathLike, files: dict[str, str]) -> list[Path]:
    """Write each name -> text into `folder`, each atomically (a reader sees the old file or the new one)."""
    paths = []
    for name, text in files.items():
        path = Path(folder) / name
        atomic_write_text(path, text)
        paths.append(path)
    return paths
