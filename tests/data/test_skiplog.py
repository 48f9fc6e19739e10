"""The skip log: bad files taken out of the batches, listed once with their reason, written and read back."""
from __future__ import annotations

from spinal_transfer.data.skiplog import SkipLog, skip_lines


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


def test_a_path_with_a_newline_tab_or_backslash_stays_one_line_and_reads_back(tmp_path):
    path = tmp_path / "skipped_files.txt"
    names = ["dir/two\nlines.png", "tab\there.jpg", "back\\slash\\n.png", "cr\r.png", "plain.png"]
    log = SkipLog(path)
    log.add((n, "cannot identify image file") for n in names)
    log.sync()
    lines = path.read_text().splitlines()
    assert len(lines) == len(names) and all(line.count("\t") == 1 for line in lines)
    assert lines[0] == "dir/two\\nlines.png\tcannot identify image file"
    assert SkipLog(path).entries == log.entries


def test_a_list_written_before_the_escapes_keeps_its_backslashes(tmp_path):
    path = tmp_path / "skipped_files.txt"
    path.write_text("C:\\data\\x.png\tbad\n")
    assert SkipLog(path).entries == {"C:\\data\\x.png": "bad"}


def test_moved_to_lists_each_entry_once_under_the_folder_read_now(tmp_path):
    """A run resumed from its data folder's new place (here the second move: the log has the first new place's
    paths) lists each skipped file under the folder it reads now, once, whatever place the log had it at."""
    log = tmp_path / "skipped_files.txt"
    log.write_text(skip_lines([("/b/data/x/cut.jpg", "truncated"), ("/b/data/notes.txt", "not an image")]))
    skips = SkipLog(log)
    files = ["/c/new/x/cut.jpg", "/c/new/x/ok.png", "/c/new/notes.txt"]
    skips.moved_to("/c/new", files)
    skips.add([("/c/new/notes.txt", "not an image"), ("/c/new/x/cut.jpg", "truncated")])
    assert skips.entries == {"/c/new/x/cut.jpg": "truncated", "/c/new/notes.txt": "not an image"}
