"""Stopping safely: signals from a scheduler or a user, and checkpoints inside an epoch.

A run on a shared cluster can be stopped at any moment: SLURM sends SIGUSR1 or SIGTERM ahead of a time
limit or a preemption (`--signal=B:USR1@120`), Kubernetes and spot instances send SIGTERM, a user presses
Ctrl-C. On the first such signal the step in flight finishes, every rank agrees to stop at the same step,
rank 0 writes last.pt with everything needed to continue at the next batch, and the process exits with code
75 ("interrupted, resumable"). A second Ctrl-C stops at once (exit 130).

`--checkpoint-every MINUTES` (or `--checkpoint-every-steps N`) also writes such a mid-epoch last.pt while
training goes on, so a kill -9 (no signal first) loses at most that much work.

A command that drives many runs (compare, reproduce, tune) holds a StopControl of its own for its whole length:
a signal between runs (or between trials) is then recorded instead of killing the process (exit 143), and the
command stops at its next check (`raise_if_stopped`). Controls nest: a run's control takes over a signal its
command already received, and hands its own back when it ends (a signal that arrived while the run wrote its
report is honoured by the command after that run, not forgotten).
"""
from __future__ import annotations

import logging
import signal
import time
from typing import Any, Optional

from ..errors import ConfigError, Interrupted, resume_advice

log = logging.getLogger("spinal_transfer")
SIGNALS = {"TERM": signal.SIGTERM, "USR1": signal.SIGUSR1, "USR2": signal.SIGUSR2, "INT": signal.SIGINT,
           "HUP": signal.SIGHUP}


def parse_signals(text: str) -> list[signal.Signals]:
    """"TERM,USR1,INT" -> the signals (names with or without SIG, any case); "" -> none."""
    out = []
    for name in filter(None, (t.strip().upper().removeprefix("SIG") for t in text.split(","))):
        if name not in SIGNALS:
            raise ConfigError(f"stop_signals: unknown signal {name!r}; choose from {', '.join(SIGNALS)}",
                              key="stop_signals")
        out.append(SIGNALS[name])
    return out


_ACTIVE: list["StopControl"] = []             # the controls whose handlers are in force, outermost first


class StopControl:
    """Signal handlers for the duration of a run, and the per-step decision: go on, write a checkpoint, or
    write one and stop. Every rank takes the same decision (one small all-reduce per optimizer step under
    torchrun; nothing in a single process)."""

    def __init__(self, signals: list[signal.Signals], every_minutes: Optional[float] = None,
                 every_steps: Optional[int] = None):
        self.signals, self.every_minutes, self.every_steps = signals, every_minutes, every_steps
        self.received: Optional[str] = None      # the signal's name, on every rank once they agreed
        self.finishing = False                   # the run tests its best epoch and writes its report: no stop now
        self._previous: dict = {}
        self._signum = 0
        self._last_save = time.monotonic()
        self._parent: Optional["StopControl"] = None

    # --- handlers -------------------------------------------------------------------------------
    def __enter__(self) -> "StopControl":
        import threading

        if threading.current_thread() is threading.main_thread():      # Python allows handlers only there
            self._parent = _ACTIVE[-1] if _ACTIVE else None
            if self._parent is not None and self._parent.received is not None:   # arrived before this run began
                self.received, self._signum = self._parent.received, self._parent._signum
            _ACTIVE.append(self)
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        if _ACTIVE and _ACTIVE[-1] is self:
            _ACTIVE.pop()
        parent, self._parent = self._parent, None
        if parent is not None and parent.received is None and self.received is not None:
            parent.received, parent._signum = self.received, self._signum      # the command stops after this run

    def raise_if_stopped(self, where: str) -> None:
        """Interrupted when a signal was received: a command's check between its runs, where nothing is in
        flight (the message says so; rerun_resumes adds how to continue)."""
        if self.received is not None:
            raise Interrupted(f"{self.received} received: stopped {where}", in_flight=False)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt          # a second Ctrl-C: stop now
        if self.received is None and self.finishing:     # the last step: stopping would only lose the report
            self.received, self._signum = name, signum
            log.warning(f"{name} received while the run tests its best epoch and writes its report: finishing that "
                        f"(seconds), then exiting" + ("; press Ctrl-C again to stop at once" if signum ==
                                                      signal.SIGINT else ""))
        elif self.received is None:
            self.received, self._signum = name, signum
            log.warning(f"{name} received: finishing the step in flight, then writing a checkpoint and stopping "
                        f"({resume_advice()})"
                        + ("; press Ctrl-C again to stop at once" if signum == signal.SIGINT else ""))

    # --- the per-step decision --------------------------------------------------------------------
    def decide(self, step: int, due_ok: bool = True) -> str:
        """"stop", "checkpoint" or "" after optimizer step `step` (a collective under torchrun); with
        `due_ok=False` (a checkpoint was just written) only a stop is looked for."""
        due = due_ok and bool((self.every_steps and step % self.every_steps == 0) or
                              (self.every_minutes and time.monotonic() - self._last_save >= 60 * self.every_minutes))

        from .distributed import world_size  # lazy: config imports this module for --help, torch is not needed there

        if world_size() > 1:
            import torch
            import torch.distributed as dist

            flags = torch.tensor([self._signum, due], dtype=torch.int32)
            if dist.get_backend() == "nccl":
                flags = flags.cuda()
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)     # any rank's signal or clock decides for all
            if int(flags[0]) and self.received is None:      # a signal another rank received
                self._signum, self.received = int(flags[0]), signal.Signals(int(flags[0])).name
            due = bool(flags[1])
        stop = self.received is not None
        if not due_ok:
            self._last_save = time.monotonic()
        if stop:
            return "stop"
        if due:
            self._last_save = time.monotonic()
            return "checkpoint"
        return ""
