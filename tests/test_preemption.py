"""Signals are only recorded; the preemption signal wins over TERM and Ctrl-C; the hand-over calls
submitit's handler only for it; data workers ignore them all."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from conftest import REPO
from pemt.train.preemption import StopRequest, shielded_workers


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


class _Counting(IterableDataset):
    """0, 1, 2, ... each after `pause_s`, then, from `stall_at` on, a read that never ends."""

    def __init__(self, pause_s: float = 0.05, stall_at: int = 10**9) -> None:
        self.pause_s, self.stall_at = pause_s, stall_at

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in itertools.count():
            time.sleep(self.pause_s if i < self.stall_at else 3600)
            yield torch.tensor(i)


def _loader(dataset: IterableDataset) -> DataLoader:
    return DataLoader(
        dataset, batch_size=None, num_workers=1, multiprocessing_context="forkserver", persistent_workers=True
    )


def test_data_workers_ignore_the_stop_signals() -> None:
    """Slurm signals every process of a step; a torch data worker, which installs its own SIGTERM
    handler as it starts, must not die of it (the training process would fail mid-step)."""
    before = signal.getsignal(signal.SIGTERM)
    with shielded_workers(_loader(_Counting())) as batches:
        assert int(next(batches)) == 0
        [worker] = batches._workers
        for signum in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
            os.kill(worker.pid, signum)
        time.sleep(0.5)
        assert worker.is_alive(), "the worker ignored them"
        assert [int(next(batches)) for _ in range(3)] == [1, 2, 3]
        assert signal.getsignal(signal.SIGTERM) is before, "this process handles its signals as before"
    assert not worker.is_alive(), "shut down on leaving"


def test_a_data_worker_busy_past_the_shutdown_is_killed() -> None:
    """A worker in a read that does not end ignores torch's SIGTERM: it is killed, not left for the
    exit to wait on."""
    with shielded_workers(_loader(_Counting(stall_at=2))) as batches:
        assert [int(next(batches)) for _ in range(2)] == [0, 1]
        [worker] = batches._workers
    assert not worker.is_alive()


LOADER_IN_USE_AT_EXIT = """
import itertools, sys, time, torch
from torch.utils.data import DataLoader, IterableDataset
from pemt.train.preemption import shielded_workers

class Stalls(IterableDataset):
    def __iter__(self):
        for i in itertools.count():
            time.sleep(0.05 if i < 2 else 3600)
            yield torch.tensor(i)

def batches():
    loader = DataLoader(
        Stalls(), batch_size=None, num_workers=1, multiprocessing_context="forkserver", persistent_workers=True
    )
    with shielded_workers(loader) as iterator:
        yield from iterator

if __name__ == "__main__":
    in_use = batches()
    print(int(next(in_use)), int(next(in_use)), flush=True)
    sys.exit(0)  # as a requeue ends a rank: the loader is still referenced
"""


def test_a_loader_still_in_use_at_the_exit_does_not_hold_it(tmp_path: Path) -> None:
    script = tmp_path / "in_use.py"
    script.write_text(LOADER_IN_USE_AT_EXIT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "0 1\n", done.stderr[-3000:]
    assert "killed" in done.stderr, "the stalled worker was killed, not waited for"
