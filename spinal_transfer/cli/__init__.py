"""`spinal-transfer` command line: a thin shell over the library.

Each command lives in its own module here with `EXAMPLES`, `add_args(parser)` and `main(args)`; only the
module of the command being run is imported (it may import torch), so `import spinal_transfer.cli` and
`spinal-transfer --help` import neither torch nor timm. `main` is the one place that turns a `UserError`
into one line on stderr and its exit code (`spinal_transfer.errors`), with no traceback.
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

from .. import __version__
from ..config import attach_switch_values
from ..errors import EXIT_ABORTED, EXIT_BUG, ConfigError, ResourceError, UserError, use_cli_option_names
from ..utils.stamp import is_ours

# command -> (its module in this package, its one-line help)
COMMANDS = {
    "train": ("train", "fine-tune a backbone with a new head on an image folder"),
    "show-batch": ("show_batch", "draw one augmented training batch as `train` would build it, without training"),
    "lr-find": ("lr_find", "learning-rate range test: sweep the lr, plot the loss, suggest a learning rate"),
    "evaluate": ("evaluate", "metrics of a trained run (best.pt) or checkpoint on one split"),
    "models": ("models", "list the backbones build_model can use"),
    "describe": ("describe", "feature width, head sizes and MACs of a backbone with a new head"),
    "prepare": ("prepare", "write a dataset (a paper dataset, or the bundled digits / photos) as "
                           "ROOT/<name>/{train,val,test}/<class>/ image folders"),
    "reproduce": ("reproduce", "run the paper recipes (default and spinal head) over seeds; compare with the paper "
                               "and test the gap"),
    "compare": ("compare", "train several heads over seeds on one split of your folder; test each against the first"),
    "tune": ("tune", "search the head's kind and shape and lr, weight decay, label smoothing, epochs with Optuna"),
    "export": ("export", "write a trained model as a bundle (safetensors + config.json + model card), optionally "
                         "also as torch.export, TorchScript and ONNX"),
    "predict": ("predict", "top-k classes of images with a bundle, its ONNX file, a run or a checkpoint"),
    "convert-weights": ("convert_weights", "another implementation's state dict of the same architecture as a file "
                                           "--weights loads (tensors paired by order and shape)"),
    "serve": ("serve", "serve a bundle or run over HTTP: POST /predict with dynamic batching, /healthz, /metadata, "
                       "/metrics and a page to try it"),
    "audit": ("audit", "is my folder sound? exact and near duplicates, train/test leakage, likely label errors, "
                       "outliers, class counts and image sizes"),
    "report": ("report", "write a finished run's report.html again (another split, a screenshot)"),
}


class Parser(argparse.ArgumentParser):
    """argparse, with its refusals (a bad value, an unknown flag, a missing argument) as one line like every other
    user mistake (ConfigError: `error: ...`, exit 2), not the command's whole usage (70 lines for compare) above it.
    Subcommand parsers are of the same class (argparse makes them so). `help_prog`: whose --help the line names
    (the top parser refuses unknown flags of a command: that command's)."""

    help_prog: Optional[str] = None

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (`{self.help_prog or self.prog} --help` lists the options)")


def refuse_paths_read_as_options(words: list[str]) -> None:
    """A file named like an option (`-odd.png`) is read as one: `-o dd.png`, --out dd.png, with the path lost
    (a missing-PATH error, or worse a run that quietly writes elsewhere). A word before `--` that starts with `-`
    and names an existing file is refused in one line saying how to pass it."""
    for word in words:
        if word == "--":
            return
        if word.startswith("-") and len(word) > 1 and Path(word).exists():
            raise ConfigError(f"{word} is a file here, but a word that starts with - reads as an option: write "
                              f"./{word}, or put -- before the paths")


def command_parser(sub, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog="examples:\n" + examples,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def number(s: str, kind: type = int) -> Any:
    """`s` as an int (or float): argparse's own message for a ValueError names the type function ("invalid
    positive_int value"), which means nothing to a user."""
    try:
        return kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {s!r}") from None


def positive_int(s: str) -> int:
    """argparse type of a count: an integer >= 1."""
    v = number(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s}")
    return v


def seed(s: str) -> int:
    """argparse type of a random seed: 0 to 2**32 - 1 (numpy's and Optuna's range)."""
    v = number(s)
    if not 0 <= v < 2**32:
        raise argparse.ArgumentTypeError(f"a seed is 0 to 4294967295, got {s}")
    return v


def port(s: str) -> int:
    """argparse type of a TCP port: 0 (any free one) to 65535."""
    v = number(s)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {s}")
    return v


def finite(s: str) -> float:
    """argparse type of a bound: a finite number (nan and inf would make every comparison fail or pass)."""
    v = number(s, float)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s}")
    return v


def finite_nonnegative(s: str) -> float:
    """argparse type of a tolerance: a finite number >= 0."""
    v = finite(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s}")
    return v


def output_file(path: str, suffixes: tuple[str, ...], option: str = "--out") -> bool:
    """Before the work: `path` may be written by a command that writes `suffixes` files (True: a file is there
    and will be replaced, which the command says). ConfigError for a folder, for a file of another kind (an
    image among the inputs, a notes.txt: it is never replaced) and for a name of another kind (PNG bytes under
    a .jpg name); ResourceError (exit 4, as every write the system refuses) for a folder that is not writable."""
    p = Path(path)
    kinds = " or ".join(suffixes)
    if p.is_dir():
        raise ConfigError(f"{option} {p} is a folder; give a {kinds} file to write")
    if p.exists() and (p.suffix.lower() not in suffixes or not is_ours(p)):
        raise ConfigError(f"{option} {p} exists and is not a {kinds} file this command wrote; it is not replaced: "
                          f"give another name")
    folder = next(a for a in p.absolute().parents if a.exists())     # what the write will create its path in
    if not folder.is_dir():
        raise ConfigError(f"{option} {p}: cannot write there ({folder} is a file, not a folder); give another path")
    if not os.access(folder, os.W_OK | os.X_OK):                      # a read-only mount: the system's refusal (4)
        raise ResourceError(f"{option} {p}: cannot write there ({folder} is not writable); give another path")
    if p.suffix.lower() not in suffixes:       # a viewer trusts the name: PNG bytes in a .jpg open wrong or not
        raise ConfigError(f"{option} {p}: this command writes a {suffixes[0][1:].upper()} file; give a name "
                          f"ending in {kinds}")
    return p.exists()


def replacing(replaced: bool) -> str:
    """What a command adds to its "wrote" line when `output_file` found an earlier file there: said, never silent."""
    return " (replacing the file that was there)" if replaced else ""


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser. The options of command `only` are loaded (its module imported); with None, every command's."""
    p = Parser(prog="spinal-transfer", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run `spinal-transfer COMMAND --help` for a command's options and examples.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_)
            continue
        mod = importlib.import_module(f".{module}", __package__)
        sp = command_parser(sub, name, help_, mod.EXAMPLES)
        mod.add_args(sp)
        sp.set_defaults(func=mod.main)
    p.help_prog = f"{p.prog} {only}" if only in COMMANDS else None
    return p


def _say(message: str) -> None:
    """One line on stderr, from one process (under torchrun every rank raises the same error)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    try:                             # building the parser imports the command's module (torch): Ctrl-C may come
        refuse_paths_read_as_options(argv)
        args = build_parser(only=command).parse_args(attach_switch_values(argv))
        func: Callable[[argparse.Namespace], int] = args.func
        use_cli_option_names()       # messages name options as typed here: --weights, not weights=
        return func(args)
    except UserError as e:
        _say(f"{e.prefix}: {e}")
        return e.exit_code
    except BrokenPipeError:        # output piped into `head` & co.: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BUG
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_ABORTED
    finally:
        use_cli_option_names(False)


def _interrupted_late(signum: int, frame: object) -> None:
    """Ctrl-C once the command has ended (atexit callbacks): exit 130 at once and quietly, not with a traceback
    from whichever library callback it interrupts."""
    print("interrupted", file=sys.stderr)
    exit_process(EXIT_ABORTED, finish=False)


def exit_process(code: int, finish: bool = True) -> NoReturn:
    """End the process as the interpreter would (non-daemon threads joined, atexit callbacks run, streams
    flushed), then at once. The interpreter's own teardown after that first puts Ctrl-C back to the default
    action, so a Ctrl-C in it killed the process silently (status -SIGINT, not 130); the teardown only frees
    memory, so it is skipped."""
    if finish:
        signal.signal(signal.SIGINT, _interrupted_late)
        threading._shutdown()                                  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):                           # a closed pipe or stream: nothing left to say
            pass
    os._exit(code)


def entry() -> NoReturn:
    """The `spinal-transfer` program: `main`, then `exit_process` with its code."""
    exit_process(main())


if __name__ == "__main__":
    entry()
