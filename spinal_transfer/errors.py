"""The errors a user can act on, each with the exit code the command line ends with.

Every module raises one of these for a problem that is not a bug in this package: a bad flag, file,
folder or checkpoint, a run folder in use, a diverged run, a full disk, an interruption. Only
`cli.main` catches them: it prints `error: <message>` (one line, no traceback) and exits with the
error's code. Anything else is a bug and keeps its traceback.

Exit codes (README, "Exit codes"):

| code | meaning |
|---|---|
| 0 | success |
| 1 | an unexpected error (a bug: the traceback is printed) |
| 2 | a user mistake: bad flag, config, data folder, file or checkpoint; a run folder in use |
| 3 | training stopped: the loss became NaN/inf (the last good checkpoint is kept) |
| 4 | the system refused: disk full, no permission, read-only folder, out of memory |
| 75 | interrupted by a signal after saving a checkpoint: resumable (`train --resume RUN`) |
| 130 | a second Ctrl-C: stopped at once |
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional, Sequence

EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_DIVERGED, EXIT_SYSTEM, EXIT_INTERRUPTED, EXIT_ABORTED = 0, 1, 2, 3, 4, 75, 130
_driver: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("driver", default=None)   # rerun_resumes'


class UserError(Exception):
    """A problem the user can fix or act on; the message says what and what to do. `key` names the config
    option at fault, when there is one (recipes add its file and line)."""

    exit_code = EXIT_USER
    prefix = "error"           # how cli.main introduces the message

    def __init__(self, message: str = "", key: Optional[str] = None):
        super().__init__(message)
        self.key = key


class ConfigError(UserError, ValueError):
    """A recipe or flag has a bad key, type or value."""


class DataError(UserError, ValueError):
    """A problem with the user's data folder."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, empty, truncated, corrupted, foreign or of another kind."""


class UnsafeCheckpointError(CheckpointError):
    """The file needs arbitrary unpickling (which could run code); we never do that."""


class PrepareError(DataError):
    """`prepare` cannot build a dataset folder: a source file is missing or wrong, or the output holds other files;
    the message says what to fetch or remove."""


class RunFolderError(UserError):
    """The run folder holds another run, is in use by another process, or cannot be resumed."""


class WeightsUnavailable(UserError, RuntimeError):
    """Pretrained weights are neither cached nor downloadable."""


class MissingDependency(UserError, RuntimeError):
    """An optional dependency is not installed."""


class NonFiniteLoss(UserError, RuntimeError):
    """The loss became NaN or inf; the run stops and keeps its last good checkpoint."""

    exit_code = EXIT_DIVERGED


class ResourceError(UserError, OSError):
    """The system refused: no space, no permission, read-only file system, out of memory."""

    exit_code = EXIT_SYSTEM


class Interrupted(UserError):
    """A signal asked the run to stop; a checkpoint was written and the run can be resumed. `in_flight`: False
    for a command stopped between its runs, where no run kept a last.pt just then (rerun_resumes words it)."""

    exit_code = EXIT_INTERRUPTED
    prefix = "stopped"

    def __init__(self, message: str = "", in_flight: bool = True):
        super().__init__(message)
        self.in_flight = in_flight


@contextlib.contextmanager
def rerun_resumes(command: str) -> Iterator[None]:
    """In a command that drives many runs (compare, reproduce, tune) the run a signal stopped is continued by
    the same command run again, not by `train --resume` (which would leave the command's tables behind): its
    Interrupted says so, and so does the line a run logs when the signal arrives (`resume_advice`)."""
    token = _driver.set(command)
    try:
        yield
    except Interrupted as e:
        kept = "the run in flight kept its last.pt, and " if e.in_flight else ""
        raise Interrupted(f"{str(e).split(';')[0]}; {kept}the same {command} command resumes it and goes on") \
            from None
    finally:
        _driver.reset(token)


def resume_advice() -> str:
    """How the run in flight is continued after a signal stops it: `train --resume` for a run of its own, the same
    command again inside compare, reproduce or tune (`rerun_resumes`), which would otherwise run it outside
    their study or tables."""
    command = _driver.get()
    return "resume with `spinal-transfer train --resume RUN`" if command is None else \
        f"the same {command} command, run again, resumes it"


def first_line(exc: BaseException, limit: Optional[int] = 200) -> str:
    """The first line of an exception's message (at most `limit` characters; '' when it has none): what a one-line
    error quotes of a library's multi-line one."""
    line = (str(exc).strip().splitlines() or [""])[0]
    return line if limit is None else line[:limit]


def few(names: Sequence[str], limit: int = 10) -> str:
    """The first `limit` names, comma-separated, with " ..." when there are more: a message stays one line."""
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


# How messages name options: `weights=` for Python callers; the CLI switches to `--weights `.
_option_style = "python"


def use_cli_option_names(enabled: bool = True) -> None:
    """Make error messages name options as the command line spells them (`--weights PATH`);
    the CLI calls this once at start-up."""
    global _option_style
    _option_style = "cli" if enabled else "python"


def option_name(name: str, style: Optional[str] = None) -> str:
    """How a message should name the keyword `name` for the reader: `name=` (Python) or `--name `
    (CLI, underscores as dashes); style defaults to what use_cli_option_names set."""
    return f"--{name.replace('_', '-')} " if (style or _option_style) == "cli" else f"{name}="


def option_value(name: str, value: object, style: Optional[str] = None) -> str:
    """An option given a value, as the reader would write it: `device='gpu'` (Python) or `--device gpu` (CLI)."""
    return f"{option_name(name, style)}{value}" if (style or _option_style) == "cli" else f"{name}={value!r}"


def flag_name(name: str, style: Optional[str] = None) -> str:
    """A boolean switch as the reader would turn it on: `name=True` (Python) or `--name` (CLI)."""
    return option_name(name, style).strip() if (style or _option_style) == "cli" else f"{name}=True"
