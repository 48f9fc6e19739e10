"""The file lock: a second process waits while the first holds it, and gets it once the holder dies."""
from __future__ import annotations

import subprocess
import sys

from spinal_transfer.utils.filelock import exclusive

HOLD = """
import sys, time
from spinal_transfer.utils.filelock import exclusive
with exclusive(__import__('pathlib').Path(sys.argv[1])):
    print('held', flush=True)
    time.sleep(float(sys.argv[2]))
    open(sys.argv[3], 'w').close()          # the last thing done while holding the lock
"""


def _holder(lock, seconds: float) -> subprocess.Popen:
    done = lock.with_suffix(".done")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(seconds), str(done)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_second_holder_waits_until_the_first_releases(tmp_path):
    lock = tmp_path / "cache.lock"
    proc = _holder(lock, 1.0)
    with exclusive(lock):                    # waits for the holder's sleep to end
        assert lock.with_suffix(".done").exists()      # the holder finished its work before we got the lock
    proc.wait()


def test_a_killed_holder_never_leaves_the_lock_stuck(tmp_path):
    lock = tmp_path / "cache.lock"
    proc = _holder(lock, 600.0)
    proc.kill()
    proc.wait()
    with exclusive(lock):
        pass
    with exclusive(lock):                    # and it can be taken again after being released
        assert lock.is_file()
