"""Preemption and time limits: a signal becomes a collective save at the next step boundary.

Slurm (and submitit's local executor) send the preemption signal (SIGUSR2, or what
SUBMITIT_PREEMPT_SIGNAL names) before preemption or the time limit, and SIGTERM before killing;
Ctrl-C sends SIGINT. The handler only records the signal. At each step boundary the ranks agree
(one all-reduce) whether any of them got one; then all save together, and after the preemption
signal the job hands over to submitit's own handler, which requeues it from rank 0 (submitit's
checkpoint path under hydra-submitit-launcher). After SIGTERM or SIGINT the job exits without
requeueing itself: the scheduler requeues or ends it, or the user resumes it.

Slurm delivers signals to every process of a job step, data workers included: they ignore them
(`shielded_workers`), so only the training process decides what a signal means, and they end
with it, however it ends.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import psutil
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

# Slurm checks time limits (and sends their warning signal) on a ~30 s timer.
SLURM_TIMER_SLACK_S = 60


def preemption_signal() -> signal.Signals:
    """The signal submitit requeues on: SUBMITIT_PREEMPT_SIGNAL (a name such as USR1), else USR2."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG")
    try:
        return signal.Signals[f"SIG{name}"]
    except KeyError:
        raise ValueError(f"SUBMITIT_PREEMPT_SIGNAL={name!r} is not a signal name (e.g. USR2)") from None


def stop_signals() -> tuple[signal.Signals, ...]:
    """What stops a job, in increasing precedence: Ctrl-C, SIGTERM, the preemption signal."""
    return tuple(dict.fromkeys((signal.SIGINT, signal.SIGTERM, preemption_signal())))


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Child processes started inside (data workers, their forkserver, multiprocessing's resource
    tracker) ignore the stop signals for life: an ignored signal stays ignored across fork and exec.
    This process's own handlers are back on leaving."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in stop_signals()}
    try:
        from multiprocessing import forkserver, resource_tracker

        resource_tracker.ensure_running()
        if "forkserver" in multiprocessing.get_all_start_methods():
            forkserver.ensure_running()
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A torch data worker installs its own SIGTERM handler as it starts (one that ends it), over
    the ignore it inherited: this puts the ignore back."""
    for signum in stop_signals():
        signal.signal(signum, signal.SIG_IGN)


def exit_with(pid: int) -> None:
    """End this process as soon as process `pid` has ended, however it ended. A forkserver data
    worker's parent is the forkserver, which a SIGKILLed training process leaves running (its
    workers hold it open), so torch's watch on the parent never fires: the worker watches the
    training process itself."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(0)
    except (AttributeError, OSError):  # no pidfd (not Linux, or a kernel before 5.3): poll
        handle = None

    def wait() -> None:
        if handle is not None:
            select.select([handle], [], [])
        else:
            while _alive(pid):
                time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=wait, name=f"exit-with-{pid}", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class WorkerSetup:
    """A DataLoader's worker_init_fn: the worker ignores the stop signals and ends with the
    training process, then runs the loader's own worker_init_fn, if any."""

    training_pid: int
    then: Callable[[int], None] | None = None

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals()
        exit_with(self.training_pid)
        if self.then is not None:
            self.then(worker_id)


@contextlib.contextmanager
def shielded_workers(loader: DataLoader[Any]) -> Iterator[Iterator[Any]]:
    """`loader`'s iterator, its worker processes deaf to the stop signals and ending with this
    process. On leaving, the workers are shut down; one still busy after torch's grace (a slow
    read, a long video) is killed, since the SIGTERM torch ends it with is ignored: no worker is
    left for the exit to wait on."""
    if not loader.num_workers:
        yield iter(loader)
        return
    if not isinstance(loader.worker_init_fn, WorkerSetup):
        loader.worker_init_fn = WorkerSetup(os.getpid(), loader.worker_init_fn)
    with shielded():
        iterator = iter(loader)
    _LIVE.add(iterator)
    try:
        yield iterator
    finally:
        _LIVE.discard(iterator)
        _stop_workers(iterator)


# Iterators whose workers are running. A loader still in use when the interpreter exits (after
# an exception, or a requeue's exit) is stopped here: multiprocessing's exit hook would otherwise
# SIGTERM its workers (ignored) and wait for them. Registered after torch and multiprocessing
# registered theirs (they are imported above), so it runs before them.
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _stop_live_workers() -> None:
    for iterator in list(_LIVE):
        _stop_workers(iterator)


def _stop_workers(iterator: Any) -> None:
    iterator._shutdown_workers()  # noqa: SLF001 - torch's own shutdown, as its finaliser calls it
    if getattr(iterator, "_worker_pids_set", False):
        # torch skipped its shutdown (the interpreter is exiting): unregister the workers as it
        # would have, or torch reports the one killed below as a failed worker.
        from torch._C import _remove_worker_pids

        _remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False  # noqa: SLF001
    for worker in getattr(iterator, "_workers", []):
        if worker.is_alive():
            log.warning("data worker %d still busy after the loader's shutdown: killed", worker.pid)
            worker.kill()
            worker.join(10)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at: float | None = None
        self.previous: dict[int, Any] = {}
        self.signals = stop_signals()
        self.preempt = preemption_signal()

    def install(self) -> None:
        for signum in self.signals:
            self.previous[signum] = signal.signal(signum, self._record)

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def finished(self) -> None:
        """The run is complete and saved: handlers go back, except that the preemption signal is
        ignored from now on. Slurm sends it `signal_delay_s` before the time limit; one that comes
        while a finished job exits must neither requeue it nor kill it (which Slurm records as
        FAILED)."""
        self.uninstall()
        signal.signal(self.preempt, signal.SIG_IGN)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            log.warning("received %s: saving at the next step boundary", signal.Signals(signum).name)
            self.received_at = time.time()
        self.signum = self.signum or signum

    def agreed(self, device: torch.device) -> int | None:
        """Collective: the signal any rank received (the preemption signal over SIGTERM over
        SIGINT), or None."""
        code = 0 if self.signum is None else self.signals.index(self.signum) + 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([code], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
            if code:  # every rank learns when the first signal arrived, for timing the save
                first = torch.tensor([self.received_at or float("inf")], dtype=torch.float64, device=device)
                dist.all_reduce(first, op=dist.ReduceOp.MIN)
                self.received_at = float(first.item())
        return self.signals[code - 1] if code else None

    def outcome(self, signum: int | None, cfg: DictConfig) -> str:
        """Why this signal stopped the job. Slurm sends the same USR2 before the time limit and on
        preemption; one that comes when the limit is near is the limit's."""
        if signum != self.preempt:
            return "terminated"
        limit_min = OmegaConf.select(cfg, "cluster.time_min")
        delay_s = OmegaConf.select(cfg, "cluster.signal_delay_s") or 0
        if limit_min and self.received_at:
            ran_s = self.received_at - psutil.Process().create_time()
            if ran_s >= 60 * limit_min - delay_s - SLURM_TIMER_SLACK_S:
                return "time limit"
        return "preempted"

    def warn_if_slow(self, cfg: DictConfig) -> None:
        """After a signal: the save and the bounded MLflow delivery must fit the signal's notice."""
        delay = OmegaConf.select(cfg, "cluster.signal_delay_s")
        spent = time.time() - (self.received_at or time.time())
        if delay and spent > 0.5 * delay:
            log.warning(
                "from the signal to requeueing took %.0f s (save and MLflow delivery), over half of "
                "cluster.signal_delay_s=%s: raise the signal delay",
                spent,
                delay,
            )

    def hand_over(self, signum: int, requeue: bool = True) -> None:
        """After the save: on the preemption signal, requeue through submitit's handler (rank 0
        exits inside it) and exit. Otherwise (SIGTERM, Ctrl-C, or jobs submitted --no-requeue)
        return: the job ends with its result, and the run is continued by launching it again or
        with tools/resume.py."""
        previous: Any = self.previous.get(signum)
        self.uninstall()
        if requeue and signum == self.preempt and callable(previous):
            # Rank 0's requeue makes Slurm SIGTERM every task of the job at once, while the
            # others are still tearing down. Late in the interpreter's exit Python's handlers
            # are gone, and the signal would kill the rank mid-teardown (leaking its data
            # workers' semaphores). The run is saved: let it exit; Slurm's SIGKILL after
            # KillWait and the exit deadline still bound it.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            previous(signum, None)
            sys.exit(0)
