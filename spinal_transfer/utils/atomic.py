"""Atomic file writes: a kill at any moment leaves the old file or the new one, never a torn one; a full or
read-only disk is reported in plain words (`system_error`)."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import ResourceError
from .textfiles import encode_text

PathLike = Union[str, Path]


TMP_SUFFIX = ".tmp"


def _umask_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp makes them owner-only)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def system_error(e: OSError, path: Path, needed: Optional[int] = None) -> ResourceError:
    """An OSError from writing `path` in plain words."""
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        need = f" needs about {needed / 2**20:.0f} MB," if needed else ""
        return ResourceError(f"no space left on device: writing {path}{need} {free / 2**20:.0f} MB free there; "
                             f"free some space (or choose another --out) and resume")
    if e.errno in (errno.ENOTDIR, errno.EEXIST):        # a file stands where a folder of the path should be
        return ResourceError(f"cannot write {path}: a file stands where a folder of that path should be; choose "
                             f"another --out")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what = "read-only file system" if e.errno == errno.EROFS else "permission denied"
        return ResourceError(f"{what}: cannot write {path}; choose a writable --out")
    return ResourceError(f"cannot write {path}: {e.strerror or e}")


def write_atomically(path: Path, write: Any, needed: Optional[int] = None) -> None:
    """write(file object) into a temporary file beside `path`, fsync, rename over `path`: a kill at any moment
    leaves the old file or the new one, never a torn one. The temporary file is named `.<name>.<random>.tmp`,
    which `RunDir.remove_stray_temps` recognises after a kill -9."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        usage = shutil.disk_usage(path.parent)
        if needed and usage.total and usage.free < needed * 1.05:     # /proc and the like have no size at all
            raise OSError(errno.ENOSPC, "No space left on device")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as e:
        raise system_error(e, path, needed) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise system_error(e, path, needed) from None
    except RuntimeError as e:       # torch.save reports a failed write as "[enforce fail at inline_container.cc]"
        Path(tmp).unlink(missing_ok=True)
        if "inline_container" in str(e) or "unexpected pos" in str(e) or "file write failed" in str(e):
            raise system_error(OSError(errno.ENOSPC, "No space left on device"), path, needed) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write `text` atomically (`write_atomically`), a file name in it that is not UTF-8 as its own bytes."""
    data = encode_text(text)
    write_atomically(Path(path), lambda f: f.write(data), len(data))


def file_sha256(path: PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MB blocks: what a bundle records of each of its files, and what a
    run records of its starting weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
