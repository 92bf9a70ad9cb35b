"""Signals are only recorded; the preemption signal wins over TERM and Ctrl-C; the hand-over calls
submitit's handler only for it; data workers ignore them all."""

from __future__ import annotations

import os
import signal
import time

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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_after_sigterm_or_ctrl_c_nothing_requeues_and_the_job_returns(signum: int) -> None:
    calls = []
    previous = signal.signal(signum, lambda s, frame: calls.append(s))
    stop = StopRequest()
    stop.install()
    try:
        stop.hand_over(signum)  # returns: the job ends with its result
        assert calls == []
        assert signal.getsignal(signum) is not stop._record, "the job's own handler is back"
    finally:
        signal.signal(signum, previous)


def test_a_site_preemption_signal_is_the_one_that_requeues(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda s, frame: calls.append(s))
    stop = StopRequest()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.agreed(torch.device("cpu")) == signal.SIGTERM, "the first one is recorded"
        stop.signum = signal.SIGUSR1
        assert stop.agreed(torch.device("cpu")) == signal.SIGUSR1
        with pytest.raises(SystemExit):
            stop.hand_over(signal.SIGUSR1)
        assert calls == [signal.SIGUSR1], "submitit's handler for the site's signal requeues"
    finally:
        stop.uninstall()
        signal.signal(signal.SIGUSR1, previous)


def test_workers_started_shielded_ignore_the_stop_signals() -> None:
    """Slurm signals every process of a step; data workers must not die of it."""
    import multiprocessing

    from pemt.train.preemption import shielded

    context = multiprocessing.get_context("forkserver")
    before = signal.getsignal(signal.SIGTERM)
    with shielded():
        ready, go = context.Event(), context.Event()
        worker = context.Process(target=_wait_for, args=(ready, go))
        worker.start()
    assert ready.wait(60)
    for signum in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        os.kill(worker.pid, signum)
    time.sleep(0.5)
    assert worker.is_alive(), "the worker ignored them"
    go.set()
    worker.join(30)
    assert worker.exitcode == 0
    assert signal.getsignal(signal.SIGTERM) is before, "this process handles its signals as before"


def _wait_for(ready, go) -> None:  # noqa: ANN001 - multiprocessing events
    ready.set()
    go.wait(60)
