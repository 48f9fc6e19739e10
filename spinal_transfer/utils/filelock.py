"""One exclusive lock between processes, for work that two processes must not do at once (computing a
feature-cache entry, rewriting a table of results that several processes fill).

A POSIX lock (fcntl): the kernel drops it when the holder dies, even by kill -9, so a crash never leaves it
stuck; it works on NFS. Waiting is the point (the second process then finds the work done), unlike
`RunDir.lock`, which refuses a run folder in use.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold the lock on `path` (created if missing) for the block; wait while another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
