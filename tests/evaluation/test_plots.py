"""The run's figures: what each panel shows (read back from the matplotlib objects), the normalized
matrix at 2 to 200 classes, the top-losses captions, and that no global matplotlib state is touched."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spinal_transfer.evaluation import plots
from spinal_transfer.evaluation.interpret import Prediction


def rows(n: int = 9, train_top1: bool = True, test: bool = False) -> list[dict]:
    out = []
    for e in range(1, n + 1):
        r = {"epoch": e, "stage": 1 if e <= 6 else 2, "lr": 0.1 if e <= 6 else 0.001, "train_loss": 2.0 / e,
             "train_images_per_s": 100.0, "frozen": e <= 2, "seconds": 1.0,
             "val": {"top1": 0.5 + e / 40, "top5": 0.9, "balanced_accuracy": 0.5, "macro_f1": 0.5, "loss": 2.2 / e}}
        if train_top1:
            r["train_top1"] = 0.4 + e / 20
        if test:
            r["test"] = dict(r["val"], top1=0.45 + e / 40)
        out.append(r)
    return out


def visible_ticks(ax) -> list[float]:
    lo, hi = ax.get_xlim()
    return [t for t in ax.get_xticks() if lo <= t <= hi]


def legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


@pytest.mark.parametrize("n", [1, 3, 9, 150])
def test_curves_have_whole_epoch_ticks_and_best_epoch(n):
    best = max(1, n // 2)
    fig = plots.curves_figure(rows(n), best_epoch=best)
    loss, acc, lr = fig.axes[:3]
    for ax in (loss, acc, lr):
        ticks = visible_ticks(ax)
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert ax.get_xlim() == (0.5, n + 0.5)
        assert any(list(line.get_xdata()) == [best, best] for line in ax.get_lines()), "best epoch not marked"
    # train and val on the same axes
    assert [line.get_label() for line in loss.get_lines()][:2] == ["train", "val"]
    assert list(loss.get_lines()[0].get_ydata()) == [r["train_loss"] for r in rows(n)]
    assert list(acc.get_lines()[1].get_ydata()) == [r["val"]["top1"] for r in rows(n)]
    assert f"best epoch ({best})" in legend(loss)
    assert list(lr.get_lines()[0].get_ydata()) == [r["lr"] for r in rows(n)]


def test_train_accuracy_only_when_measured_and_test_when_logged():
    acc = plots.curves_figure(rows(5, train_top1=False), 3).axes[1]
    assert "train" not in legend(acc) and "val" in legend(acc)
    acc = plots.curves_figure(rows(5, train_top1=True, test=True), 3).axes[1]
    assert {"train", "val", "test"} <= set(legend(acc))


def test_lr_panel_goes_log_only_for_a_wide_range():
    assert plots.curves_figure(rows(9), 3).axes[2].get_yscale() == "log"          # 0.1 -> 0.001
    flat = [dict(r, lr=0.01) for r in rows(9)]
    assert plots.curves_figure(flat, 3).axes[2].get_yscale() == "linear"


def test_plot_curves_writes_the_three_files(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(4)) + "\n")
    written = plots.plot_curves(path, tmp_path / "plots", best_epoch=2)
    assert sorted(written) == ["accuracy.png", "curves.png", "loss.png"]
    w, h = Image.open(written["curves.png"]).size
    assert w > 2 * h                      # three panels side by side
    assert plots.plot_curves([], tmp_path / "none") == {}


def test_normalize_confusion_rows_sum_to_one():
    cm = [[8, 2, 0], [0, 0, 0], [1, 1, 2]]
    norm = plots.normalize_confusion(cm)
    assert norm.tolist() == [[0.8, 0.2, 0.0], [0.0, 0.0, 0.0], [0.25, 0.25, 0.5]]


@pytest.mark.parametrize("n", [2, 12, 45, 200])
def test_confusion_matrix_stays_readable(tmp_path, n):
    rng = np.random.default_rng(n)
    cm = rng.integers(0, 3, (n, n)) + 20 * np.eye(n, dtype=int)
    classes = [f"class_{i}" for i in range(n)]
    fig = plots.confusion_figure(cm, classes)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.get_images()[0].get_array(), plots.normalize_confusion(cm))
    cells = [t for t in ax.texts]
    if n <= plots.MATRIX_NUMBERS_MAX_CLASSES:     # every diagonal and nonzero cell has its percentage
        assert len(cells) == int((plots.normalize_confusion(cm) > 0).sum())
        assert cells[0].get_text() == f"{100 * cm[0, 0] / cm[0].sum():.0f}"
    else:
        assert cells == []
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == (classes if n <= plots.MATRIX_LABELS_MAX_CLASSES else [])
    out = plots.plot_confusion(cm, classes, tmp_path / "cm.png")
    w, h = Image.open(out).size
    assert 300 < w <= 2600 and 300 < h <= 2600


def test_top_losses_grid_captions(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (0, 128, 255)).save(img)
    preds = [Prediction(str(img), 1, 0, "dog", "cat", 0.01, 0.93, 4.6),
             Prediction(str(tmp_path / "gone.jpg"), 0, 2, "cat", "a very long class name indeed", 0.2, 0.5, 1.6)]
    fig = plots.top_losses_figure(preds, ncols=2)
    axes = fig.axes
    assert axes[0].get_title() == "true: dog\npredicted: cat (93.0%)\nloss 4.60"
    assert len(axes[0].get_images()) == 1
    np.testing.assert_array_equal(axes[0].get_images()[0].get_array()[0, 0], [0, 128, 255])
    assert axes[1].get_images() == [] and "cannot read" in axes[1].texts[0].get_text()
    assert axes[1].get_title().splitlines()[1].endswith("(50.0%)")
    assert plots.plot_top_losses(preds, tmp_path / "tl.png").is_file()


def test_no_pyplot_and_no_backend_switch(tmp_path):
    """The CLI imports this module: drawing must not import pyplot or select a backend."""
    code = (
        "import sys, matplotlib\n"
        "from spinal_transfer.evaluation import plots\n"
        f"plots.plot_curves({rows(3)!r}, {str(tmp_path)!r}, best_epoch=2)\n"
        f"plots.plot_confusion([[3, 1], [0, 4]], ['a', 'b'], {str(tmp_path / 'cm.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
        "b = getattr(matplotlib.rcParams, '_get_backend_or_none', lambda: None)()\n"
        "assert b is None, b\n"
    )
    env_root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=env_root,
                       env={"PYTHONPATH": str(env_root), "PATH": "/usr/bin:/bin", "MPLBACKEND": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "cm.png").is_file()
