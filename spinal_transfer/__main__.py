import os
import signal
import sys


def _interrupted_late(signum: int, frame: object) -> None:
    """Ctrl-C once the command has ended (interpreter shutdown, atexit callbacks): exit 130 at once and quietly,
    not with a traceback from whichever library callback it interrupts."""
    print("interrupted", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


try:
    from .cli import main
    code = main()
except KeyboardInterrupt:            # before the command's own handling (importing the CLI)
    print("interrupted", file=sys.stderr)
    code = 130
signal.signal(signal.SIGINT, _interrupted_late)
sys.exit(code)
