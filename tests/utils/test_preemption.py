"""Stopping safely: signal names parsed as the config gives them, a real signal turned into "stop" at the next
step, checkpoints every N steps, and the previous handlers back afterwards."""
from __future__ import annotations

import contextlib
import os
import signal

import pytest

from spinal_transfer.errors import ConfigError, rerun_resumes
from spinal_transfer.utils.preemption import StopControl, parse_signals


def test_parse_signals():
    assert parse_signals("TERM, sigusr1,int") == [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT]
    assert parse_signals("") == []
    with pytest.raises(ConfigError, match="unknown signal 'KILL'"):
        parse_signals("TERM,KILL")


def test_a_signal_stops_at_the_next_step_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with StopControl([signal.SIGUSR1], every_steps=3) as stop:
        assert [stop.decide(s) for s in (1, 2, 3, 4)] == ["", "", "checkpoint", ""]
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == "SIGUSR1" and stop.decide(5) == "stop"
        assert stop.decide(6, due_ok=False) == "stop"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_a_signal_while_the_run_writes_its_report_says_it_finishes_that(caplog):
    """The report is the last step: a signal there lets it be written (exit 0), and the log says so instead of
    promising a checkpoint and a stop."""
    with StopControl([signal.SIGUSR1]) as stop, caplog.at_level("WARNING"):
        stop.finishing = True
        os.kill(os.getpid(), signal.SIGUSR1)
    said = [r.getMessage() for r in caplog.records if "SIGUSR1 received" in r.getMessage()]
    assert len(said) == 1 and "writes its report: finishing that" in said[0] and "checkpoint" not in said[0]


@pytest.mark.parametrize("command", [None, "tune", "compare"])
def test_the_signal_line_says_how_to_resume_train_or_the_command_driving_the_run(caplog, command):
    """A run of its own resumes with `train --resume`; a run inside tune or compare (rerun_resumes) resumes with
    that command run again: `train --resume` would train a trial outside its study, a run outside the tables."""
    with contextlib.ExitStack() as stack, caplog.at_level("WARNING"):
        if command:
            stack.enter_context(rerun_resumes(command))
        with StopControl([signal.SIGUSR1]):
            os.kill(os.getpid(), signal.SIGUSR1)
    said = [r.getMessage() for r in caplog.records if "SIGUSR1 received" in r.getMessage()]
    assert len(said) == 1
    if command:
        assert f"(the same {command} command, run again, resumes it)" in said[0] and "train --resume" not in said[0]
    else:
        assert "(resume with `spinal-transfer train --resume RUN`)" in said[0]


def test_a_commands_control_and_its_runs_control_share_one_signal():
    """A command (compare, reproduce, tune) holds its own control around its runs: a signal before a run takes
    its handlers stops that run at its first step, and one a run received (while writing its report, say) is
    the command's once the run ends; the old controls knew nothing of each other, so the command forgot it."""
    from spinal_transfer.errors import Interrupted

    before = signal.getsignal(signal.SIGUSR1)
    with StopControl([signal.SIGUSR1]) as command:
        with StopControl([signal.SIGUSR1]) as run:
            run.finishing = True
            os.kill(os.getpid(), signal.SIGUSR1)
        assert command.received == "SIGUSR1"
        with pytest.raises(Interrupted, match="SIGUSR1 received: stopped between runs"):
            command.raise_if_stopped("between runs")
        with StopControl([signal.SIGUSR1]) as nxt:
            assert nxt.decide(1) == "stop"
    assert signal.getsignal(signal.SIGUSR1) is before
