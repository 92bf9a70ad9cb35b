"""Signals are only recorded; USR2 wins over TERM; the hand-over calls the previous handler."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from pemt.train.preemption import StopRequest


def test_signals_are_recorded_not_acted_on() -> None:
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    stop = StopRequest()
    stop.install()
    try:
        assert stop.agreed(torch.device("cpu")) is None
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.agreed(torch.device("cpu")) == signal.SIGTERM, "the first signal is kept"
        assert stop.received_at is not None
        assert calls == [], "submitit's handler has not run yet"
        with pytest.raises(SystemExit) as exited:
            stop.hand_over(signal.SIGUSR2)
        assert exited.value.code == 0
        assert calls == [signal.SIGUSR2], "then the previous (submitit) handler requeues"
    finally:
        stop.uninstall()
        signal.signal(signal.SIGUSR2, previous)


def test_after_sigterm_nothing_requeues() -> None:
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    stop = StopRequest()
    stop.install()
    try:
        with pytest.raises(SystemExit):
            stop.hand_over(signal.SIGTERM)
        assert calls == []
    finally:
        signal.signal(signal.SIGTERM, previous)
