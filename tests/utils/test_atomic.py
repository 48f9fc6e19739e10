"""Atomic writes: a write that fails at any point leaves the old file as it was and no temporary file."""
from __future__ import annotations

import errno
import os

import pytest

from spinal_transfer.errors import ResourceError
from spinal_transfer.utils.atomic import atomic_write_text, write_atomically


def test_a_write_that_raises_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_text(path, "old\n")

    def half_then_fail(f):
        f.write(b"new and torn")
        raise KeyboardInterrupt          # a kill in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, half_then_fail)
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_full_disk_is_a_resource_error_in_plain_words_and_the_old_file_stays(tmp_path):
    path = tmp_path / "metrics.csv"
    atomic_write_text(path, "epoch,top1\n")

    def disk_full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ResourceError, match=r"no space left on device: writing .*metrics.csv") as e:
        write_atomically(path, disk_full)
    assert e.value.exit_code == 4
    assert path.read_text() == "epoch,top1\n" and len(list(tmp_path.iterdir())) == 1


def test_new_file_gets_the_umask_mode_and_parents_are_made(tmp_path):
    path = tmp_path / "a" / "b" / "x.txt"
    atomic_write_text(path, "hello")
    mask = os.umask(0)
    os.umask(mask)
    assert path.read_text() == "hello" and (path.stat().st_mode & 0o777) == (0o666 & ~mask)


def test_a_file_in_the_way_of_the_path_is_one_plain_error_not_a_disk_full(tmp_path):
    (tmp_path / "a.png").write_bytes(b"image")
    with pytest.raises(ResourceError, match="a file stands where a folder of that path should be"):
        atomic_write_text(tmp_path / "a.png" / "out.csv", "x")       # mkdir's FileExistsError, in plain words
    assert (tmp_path / "a.png").read_bytes() == b"image"
