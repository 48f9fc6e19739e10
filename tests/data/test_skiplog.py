"""The skip log: bad files taken out of the batches, listed once with their reason, written and read back."""
from __future__ import annotations

from spinal_transfer.data.skiplog import SkipLog


def _batches():
    yield "x0", "y0", [0, 1], [("a.png", "cannot identify image file")]
    yield "x1", "y1", [2, 3], []
    yield "x2", "y2", [4], [("a.png", "another reason"), ("b.jpg", "truncated\n  JPEG  file")]


def test_watch_yields_the_batches_without_bad_files_and_records_each_once(tmp_path):
    log = SkipLog(tmp_path / "skipped_files.txt")
    assert list(log.watch(_batches())) == [("x0", "y0", [0, 1]), ("x1", "y1", [2, 3]), ("x2", "y2", [4])]
    assert log.entries == {"a.png": "cannot identify image file", "b.jpg": "truncated JPEG file"}
    assert len(log) == 2 and "b.jpg" in log and "c.png" not in log


def test_sync_writes_the_file_that_a_new_log_reads_back(tmp_path):
    path = tmp_path / "skipped_files.txt"
    log = SkipLog(path)
    list(log.watch(_batches()))
    log.sync()                                # one process: gathers only its own entries
    assert path.read_text() == "a.png\tcannot identify image file\nb.jpg\ttruncated JPEG file\n"
    again = SkipLog(path)
    assert again.entries == log.entries
    mtime = path.stat().st_mtime_ns
    again.sync()                              # nothing new: the file is not rewritten
    assert path.stat().st_mtime_ns == mtime


def test_watched_can_be_iterated_twice(tmp_path):
    batches = list(_batches())
    log = SkipLog()
    twice = log.watched(batches)
    assert len(list(twice)) == len(list(twice)) == 3 and len(log) == 2
