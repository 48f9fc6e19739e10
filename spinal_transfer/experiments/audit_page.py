"""`audit.html`: the findings of `spinal-transfer audit` as one self-contained page, in report.html's style.

Built like `evaluation.report_page` (its CSS, its Content-Security-Policy, base64 `data:` thumbnails, no
script), so it opens from disk or an e-mail and never makes a request. Every flagged image is shown, and
both images of a pair, most certain first within each section; each figure carries `data-kind`,
`data-path`, `data-other` and `data-score` so a test can check the page against audit.csv. Past `limit`
findings a section says how many more audit.csv holds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import __version__
from ..data.splits import FOLDER_KINDS
from ..evaluation.plots import figure_png
from ..evaluation.report_page import _CSS, CSP, _e, _fmt, _png_uri, _thumb_uri  # one look for both pages
from ..utils.atomic import atomic_write_text
from ..utils.stamp import html_generator

THUMB = 128
_MORE_CSS = """
.pair{display:flex;gap:6px}.pair>div{flex:1;min-width:0}
figure.loss.leak{border-color:var(--bad)}
.tag{display:inline-block;padding:0 6px;border-radius:3px;background:#eef1f5;font-size:11px;margin-right:4px}
.tag.bad{background:#fde8e8;color:var(--bad)}
"""


def _img(path: str) -> str:
    uri, why = _thumb_uri(path, THUMB)
    if uri is None:
        return f'<div class="missing">cannot read the image:<br>{_e(why)}</div>'
    return f'<img src="{uri}" alt="{_e(Path(path).name)}">'


def _name(path: str) -> str:
    return f'<span class="path" title="{_e(path)}">{_e(Path(path).parent.name)}/{_e(Path(path).name)}</span>'


def _figure(f: Any) -> str:
    attrs = (f'class="loss finding{" leak" if f.leak else ""}" data-kind="{_e(f.kind)}" data-path="{_e(f.path)}" '
             f'data-other="{_e(f.other_path)}" data-score="{f.score!r}"')
    if f.other_path:
        pic = (f'<div class="pair"><div>{_img(f.other_path)}</div><div>{_img(f.path)}</div></div>')
        tag = (f'<span class="tag bad">{_e(f.other_split)} \u2192 {_e(f.split)}</span>' if f.leak
               else f'<span class="tag">{_e(f.split)}</span>')
        cap = (f'{tag}score {f.score:.4f}<br>{_e(f.detail)}<br>left: {_e(f.other_label)} {_name(f.other_path)}'
               f'<br>right: {_e(f.label)} {_name(f.path)}')
    else:
        pic = _img(f.path)
        cap = f'<span class="tag">{_e(f.split)}</span>given: <b class="t">{_e(f.label)}</b>'
        if f.suggested_label:
            cap += f'<br>suggested: <b class="p">{_e(f.suggested_label)}</b>'
        cap += f'<br>score {f.score:.4f}<br>{_e(f.detail)}<br>{_name(f.path)}'
    return f'<figure {attrs}>{pic}<figcaption>{cap}</figcaption></figure>'


def _grid_section(sid: str, title: str, note: str, found: Sequence[Any], limit: int) -> str:
    head = f'<section id="{sid}"><h2>{_e(title)} ({len(found)})</h2><p class="note">{note}</p>'
    if not found:
        return head + '<p class="note">none found.</p></section>'
    shown = sorted(found, key=lambda f: -f.score)[:limit]
    more = (f'<p class="note">{len(found) - limit} more in audit.csv.</p>' if len(found) > limit else "")
    return head + f'<div class="grid">{"".join(_figure(f) for f in shown)}</div>{more}</section>'


def _cards(result: Any) -> str:
    s = result.summary()
    n = sum(s["images"].values())
    cards = [("images", f"{n:,}"), ("classes", str(len(result.classes))),
             ("imbalance", _fmt(result.imbalance())),
             ("test images leaked", f"{s['leaked']['test']} of {s['images']['test']:,}"),
             ("exact duplicate pairs", str(s["findings"]["exact_duplicate"])),
             ("near duplicate pairs", str(s["findings"]["near_duplicate"])),
             ("likely label errors", str(s["findings"]["label_issue"])),
             ("undecodable files", str(s["findings"]["undecodable"]))]
    refused = {f.label for kind in FOLDER_KINDS for f in result.of_kind(kind)}
    if refused:
        cards.insert(2, ("classes train refuses", str(len(refused))))
    if s["findings"]["small_image"]:
        cards.append(("small images", str(s["findings"]["small_image"])))
    return '<div class="cards">' + "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}'
                                           f'</div></div>' for k, v in cards) + "</div>"


def _classes_section(result: Any) -> str:
    counts = result.counts()
    splits = list(counts)
    head = "".join(f'<th class="n">{_e(s)}</th>' for s in splits)
    total = {c: sum(counts[s][c] for s in splits) for c in result.classes}
    top = max(total.values()) or 1
    body = "".join(f"<tr><td>{_e(c)}</td>" + "".join(f'<td class="n">{counts[s][c]:,}</td>' for s in splits)
                   + f'<td class="n">{total[c]:,}</td><td><span class="bar" style="width:{120 * total[c] / top:.0f}px">'
                   f'</span></td></tr>' for c in sorted(result.classes, key=lambda c: (total[c], c)))
    imb = " \u00b7 ".join(f"{s} {_fmt(result.imbalance(s))}" for s in splits)
    table = (f'<table id="class-counts"><tr><th>class</th>{head}<th class="n">all</th><th></th></tr>{body}</table>')
    if len(result.classes) > 20:
        table = f'<div class="scroll">{table}</div>'
    return (f'<section id="classes"><h2>classes, smallest first</h2><p class="note">imbalance (largest class / '
            f'smallest): all {_fmt(result.imbalance())} \u00b7 {imb}</p>{table}</section>')


def sizes_figure(sizes: Sequence[tuple[int, int]]):
    """Histograms of the shorter side and of the aspect ratio (width / height) of the decoded images."""
    from matplotlib.figure import Figure

    w, h = np.array(sizes, dtype=float).T
    fig = Figure(figsize=(9, 2.8), layout="constrained")
    a, b = fig.subplots(1, 2)
    a.hist(np.minimum(w, h), bins=40, color="#1f77b4")
    a.set_xlabel("shorter side (px)")
    a.set_ylabel("images")
    b.hist(w / h, bins=40, color="#ff7f0e")
    b.set_xlabel("aspect ratio (width / height)")
    return fig


def _sizes_section(result: Any) -> str:
    if not result.sizes:
        return ""
    uri = _png_uri(figure_png(sizes_figure(result.sizes), dpi=90))
    return (f'<section id="sizes"><h2>image sizes</h2><img class="wide" id="sizes-img" alt="histograms of the '
            f'shorter side and of the aspect ratio" src="{uri}"></section>')


def _settings_section(result: Any) -> str:
    rows = {**{k: v for k, v in result.settings.items() if v not in ("", None)},
            "near-duplicate threshold": f"cosine similarity of the centred features >= {result.threshold:g}, or "
                                        f"perceptual hashes <= {result.settings.get('hash_bits')} bits apart",
            "time": ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())}
    body = "".join(f"<tr><th>{_e(k.replace('_', ' '))}</th><td>{_e(v)}</td></tr>" for k, v in rows.items())
    return f'<section id="settings"><h2>settings</h2><table class="kv">{body}</table></section>'


def _table_section(sid: str, title: str, note: str, found: Sequence[Any]) -> str:
    """A section listing findings without a picture (a file that cannot be decoded, a class folder): where, and
    why. Said as "none." when nothing was found."""
    if not found:
        return f'<section id="{sid}"><h2>{_e(title)}</h2><p class="note">none.</p></section>'
    body = "".join(f'<tr><td class="path">{_e(f.path)}</td><td>{_e(f.label)}</td><td>{_e(f.split)}</td>'
                   f'<td>{_e(f.detail)}</td></tr>' for f in found)
    return (f'<section id="{sid}"><h2>{_e(title)} ({len(found)})</h2><p class="note">{_e(note)}</p>'
            f'<table id="{sid}-files"><tr><th>path</th><th>class</th><th>split</th><th>reason</th></tr>{body}'
            f'</table></section>')


def render_audit_html(result: Any, limit: int = 200) -> str:
    pairs = result.of_kind("exact_duplicate") + result.of_kind("near_duplicate")
    leaks = [f for f in pairs if f.leak]
    within = [f for f in pairs if not f.leak]
    body = [
        f'<header><h1>audit of {_e(Path(result.root).name)}</h1><div class="sub">{_e(result.root)} \u00b7 '
        f'{_e(result.settings.get("backbone", ""))} \u00b7 spinal-transfer {_e(__version__)}</div></header>',
        _cards(result),
        _grid_section("leakage", "leakage: the same image in two splits",
                      "left: the image in the earlier split; right: its copy in the later one (the one whose score "
                      "is inflated). Exact copies score 1.", leaks, limit),
        _grid_section("duplicates", "duplicates within a split",
                      f"exact copies (score 1) and near duplicates (centred cosine \u2265 {result.threshold:g}, or "
                      f"perceptual hashes \u2264 {result.settings.get('hash_bits')} bits apart).", within,
                      limit),
        _grid_section("label-issues", "likely label errors",
                      "score: 1 \u2212 the out-of-fold probability of the given label; suggested: the class the "
                      "out-of-fold model prefers.", result.of_kind("label_issue"), limit),
        _grid_section("outliers", "outliers: the least typical images",
                      "score: 1 \u2212 cleanlab's out-of-distribution score (distance to the nearest neighbours in "
                      "feature space).", result.of_kind("outlier"), limit),
        _grid_section("small-images", "small images",
                      f"a shorter side at most 1/{result.settings.get('small_factor')} of the folder's median: train "
                      f"upscales them to the model's input. score: the median over the image's shorter side.",
                      result.of_kind("small_image"), limit),
        _table_section("undecodable", "undecodable files", "files train skips, with the reason.",
                       result.of_kind("undecodable")),
        _table_section("class-folders", "class folders train refuses",
                       "train stops on these: a class folder without a usable image, or a class that one split has "
                       "and another lacks.", [f for kind in FOLDER_KINDS for f in result.of_kind(kind)]),
        _classes_section(result),
        _sizes_section(result),
        _settings_section(result),
    ]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{html_generator()}'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>audit of {_e(Path(result.root).name)} \u2013 spinal-transfer</title>'
            f'<style>{_CSS}{_MORE_CSS}</style></head><body><main>{"".join(body)}</main></body></html>\n')


def write_audit_html(result: Any, out: Path, limit: int = 200) -> Path:
    atomic_write_text(out, render_audit_html(result, limit))
    return Path(out)
