"""report.html and the error analysis behind it: top losses and most-confused pairs checked against a
computation written here from test_predictions.csv, the page's self-containment checked in its HTML
and in a real headless Chromium (loads with no failed or outside request, every image decodes, the
screenshot is not blank, the top-losses grid shows the highest-loss images of the CSV)."""
from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import chromium_or_skip
from PIL import Image
from report_run import make_run_folder

from spinal_transfer.cli import main as cli
from spinal_transfer.data.skiplog import SkipLog
from spinal_transfer.evaluation.browser import render
from spinal_transfer.evaluation.interpret import (
    most_confused,
    most_confused_from_matrix,
    prediction_header,
    read_predictions,
    top_losses,
    write_predictions_csv,
)
from spinal_transfer.evaluation.report_page import write_evaluation_html, write_report_html

TOP_N = 16


@pytest.fixture(scope="module")
def run_dir(digits_folder, tmp_path_factory) -> Path:
    return make_run_folder(tmp_path_factory.mktemp("runs") / "digits-spinal", digits_folder)


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def expected_top_losses(path: Path, n: int) -> list[tuple[str, float]]:
    """Written independently of interpret.py: wrong rows, highest loss first, ties by path."""
    wrong = [(r["path"], float(r["loss"])) for r in csv_rows(path) if r["target"] != r["prediction"]]
    return sorted(wrong, key=lambda t: (-t[1], t[0]))[:n]


class _Page(HTMLParser):
    """Collects what the self-containment and content checks need from report.html."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []      # (tag, attribute, value)
        self.tags: Counter = Counter()
        self.ids: set[str] = set()
        self.top_losses: list[tuple[str, float]] = []
        self.csp = ""
        self.table: list[list[str]] = []
        self._table_id = ""
        self._cell: list[str] | None = None
        self.per_class: list[list[str]] = []
        self.pairs: list[list[str]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] += 1
        if "id" in a:
            self.ids.add(a["id"])
        for k in ("src", "href", "srcset", "poster", "data", "action"):
            if k in a:
                self.urls.append((tag, k, a[k]))
        if "style" in a and "url(" in a["style"]:
            self.urls.append((tag, "style", a["style"]))
        if tag == "meta" and a.get("http-equiv", "").lower() == "content-security-policy":
            self.csp = a["content"]
        if tag == "figure" and "data-path" in a:
            self.top_losses.append((a["data-path"], float(a["data-loss"])))
        if tag == "table" and a.get("id") in ("per-class", "confused-pairs"):
            self._table_id = a["id"]
        if tag == "tr" and self._table_id:
            (self.per_class if self._table_id == "per-class" else self.pairs).append([])
        if tag == "td" and self._table_id:
            self._cell = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            (self.per_class if self._table_id == "per-class" else self.pairs)[-1].append("".join(self._cell).strip())
            self._cell = None
        if tag == "table":
            self._table_id = ""


def parse(html: str) -> _Page:
    p = _Page()
    p.feed(html)
    return p


# ------------------------------------------------------------------------------------------------
# The analysis helpers against an independent computation

def test_top_losses_match_csv(run_dir):
    path = run_dir / "test_predictions.csv"
    want = expected_top_losses(path, TOP_N)
    assert len(want) == TOP_N, "the fixture run must make at least TOP_N mistakes for this test to mean anything"
    got = top_losses(read_predictions(path), TOP_N)
    assert [(p.path, p.loss) for p in got] == want
    assert all(not p.correct for p in got)
    # "Most confidently wrong": the losses are -log p(true), so the first has the smallest p(true).
    assert got[0].target_prob == min(float(r["target_prob"]) for r in csv_rows(path) if r["target"] != r["prediction"])
    # Right answers with a large loss are not in the wrong-only list but are in the unfiltered one.
    everything = top_losses(read_predictions(path), 10_000, wrong_only=False)
    assert len(everything) == len(csv_rows(path))


def test_most_confused_match_csv_and_confusion_matrix(run_dir):
    rows = csv_rows(run_dir / "test_predictions.csv")
    totals = Counter(r["target_name"] for r in rows)
    pairs = Counter((r["target_name"], r["prediction_name"]) for r in rows if r["target_name"] != r["prediction_name"])
    want = sorted(((t, p, c, totals[t]) for (t, p), c in pairs.items()),
                  key=lambda x: (-x[2], -x[2] / x[3], x[0], x[1]))
    got = most_confused(read_predictions(run_dir / "test_predictions.csv"))
    assert [(g.true_name, g.predicted_name, g.count, g.true_total) for g in got] == want
    assert got[0].count >= 2, "the fixture should have a pair confused more than once"
    # The same table from report.json's confusion matrix (computed by sklearn from the logits).
    report = json.loads((run_dir / "report.json").read_text())
    from_cm = most_confused_from_matrix(report["test"]["confusion_matrix"], report["classes"])
    assert [(g.true_name, g.predicted_name, g.count) for g in from_cm] == [w[:3] for w in want]
    assert most_confused(read_predictions(run_dir / "test_predictions.csv"), limit=3) == got[:3]


def test_predictions_csv_format_against_numpy(tmp_path):
    """The writer the training loop can use: softmax probabilities, loss = -log p(target), top-k sorted,
    K = min(5, classes), a huge logit gap gives its real loss instead of inf."""
    classes = ["cat", "dog", "fox"]
    logits = torch.tensor([[2.0, 1.0, 0.1], [0.0, 0.0, 0.0], [1000.0, 0.0, -5.0], [0.3, 2.5, 2.4]])
    targets = torch.tensor([0, 2, 1, 2])
    out = write_predictions_csv(tmp_path / "p.csv", ["a.png", "b.png", "c.png", "d.png"], logits, targets, classes)
    rows = csv_rows(out)
    with open(out, newline="") as f:
        header = next(csv.reader(f))
    assert header == prediction_header(3) and header[-2:] == ["top3_name", "top3_prob"] and "top4_name" not in header
    z = logits.double().numpy()
    logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    for i, r in enumerate(rows):
        t = int(targets[i])
        assert r["target_name"] == classes[t]
        assert float(r["loss"]) == pytest.approx(-logp[i, t], rel=1e-12)
        assert float(r["target_prob"]) == pytest.approx(math.exp(logp[i, t]), rel=1e-12, abs=1e-300)
        probs = [float(r[f"top{k}_prob"]) for k in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0)
        assert r["top1_name"] == r["prediction_name"] == classes[int(np.argmax(z[i]))]
    assert float(rows[2]["loss"]) == pytest.approx(1000.0)        # not inf
    assert rows[1]["prediction_name"] == "cat"                    # ties: the lowest index, as argmax


# ------------------------------------------------------------------------------------------------
# The page's content, from its HTML

def test_report_html_is_self_contained_and_complete(run_dir):
    page = write_report_html(run_dir)
    assert page == run_dir / "report.html"
    html = page.read_text()
    p = parse(html)
    assert p.csp.startswith("default-src 'none'")
    assert p.tags["script"] == 0 and p.tags["link"] == 0 and p.tags["iframe"] == 0
    assert p.urls and all(v.startswith("data:image/") for tag, k, v in p.urls if k == "src"), p.urls[:3]
    assert all(k == "src" for _, k, _ in p.urls)                      # no links, no CSS url()
    assert not re.search(r"https?://", html)
    assert {"metrics", "settings", "curves", "confusion", "calibration", "classes", "top-losses", "batch",
            "skipped"} <= p.ids
    assert p.tags["img"] == 4 + TOP_N                     # curves, matrix, reliability diagram, batch, the grid
    assert p.top_losses == expected_top_losses(run_dir / "test_predictions.csv", TOP_N)
    # per-class table: worst F1 first, every class once
    report = json.loads((run_dir / "report.json").read_text())
    names = [r[0] for r in p.per_class if r]
    f1 = {c: m["f1"] for c, m in report["test"]["per_class"].items()}
    assert sorted(names) == sorted(report["classes"])
    assert [f1[n] for n in names] == sorted(f1.values())
    # the settings that matter and the skipped files
    for text in ("timm/test_resnet", "spinal", "2 stages: 2 epochs at 0.05, 1 epoch at 0.005",
                 f"{report['best_epoch']} (selected on val loss)", "train 1,078"):
        assert text in html, text
    assert re.search(r"frozen for the first 1 epoch\b", html)         # singular: "1 epochs" is a bug
    assert "; grey band: backbone frozen; dotted line: a new learning-rate stage." in html    # both are drawn
    for path, reason in SkipLog(run_dir / "skipped_files.txt").entries.items():
        assert path in html and reason in html
    assert len(SkipLog(run_dir / "skipped_files.txt").entries.items()) == 2


def _predictions_for(n_classes: int, tmp: Path) -> tuple[dict, Path, list[str]]:
    """Metrics and a CSV for `n_classes` classes from seeded random logits that favour the truth."""
    from spinal_transfer.evaluation.metrics import classification_metrics

    g = torch.Generator().manual_seed(n_classes)
    classes = [f"species <{i:03d}>" for i in range(n_classes)]    # '<' must come out escaped
    y = torch.arange(n_classes).repeat(6)
    logits = torch.randn(len(y), n_classes, generator=g) * 2
    logits[torch.arange(len(y)), y] += 3.0
    paths = [str(tmp / f"missing_{i}.jpg") for i in range(len(y))]     # not on disk: placeholders
    csv_path = write_predictions_csv(tmp / "test_predictions.csv", paths, logits, y, classes)
    return classification_metrics(logits, y, classes), csv_path, classes


@pytest.mark.parametrize("n", [3, 45, 200])
def test_matrix_or_pairs_table_by_class_count(tmp_path, n):
    metrics, csv_path, classes = _predictions_for(n, tmp_path)
    out = write_evaluation_html(tmp_path / "eval" / "report.html", metrics, csv_path, classes,
                                {"backbone": "timm/resnet18"}, rows=None, skipped=[], split="val", title="eval")
    html = out.read_text()
    p = parse(html)
    assert ("confusion-img" in p.ids) == (n <= 30)
    assert "curves" not in p.ids                      # evaluate has no per-epoch rows
    assert "<species" not in html and "species &lt;000&gt;" in html
    want = most_confused(read_predictions(csv_path), limit=10 if n <= 30 else 50)
    got = [r for r in p.pairs if r]
    assert [(r[0], r[1], int(r[2])) for r in got] == [(w.true_name, w.predicted_name, w.count) for w in want]
    # images that cannot be read are listed as such, not drawn as broken images
    assert len(p.top_losses) == min(TOP_N, sum(r["target"] != r["prediction"] for r in csv_rows(csv_path)))
    assert p.tags["img"] == (1 if n <= 30 else 0)
    assert html.count("cannot read the image") == len(p.top_losses)


def test_old_csv_without_probabilities_is_reported_not_ranked(run_dir, tmp_path):
    old = tmp_path / "old.csv"
    rows = csv_rows(run_dir / "test_predictions.csv")
    with open(old, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "target", "prediction"])
        w.writerows([r["path"], r["target"], r["prediction"]] for r in rows)
    report = json.loads((run_dir / "report.json").read_text())
    preds = read_predictions(old, report["classes"])
    assert top_losses(preds) == []
    assert [(c.true_name, c.count) for c in most_confused(preds)] == \
        [(c.true_name, c.count) for c in most_confused(read_predictions(run_dir / "test_predictions.csv"))]
    html = write_evaluation_html(tmp_path / "r.html", report["test"], old, report["classes"], {}).read_text()
    assert "has no probabilities" in html and 'data-path="' not in html


# ------------------------------------------------------------------------------------------------
# In a real browser

_TOP_LOSSES_JS = ("Array.from(document.querySelectorAll('#top-losses-grid figure'))"
                  ".map(f => [f.dataset.path, Number(f.dataset.loss), f.querySelector('img') !== null,"
                  " f.getBoundingClientRect().width])")


def test_report_renders_in_chromium(run_dir):
    exe = chromium_or_skip()
    page = write_report_html(run_dir)
    r = render(page, chromium=exe, evaluate={"top_losses": _TOP_LOSSES_JS,
                                             "title": "document.querySelector('h1').textContent"})
    assert r.failed == [] and r.errors == [] and r.external_requests == []
    assert r.requests[0] == page.resolve().as_uri()
    assert len(r.images) == 4 + TOP_N
    assert all(i["complete"] and i["naturalWidth"] > 0 and i["naturalHeight"] > 0 for i in r.images), r.images
    shot = np.asarray(Image.open(io.BytesIO(r.screenshot)).convert("L"), dtype=np.float64)
    assert shot.shape[1] == 1280 and shot.shape[0] > 2000          # the whole page, not one viewport
    assert shot.std() > 20, "the screenshot is (nearly) blank"
    want = expected_top_losses(run_dir / "test_predictions.csv", TOP_N)
    assert [(p, l) for p, l, _, _ in r.values["top_losses"]] == want
    assert all(has_img and width > 100 for _, _, has_img, width in r.values["top_losses"])
    assert r.values["title"] == run_dir.name


def test_chromium_check_catches_an_outside_request(tmp_path):
    """The browser check itself can fail: a page with an outside image and a broken one is caught."""
    exe = chromium_or_skip()
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><h1>x</h1><img src="http://127.0.0.1:9/x.png">'
                   '<img src="data:image/png;base64,AAAA">')
    r = render(bad, chromium=exe)
    assert r.external_requests == ["http://127.0.0.1:9/x.png"]
    assert r.failed and r.failed[0]["url"] == "http://127.0.0.1:9/x.png"
    assert [i["naturalWidth"] for i in r.images] == [0, 0]


def test_screenshot_command(run_dir, tmp_path, capsys, monkeypatch):
    """`spinal-transfer report RUN --out FILE --screenshot PNG`: the README picture's code path."""
    exe = chromium_or_skip()
    out, png = tmp_path / "r.html", tmp_path / "shot.png"
    monkeypatch.setenv("CHROMIUM", exe)
    assert cli(["report", str(run_dir), "--out", str(out), "--screenshot", str(png), "--max-height", "1600"]) == 0
    assert capsys.readouterr().out.split() == [str(out), str(png)]
    im = Image.open(png)
    assert im.size == (1280, 1600)
    assert np.asarray(im.convert("L"), dtype=np.float64).std() > 20


def test_a_class_the_split_has_no_image_of_is_na_and_listed_last(tmp_path):
    """'ghost' has no test image and is never predicted: nothing of it is measured. 'decoy' has no image but is
    predicted once: its precision (0) and F1 (0) are measured, its recall is not."""
    from spinal_transfer.evaluation.metrics import classification_metrics

    classes = ["cat", "decoy", "dog", "ghost"]
    y = torch.tensor([0, 0, 0, 2, 2, 2])
    pred = torch.tensor([0, 0, 1, 2, 2, 0])
    metrics = classification_metrics(torch.nn.functional.one_hot(pred, 4).float() * 5, y, classes)
    p = parse(write_evaluation_html(tmp_path / "r.html", metrics, None, classes, {}).read_text())
    rows = [r for r in p.per_class if r]
    assert [r[:4] for r in rows] == [["decoy", "0.0%", "n/a", "0.0%"], ["cat", "66.7%", "66.7%", "66.7%"],
                                     ["dog", "100.0%", "66.7%", "80.0%"], ["ghost", "n/a", "n/a", "n/a"]]
