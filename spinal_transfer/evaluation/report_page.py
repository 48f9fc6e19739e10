"""`report.html`: one self-contained page that shows what a run (or an `evaluate`) did.

One file a person can open from disk or from an e-mail attachment: every image is a base64
`data:` URI, the CSS is inline, there is no JavaScript, and a Content-Security-Policy meta tag
(`default-src 'none'; img-src data:; style-src 'unsafe-inline'`) makes the browser refuse any
request that might slip in later, so the page can never phone home or break when offline.

Contents: the settings that matter, the metrics, loss/accuracy/lr curves with the best epoch, the
normalized confusion matrix (or, past MATRIX_NUMBERS_MAX_CLASSES classes, where a matrix is
unreadable, only the most-confused-pairs table), calibration (temperature, ECE and NLL before and after, the
reliability diagram), per-class precision/recall/F1 worst first, the
augmented batch preview, the top losses (most confidently wrong images, each figure carrying
`data-path`/`data-loss` so a test can check them against the CSV) and the skipped files.

    spinal-transfer report RUN [--split test] [--out FILE] [--screenshot PNG]      (spinal_transfer.cli.report)
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from .. import __version__
from ..config import METRIC_NAMES, TrainConfig
from ..data.skiplog import SkipLog
from ..runs.rundir import RunDir
from ..utils.atomic import atomic_write_text
from ..utils.stamp import html_generator
from .interpret import (
    ConfusedPair,
    Prediction,
    most_confused,
    most_confused_from_matrix,
    read_predictions,
    top_losses,
)
from .plots import MATRIX_NUMBERS_MAX_CLASSES, confusion_figure, curves_figure, figure_png, thumbnail

PathLike = Union[str, Path]
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
WITHOUT_TTA = "without TTA"           # the column of the same split's metrics without test-time augmentation
SUMMARY_ROWS = (("top1", "top-1 accuracy"), ("top5", "top-5 accuracy"), ("balanced_accuracy", "balanced accuracy"),
                ("macro_f1", "macro F1"), ("loss", "loss (cross-entropy)"), ("num_samples", "images"))

_CSS = """
:root{--fg:#1d2430;--muted:#5b6573;--line:#dde2ea;--bg:#f6f7f9;--accent:#1f6feb;--bad:#d1242f;--ok:#1a7f37}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",
 Roboto,"Helvetica Neue",Arial,"DejaVu Sans",sans-serif}
main{max-width:1240px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:0 0 12px}
.sub,.note{color:var(--muted)}.note{font-size:13px;margin:6px 0 0}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:18px 20px;margin:16px 0}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0 0}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px 16px;min-width:150px}
.card .v{font-size:24px;font-weight:600}.card .k{color:var(--muted);font-size:12px;text-transform:uppercase}
table{border-collapse:collapse;width:100%}
th,td{padding:4px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{font-weight:600;background:#fafbfc;position:sticky;top:0}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
table.kv th{width:220px;background:none;position:static}
.scroll{max-height:460px;overflow:auto;border:1px solid var(--line);border-radius:6px}
.bar{display:inline-block;height:8px;background:var(--accent);border-radius:2px;vertical-align:middle}
.wide{max-width:100%;height:auto;display:block}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:14px}
figure.loss{margin:0;border:1px solid var(--line);border-radius:6px;padding:8px;background:#fff}
figure.loss img{width:100%;height:auto;display:block;image-rendering:auto;background:#eee}
figure.loss .missing{height:120px;display:flex;align-items:center;justify-content:center;text-align:center;
 color:var(--bad);font-size:12px;background:#fff3f3}
figcaption{font-size:12px;margin-top:6px;word-break:break-word}
.t{color:var(--ok)}.p{color:var(--bad)}
code,.path{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;font-size:12px}
.path{word-break:break-all}
"""


def _n(count: Any, noun: str) -> str:
    """"1 epoch", "3 epochs"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _png_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "\u2013"
    if pct:
        return f"{100 * float(v):.2f}%"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


# ------------------------------------------------------------------------------------------------
# Reading a run folder

def schedule_words(cfg: Mapping) -> str:
    """How a run trained, in words (epochs and lr per stage, scheduler, what of the backbone was frozen or kept):
    the report page's and the model card's one description of a config."""
    stages = cfg.get("stages") or []
    if stages:
        lr = ", ".join(f"{_n(s['epochs'], 'epoch')} at {s['lr']:g}" for s in stages)
        lr = f"{len(stages)} stages: {lr}"
    else:
        epochs = cfg.get("epochs") or TrainConfig.from_dict(dict(cfg), saved=True).total_epochs()  # or by the data
        lr = f"{_n(epochs, 'epoch')} at lr {cfg.get('lr')}"
    sched = cfg.get("scheduler", "none")
    if sched == "step":
        sched = f"step (every {_n(cfg.get('step_size'), 'epoch')} \u00d7{cfg.get('gamma')})"
    elif sched == "cosine":
        w = cfg.get("warmup_epochs") or 0
        sched = "cosine" + (f", {w:g} warm-up epoch{'' if w == 1 else 's'}" if w else "")
    parts = [lr, f"scheduler {sched}"]
    if cfg.get("backbone_lr_mult", 1.0) != 1.0:
        parts.append(f"backbone lr \u00d7{cfg['backbone_lr_mult']:g}")
    if cfg.get("freeze_backbone"):
        parts.append("backbone frozen throughout" + (" (cached features)" if cfg.get("cache_features") else ""))
    elif cfg.get("freeze_epochs"):
        parts.append(f"backbone frozen for the first {_n(cfg['freeze_epochs'], 'epoch')}")
    if cfg.get("bn_stats") == "frozen" and not cfg.get("freeze_backbone"):
        parts.append("backbone BatchNorm statistics kept as loaded")
    return "; ".join(parts)


def _head(cfg: Mapping, head_info: Optional[Mapping]) -> str:
    kind = cfg.get("head", "?")
    if kind == "spinal":
        desc = (f"spinal, {cfg.get('head_preset')} preset: {cfg.get('num_layers')} layers \u00d7 "
                f"{cfg.get('layer_width')} wide, {cfg.get('num_splits')} splits"
                + (", shared weights" if cfg.get("shared_weights") else ""))
    elif kind == "mlp":
        desc = f"MLP, hidden {cfg.get('mlp_hidden')}"
    else:
        desc = str(kind)
    if cfg.get("head_dropout") is not None:
        desc += f", dropout {cfg['head_dropout']}"
    if head_info:
        fw, hp, dp = head_info.get("feature_width"), head_info.get("head_params"), head_info.get("default_head_params")
        shape = []
        if fw is not None:
            shape.append(f"{fw} features in")
        if hp is not None:
            shape.append(f"{hp:,} parameters" + (f" (backbone's own head: {dp:,})" if dp else ""))
        if head_info.get("head_macs") is not None:
            shape.append(f"{head_info['head_macs']:,} MACs per image")
        if shape:
            desc += " \u2014 " + ", ".join(shape)
    return desc


def _weights(cfg: Mapping, taken: Optional[Mapping]) -> str:
    """The weights option, and for a weights file its digest and what was taken from it (report.json)."""
    if not taken or "sha256" not in taken:
        return str(cfg.get("weights"))
    return (f"{taken['source']} (sha256 {taken['sha256'][:12]}; {taken['backbone_tensors']} backbone tensors, head "
            f"{'restored' if taken['head_restored'] else 'new'})")


def _resumed(resumes: list) -> str:
    """Where the run was resumed and what each resume changed (report.json "resumes"): config.yaml and the
    settings above hold the values in force at the end, not those the earlier epochs trained with."""
    return "; ".join(resume_texts(resumes))


def resume_texts(resumes: list, arrow: str = "\u2192") -> list[str]:
    """Each resume of report.json "resumes" as `after epoch 1 with batch_size 16 -> 8` (`arrow` between the
    values): one wording for the page's settings and the `report` command's lines."""
    return [f"{r.get('at')}" + (" with " + ", ".join(f"{k} {c.get('from')} {arrow} {c.get('to')}"
                                                     for k, c in r["changed"].items())
                                if r.get("changed") else "") for r in resumes]


def run_settings(config: Mapping, report: Optional[Mapping] = None,
                 sizes: Optional[Mapping[str, int]] = None) -> dict[str, str]:
    """The settings a reader needs to interpret the numbers, as {label: text}, in reading order.

    From the resolved config (config.yaml as a dict) and, when given, report.json (head shape,
    best epoch, stop reason, TTA). `evaluate` passes the evaluated run's config and report.
    """
    cfg, rep = dict(config), dict(report or {})
    classes = rep.get("classes")
    out: dict[str, str] = {
        "backbone": str(cfg.get("backbone")),
        "weights": _weights(cfg, rep.get("weights")),
        "head": _head(cfg, rep.get("head")),
        "data folder": str(cfg.get("data")),
    }
    if classes is not None:
        out["classes"] = str(len(classes))
    if sizes:
        out["images"] = " \u00b7 ".join(f"{k} {v:,}" for k, v in sizes.items())
    inp = f"{cfg.get('img_size')} px, {cfg.get('interpolation')} interpolation, eval {cfg.get('eval_resize')}"
    out["input"] = inp
    aug = ("none (cached features: the backbone ran once on each image, unaugmented; --augment "
           f"{cfg.get('augment')} did not apply)" if cfg.get("cache_features") else str(cfg.get("augment")))
    extra = [f"{k.replace('_', ' ')} {cfg[k]}" for k in ("mixup", "cutmix", "label_smoothing") if cfg.get(k)]
    if cfg.get("class_balance", "none") != "none":
        extra.append(f"class balance by {cfg['class_balance']}")
    out["augmentation"] = aug + (f" ({', '.join(extra)})" if extra else "")
    opt = str(cfg.get("optimizer"))
    if opt == "sgd":
        opt += f", momentum {cfg.get('momentum')}"
    opt += f", weight decay {cfg.get('weight_decay')}"
    bs = f"batch {cfg.get('batch_size')}" + (f" \u00d7 {cfg['accum_steps']} accumulation" if cfg.get("accum_steps", 1) > 1 else "")
    out["optimizer"] = f"{opt}; {bs}" + (f"; EMA {cfg['ema_decay']}" if cfg.get("ema_decay") else "")
    out["schedule"] = schedule_words(cfg)
    if "best_epoch" in rep:
        on = rep.get("selected_on", "val")
        by = METRIC_NAMES[rep.get("selected_by", "top1")]
        out["best epoch"] = f"{rep['best_epoch']} (selected on {on} {by}" + (
            ": the paper's protocol, test is not held out)" if on == "test" else ")")
    stopped = rep.get("stopped")
    if stopped:
        out["stopped"] = (f"after epoch {stopped.get('epoch')}: {stopped.get('reason')}"
                          if isinstance(stopped, Mapping) else str(stopped))
    if rep.get("resumes"):
        out["resumed"] = _resumed(rep["resumes"])
    if rep.get("tta"):
        tta = rep["tta"]
        out["test-time augmentation"] = json.dumps(tta) if not isinstance(tta, str) else tta
    if "num_skipped_files" in rep:
        per_split = rep.get("num_skipped") or {}
        out["skipped files"] = str(rep["num_skipped_files"]) + (
            " (" + " \u00b7 ".join(f"{k} {v:,}" for k, v in per_split.items()) + ")" if per_split else "")
    if isinstance(rep.get("calibration"), Mapping):
        out["probabilities"] = _probabilities(rep["calibration"])
    leak = rep.get("leakage")
    if isinstance(leak, Mapping):
        out["leakage"] = (f"{leak.get('test_in_train', 0)} test and {leak.get('val_in_train', 0)} val image(s) are "
                          f"byte-identical copies of train images" + (f"; {leak['test_in_val']} test image(s) of val "
                                                                      f"images" if leak.get("test_in_val") else ""))
    return out


def write_report_html(run_dir: PathLike, out: Optional[PathLike] = None, split: str = "test",
                      top_n: int = 16, report: Optional[Mapping] = None) -> Path:
    """Write RUN/report.html (or `out`) for `split` of a run folder; return its path.

    `report`: the run's report (default: read from report.json; training passes it, because it writes the
    page before report.json, its finished marker). Per-image analysis (top losses, most-confused pairs by name)
    needs the split's predictions CSV; without one the pairs come from the confusion matrix and the grid is
    left out."""
    run = RunDir(run_dir)
    report = dict(report) if report is not None else run.read_report()
    if split not in report:
        raise ValueError(f"{run.report} has no {split!r} metrics (has {[k for k in ('val', 'test') if k in report]})")
    cfg = run.read_config().to_dict() if run.config.is_file() else {}
    classes = report.get("classes") or (run.read_classes() if run.classes.is_file() else [])
    preds = run.predictions if split == "test" else None
    sizes = {k: int(v) for k, v in report.get("num_images", {}).items()}
    others = {k: report[k] for k in ("val", "test") if k != split and isinstance(report.get(k), Mapping)}
    if split == "test" and isinstance(report.get("test_without_tta"), Mapping):     # a run trained with --tta
        others[WITHOUT_TTA] = report["test_without_tta"]
    return write_evaluation_html(
        Path(out) if out is not None else run.report_html, report[split],
        preds if preds is not None and preds.is_file() else None, classes, run_settings(cfg, report, sizes),
        run.read_metrics() or None, SkipLog(run.skipped).entries.items(), split=split,
        title=run.path.resolve().name, batch_preview=run.plot("batch.png"), best_epoch=report.get("best_epoch"),
        other_metrics=others, top_n=top_n, calibration=report.get("calibration"),
        calibration_plot=run.plot("calibration.png"))


def write_evaluation_html(out: PathLike, metrics: Mapping, predictions_csv: Optional[PathLike],
                          classes: Sequence[str], settings: Mapping[str, str], rows: Optional[Sequence[dict]] = None,
                          skipped: Iterable[tuple[str, str]] = (), *, split: str = "test", title: str = "",
                          batch_preview: Optional[PathLike] = None, best_epoch: Optional[int] = None,
                          other_metrics: Optional[Mapping[str, Mapping]] = None, top_n: int = 16,
                          calibration: Optional[Mapping] = None, calibration_plot: Optional[PathLike] = None) -> Path:
    """Write a report page from its pieces; the entry point for `evaluate RUN --split S --out DIR`.

    `metrics`: `classification_metrics(...)` of the split shown; `predictions_csv`: that split's
    per-image CSV (or None); `settings`: `run_settings(...)`; `rows`: metrics.jsonl rows for the
    curves (None: no curves); `other_metrics`: e.g. {"val": ...} shown beside it; `calibration`: report.json's
    calibration entry, with its reliability diagram `calibration_plot` (None: no calibration section).
    """
    page = render_report_html(metrics, predictions_csv, classes, settings, rows, skipped, split=split, title=title,
                              batch_preview=batch_preview, best_epoch=best_epoch, other_metrics=other_metrics,
                              top_n=top_n, calibration=calibration, calibration_plot=calibration_plot)

    atomic_write_text(out, page)
    return Path(out)


# ------------------------------------------------------------------------------------------------
# Sections

def _summary_section(metrics: Mapping, split: str, other: Mapping[str, Mapping]) -> str:
    cards = "".join(f'<div class="card"><div class="k">{_e(label)}</div><div class="v">'
                    f'{_fmt(metrics.get(k), pct=k not in ("loss", "num_samples"))}</div></div>'
                    for k, label in SUMMARY_ROWS if k in metrics)
    table = ""
    if other:
        cols = [split] + list(other)
        head = "".join(f'<th class="n">{_e(c)}</th>' for c in cols)
        body = ""
        for k, label in SUMMARY_ROWS:
            vals = [metrics.get(k)] + [other[c].get(k) for c in other]
            body += f"<tr><td>{_e(label)}</td>" + "".join(
                f'<td class="n">{_fmt(v, pct=k not in ("loss", "num_samples"))}</td>' for v in vals) + "</tr>"
        table = f'<table style="margin-top:14px;max-width:560px"><tr><th>metric</th>{head}</tr>{body}</table>'
    tta = metrics.get("tta")
    said = (f", with test-time augmentation (the mean softmax of {tta.get('views')} views of each image"
            + (f"; column '{WITHOUT_TTA}': the same images without it)" if WITHOUT_TTA in other else ")")
            if isinstance(tta, Mapping) else "")
    return (f'<section id="metrics"><h2>{_e(split)} metrics{_e(said)}</h2><div class="cards">{cards}</div>{table}'
            f'</section>')


def _settings_section(settings: Mapping[str, str]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in settings.items())
    return f'<section id="settings"><h2>settings</h2><table class="kv">{body}</table></section>'


def _curves_section(rows: Sequence[dict], best_epoch: Optional[int]) -> str:
    uri = _png_uri(figure_png(curves_figure(rows, best_epoch), dpi=90))
    return (f'<section id="curves"><h2>training curves</h2><img class="wide" id="curves-img" alt="loss, accuracy '
            f'and learning rate per epoch" src="{uri}"><p class="note">{_n(len(rows), "epoch")}'
            + ("; dashed line: the best epoch" if best_epoch else "")
            + ("; grey band: backbone frozen" if any(r.get("frozen") for r in rows) else "")
            + ("; dotted line: a new learning-rate stage" if len({r.get("stage", 1) for r in rows}) > 1 else "")
            + '.</p></section>')


def _pairs_table(pairs: Sequence[ConfusedPair]) -> str:
    if not pairs:
        return '<p class="note">no mistakes: nothing is confused.</p>'
    body = "".join(f'<tr><td>{_e(p.true_name)}</td><td>{_e(p.predicted_name)}</td><td class="n">{p.count}</td>'
                   f'<td class="n">{p.true_total}</td><td class="n">{100 * p.fraction:.1f}%</td></tr>' for p in pairs)
    table = (f'<table id="confused-pairs"><tr><th>true class</th><th>predicted as</th><th class="n">images</th>'
             f'<th class="n">of</th><th class="n">share</th></tr>{body}</table>')
    return f'<div class="scroll">{table}</div>' if len(pairs) > 15 else table


def _confusion_section(metrics: Mapping, classes: Sequence[str], preds: Optional[list[Prediction]]) -> str:
    n = len(classes)
    cm = metrics.get("confusion_matrix")
    limit = 10 if n <= MATRIX_NUMBERS_MAX_CLASSES else 50
    pairs = (most_confused(preds, limit=limit) if preds is not None
             else most_confused_from_matrix(cm, classes, limit=limit) if cm else [])
    parts = ['<section id="confusion"><h2>confusion</h2>']
    if cm and n <= MATRIX_NUMBERS_MAX_CLASSES:
        uri = _png_uri(figure_png(confusion_figure(cm, classes), dpi=90))
        parts.append(f'<img class="wide" id="confusion-img" style="max-width:{min(900, 260 + 40 * n)}px" '
                     f'alt="confusion matrix normalized per true class" src="{uri}">'
                     '<p class="note">each row is a true class and sums to 100%.</p>'
                     f'<h2 style="margin-top:18px">most confused pairs</h2>')
    else:
        parts.append(f'<p class="note">{n} classes: a matrix would be unreadable, so these are the most frequent '
                     f'mistakes (true class \u2192 predicted class), the {limit} largest first; plots/ has the matrix '
                     'as a heat map.</p>')
    parts.append(_pairs_table(pairs))
    parts.append("</section>")
    return "".join(parts)


def _calibration_section(calibration: Optional[Mapping], plot: Optional[PathLike], tta: bool = False) -> str:
    """Temperature, ECE and NLL before and after on val (where T was fitted) and test, and the reliability
    diagram; or the note saying why the run is not calibrated. `tta`: the page's metrics are with test-time
    augmentation, and these (fitted and measured without it) are said to be not."""
    if not calibration:
        return ""
    head = '<section id="calibration"><h2>calibration</h2>'
    if not calibration.get("temperature"):
        return head + f'<p class="note">{_e(calibration.get("note", "not calibrated"))}</p></section>'
    rows = "".join(
        f'<tr><td>{_e(name)}</td>' + "".join(f'<td class="n">{d[k]:.4f}</td>' for k in
                                            ("ece_before", "ece_after", "nll_before", "nll_after"))
        + f'<td class="n">{d["num_samples"]}</td></tr>'
        for name, d in calibration.items() if isinstance(d, Mapping))
    table = ('<table id="calibration-table" style="max-width:760px"><tr><th>split</th><th class="n">ECE before</th>'
             '<th class="n">ECE after</th><th class="n">NLL before</th><th class="n">NLL after</th>'
             f'<th class="n">images</th></tr>{rows}</table>')
    note = (f'<p class="note">probabilities are softmax(logits / T) with T = {calibration["temperature"]:.3f}'
            + _interval(calibration) + ', fitted on val to minimise its NLL; accuracy is unchanged (with TTA, T '
            'scales the mean softmax of the views). ECE: '
            f'{calibration.get("num_bins", 15)} equal-width confidence bins. The metrics above are of the plain '
            'softmax' + ('; this table is without test-time augmentation, as T was fitted' if tta else '') + '.</p>')
    if calibration.get("warning"):         # T on a bound of its search
        note += f'<p class="note">{_e(calibration["warning"])}</p>'
    img = ""
    if plot is not None and Path(plot).is_file():
        img = (f'<img class="wide" id="calibration-img" style="max-width:900px" alt="reliability diagram before '
               f'and after temperature scaling" src="{_png_uri(Path(plot).read_bytes())}">')
    return head + table + note + img + "</section>"


def _probabilities(cal: Mapping) -> str:
    """The run's temperature, and that this page (as report.json) shows the plain softmax."""
    if not cal.get("temperature"):
        return str(cal.get("note", "plain softmax"))
    return (f"softmax(logits / T), T = {cal['temperature']:.3f}{_interval(cal)} fitted on val, as predict, evaluate "
            f"and the bundle give them; the metrics and per-image probabilities on this page are the plain softmax "
            f"(T = 1), as report.json's")


def _interval(calibration: Mapping) -> str:
    """" (95% interval lo-hi)" of the temperature, or "" for a report written before intervals were recorded."""
    lo_hi = calibration.get("temperature_interval")
    return f" (95% interval {lo_hi[0]:.2f}-{lo_hi[1]:.2f})" if lo_hi else ""


def _per_class_section(metrics: Mapping) -> str:
    per = metrics.get("per_class") or {}
    if not per:
        return ""
    matrix = metrics.get("confusion_matrix") or []
    predicted = {name: sum(row[j] for row in matrix) for j, name in enumerate(per)}     # column sums
    # A class this split has no image of has no recall, and no precision or F1 unless it was predicted: "n/a",
    # listed last, not 0% at the top of "worst F1 first" (macro F1 leaves such a class out too).
    shown = {name: {k: m[k] if m["support"] or (k != "recall" and predicted.get(name, 0)) else None
                    for k in ("precision", "recall", "f1")} for name, m in per.items()}
    items = sorted(per.items(), key=lambda kv: (shown[kv[0]]["f1"] is None, kv[1]["f1"], kv[1]["recall"],
                                                kv[1]["precision"], kv[0]))
    body = "".join(
        f'<tr><td>{_e(name)}</td>' + "".join(
            f'<td class="n">{"n/a" if v is None else f"{100 * v:.1f}%"}</td>' for v in shown[name].values())
        + f'<td><span class="bar" style="width:{100 * (shown[name]["f1"] or 0):.0f}px"></span></td>'
        f'<td class="n">{m["support"]}</td></tr>' for name, m in items)
    table = (f'<table id="per-class"><tr><th>class</th><th class="n">precision</th><th class="n">recall</th>'
             f'<th class="n">F1</th><th></th><th class="n">images</th></tr>{body}</table>')
    if len(items) > 20:
        table = f'<div class="scroll">{table}</div>'
    return f'<section id="classes"><h2>per class, worst F1 first</h2>{table}</section>'


def _thumb_uri(path: str, size: int = 192) -> tuple[Optional[str], str]:
    from PIL import Image

    arr, why = thumbnail(path, size)
    if arr is None:
        return None, why
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    if buf.tell() > 24_000:          # photographs: JPEG is a fifth of the size
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=85)
        return _png_uri(buf.getvalue(), "image/jpeg"), ""
    return _png_uri(buf.getvalue()), ""


def _top_losses_section(preds: Optional[list[Prediction]], n: int, split: str) -> str:
    head = f'<section id="top-losses"><h2>top losses: the most confidently wrong {_e(split)} images</h2>'
    if preds is None:
        return head + f'<p class="note">no {_e(split)}_predictions.csv: no per-image analysis.</p></section>'
    if preds and all(p.loss is None for p in preds):
        return head + ('<p class="note">the predictions CSV has no probabilities (written by an older '
                       'version): rerun evaluate to get them.</p></section>')
    worst = top_losses(preds, n)
    if not worst:
        return head + '<p class="note">no wrong predictions.</p></section>'
    figs = []
    for rank, p in enumerate(worst, 1):
        uri, why = _thumb_uri(p.path)
        pic = (f'<img src="{uri}" alt="{_e(Path(p.path).name)}">' if uri
               else f'<div class="missing">cannot read the image:<br>{_e(why)}</div>')
        pp = f" ({100 * p.prediction_prob:.1f}%)" if p.prediction_prob is not None else ""
        tp = f"p(true) {100 * p.target_prob:.2f}% \u00b7 " if p.target_prob is not None else ""
        figs.append(
            f'<figure class="loss" data-rank="{rank}" data-path="{_e(p.path)}" data-loss="{p.loss!r}">{pic}'
            f'<figcaption>true: <b class="t">{_e(p.target_name)}</b><br>predicted: <b class="p">'
            f'{_e(p.prediction_name)}</b>{pp}<br>{tp}loss {p.loss:.3f}<br>'
            f'<span class="path" title="{_e(p.path)}">{_e(Path(p.path).name)}</span></figcaption></figure>')
    wrong = sum(not p.correct for p in preds)
    note = (f'<p class="note">{len(worst)} of {wrong} wrong predictions among {len(preds)} images, by loss '
            f'= \u2212log p(true class).</p>')
    return head + note + f'<div class="grid" id="top-losses-grid">{"".join(figs)}</div></section>'


def _batch_section(path: Optional[PathLike]) -> str:
    if path is None or not Path(path).is_file():
        return ""
    data = Path(path).read_bytes()
    return (f'<section id="batch"><h2>an augmented training batch</h2><img class="wide" id="batch-img" '
            f'alt="augmented training batch" src="{_png_uri(data)}"></section>')


def _skipped_section(skipped: Sequence[tuple[str, str]], limit: int = 500) -> str:
    if not skipped:
        return '<section id="skipped"><h2>skipped files</h2><p class="note">none: every file was read.</p></section>'
    body = "".join(f'<tr><td class="path">{_e(p)}</td><td>{_e(r)}</td></tr>' for p, r in skipped[:limit])
    more = f'<p class="note">and {len(skipped) - limit} more (see skipped_files.txt).</p>' if len(skipped) > limit else ""
    table = f'<table id="skipped-files"><tr><th>file</th><th>reason</th></tr>{body}</table>'
    if len(skipped) > 12:
        table = f'<div class="scroll">{table}</div>'
    return f'<section id="skipped"><h2>skipped files ({len(skipped)})</h2>{table}{more}</section>'


def render_report_html(metrics: Mapping, predictions_csv: Optional[PathLike], classes: Sequence[str],
                       settings: Mapping[str, str], rows: Optional[Sequence[dict]] = None,
                       skipped: Iterable[tuple[str, str]] = (), *, split: str = "test", title: str = "",
                       batch_preview: Optional[PathLike] = None, best_epoch: Optional[int] = None,
                       other_metrics: Optional[Mapping[str, Mapping]] = None, top_n: int = 16,
                       calibration: Optional[Mapping] = None, calibration_plot: Optional[PathLike] = None) -> str:
    """The page as a string (see `write_evaluation_html` for the arguments)."""
    preds = read_predictions(predictions_csv, classes) if predictions_csv is not None else None
    title = title or "spinal-transfer report"
    body = [
        f'<header><h1>{_e(title)}</h1><div class="sub">{_e(settings.get("backbone", ""))} \u00b7 '
        f'{_e(len(classes))} classes \u00b7 {_e(split)} split \u00b7 spinal-transfer {_e(__version__)}</div></header>',
        _summary_section(metrics, split, dict(other_metrics or {})),
        _settings_section(settings),
        _curves_section(rows, best_epoch) if rows else "",
        _confusion_section(metrics, classes, preds),
        _calibration_section(calibration, calibration_plot, tta=bool(metrics.get("tta"))),
        _per_class_section(metrics),
        _top_losses_section(preds, top_n, split),
        _batch_section(batch_preview),
        _skipped_section(list(skipped)),
    ]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'{html_generator()}<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{_e(title)} \u2013 spinal-transfer report</title><style>{_CSS}</style></head>'
            f'<body><main>{"".join(body)}</main></body></html>\n')
