"""Counts that agree: report.json, the log, the report page and skipped_files.txt give the same numbers of images
used and skipped per split, and skipped_files.txt is always written."""
from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import TINY, cli_flags, truncated_jpeg

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0"}


def test_a_file_failing_at_decode_is_counted_the_same_everywhere(three_digits, tmp_path):
    data = tmp_path / "digits"
    shutil.copytree(three_digits, data)
    truncated_jpeg(data / "test" / "digit_1" / "broken.jpg")                # passes the header check
    (data / "train" / "digit_0" / "notes.txt").write_text("not an image")    # skipped while scanning
    n_test_files = sum(1 for _ in (data / "test").rglob("*.*"))
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "spinal_transfer", "train",
                          *cli_flags(**{**TINY, "data": data, "out": out, "epochs": 1, "limit_train_batches": 1})],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    listed = (out / "skipped_files.txt").read_text().splitlines()
    assert len(listed) == report["num_skipped_files"] == 2
    assert {ln.split("\t")[0] for ln in listed} == {str(data / "test" / "digit_1" / "broken.jpg"),
                                                   str(data / "train" / "digit_0" / "notes.txt")}
    assert report["num_skipped"] == {"train": 0, "val": 0, "test": 1, "scan": 1}
    assert report["num_images"]["test"] == report["test"]["num_samples"] == n_test_files - 1
    assert report["num_images"]["val"] == report["val"]["num_samples"]
    used = report["num_images"]
    line = (f"images used: train {used['train']}, val {used['val']}, test {used['test']}; skipped (unreadable): "
            f"train 0, val 0, test 1, scan 1; 2 in all, listed in {out / 'skipped_files.txt'}")
    assert line in (out / "train.log").read_text()
    page = html.unescape((out / "report.html").read_text())
    assert f"test {used['test']:,}" in page and "2 (train 0 \u00b7 val 0 \u00b7 test 1 \u00b7 scan 1)" in page


def test_skipped_files_txt_is_written_empty_when_nothing_was_skipped(finished_run):
    assert (finished_run / "skipped_files.txt").read_text() == ""
    report = json.loads((finished_run / "report.json").read_text())
    assert report["num_skipped_files"] == 0 and sum(report["num_skipped"].values()) == 0
