"""Signals are only recorded; the preemption signal wins over TERM and Ctrl-C; the hand-over calls
submitit's handler only for it; data workers ignore them all and end with their training process."""

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
    term = signal.getsignal(signal.SIGTERM)
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
        signal.signal(signal.SIGTERM, term)


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
    term = signal.getsignal(signal.SIGTERM)
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
        signal.signal(signal.SIGTERM, term)


RANK_HANDING_OVER_A_REQUEUE = """
import os, signal, sys
from pemt.train.preemption import StopRequest

def requeue(signum, frame):
    # As `scontrol requeue` from rank 0 does: Slurm sends SIGTERM to every task of the job.
    # This rank is not rank 0: submitit's handler returns and the rank goes on exiting.
    os.kill(os.getpid(), signal.SIGTERM)

signal.signal(signal.SIGUSR2, requeue)
stop = StopRequest()
stop.install()
try:
    stop.hand_over(signal.SIGUSR2)
finally:
    print("torn down", flush=True)
"""


def test_a_rank_exiting_after_a_requeue_is_not_killed_by_its_sigterm(tmp_path: Path) -> None:
    """The requeue's SIGTERM reaches ranks still tearing down; late in the interpreter's exit no
    Python handler catches it (as here, where none is installed). A rank killed there fails its
    Slurm task and leaks its data workers' semaphores: once handed over, a rank ignores it."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_HANDING_OVER_A_REQUEUE)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"status {done.returncode}: {done.stderr[-3000:]}"
    assert done.stdout == "torn down\n"


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


ENDING_WITH_A_LOADER_IN_USE = """
import os, signal, sys
from pemt.train.preemption import shielded_workers
from test_preemption import _Counting, _loader

def batches():
    with shielded_workers(_loader(_Counting(stall_at=2))) as iterator:
        print(iterator._workers[0].pid, flush=True)
        yield from iterator

if __name__ == "__main__":
    in_use = batches()
    next(in_use), next(in_use)
    if sys.argv[1] == "exit":
        sys.exit(0)  # as a requeue ends a rank: the loader is still referenced
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a node's cleanup ends one
"""


def _end_with_a_loader_in_use(tmp_path: Path, how: str) -> tuple[subprocess.CompletedProcess, int]:
    script = tmp_path / "in_use.py"
    script.write_text(ENDING_WITH_A_LOADER_IN_USE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    # Output to files, not pipes: a worker left running would hold a pipe open past the test.
    with open(tmp_path / "out", "w+") as out, open(tmp_path / "err", "w+") as err:
        done = subprocess.run([sys.executable, str(script), how], env=env, stdout=out, stderr=err, timeout=120)
    done.stdout, done.stderr = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    return done, int(done.stdout.split()[0])


def _gone(pid: int, within_s: float) -> bool:
    """Whether `pid` has exited within the time (a zombie no one has reaped yet counts as exited:
    an orphan's reaper is whatever PID 1 the machine has); one still running is killed."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return False


def test_a_loader_still_in_use_at_the_exit_does_not_hold_it(tmp_path: Path) -> None:
    done, worker = _end_with_a_loader_in_use(tmp_path, "exit")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "killed" in done.stderr, "the stalled worker was killed, not waited for"
    assert _gone(worker, within_s=1)


def test_data_workers_end_with_a_killed_training_process(tmp_path: Path) -> None:
    """A forkserver worker's parent is the forkserver, which the worker itself keeps alive: with
    no watch on the training process, a SIGKILLed rank leaves its workers running for good."""
    done, worker = _end_with_a_loader_in_use(tmp_path, "kill")
    assert done.returncode == -signal.SIGKILL
    assert _gone(worker, within_s=10), f"data worker {worker} outlived its training process"
