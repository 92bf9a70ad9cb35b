"""One writer per run dir: the live job that owns it.

The owner holds an advisory lock on `<run_dir>/.pemt.lock` (flock: released by the kernel when
the process dies, however it dies) and writes who it is into the file: job id, host, pid and
the pid's start time. A second job, `tools/resume.py` or `tools/mlflow_sync.py` refuses while
that owner lives, naming it. An owner that is gone (its pid is not running on its host, its Slurm
job is not in the queue, or it is an earlier run of the same requeued job) is taken over.
Where the file system does not share locks between nodes, the recorded owner is what decides;
one that cannot be checked from here (another host, no Slurm) is taken as alive.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK = ".pemt.lock"
# Slurm states of a job that is still (or again) going to run: it owns its run dir.
LIVE_SLURM_STATES = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
}


class RunBusy(RuntimeError):
    """The run dir is owned by a live job; the message says which."""


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def this_process(purpose: str) -> dict[str, Any]:
    pid = os.getpid()
    return {
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "host": socket.gethostname(),
        "pid": pid,
        "pid_started": _start_time(pid),
        "purpose": purpose,
        "since": time.time(),
    }


def _slurm_state(job_id: str) -> str | None:
    """The job's state in Slurm's queue, "GONE" when Slurm no longer knows it, None when Slurm
    cannot be asked (not installed here, controller down)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return "GONE" if "invalid job id" in out.stderr.lower() else None
    return out.stdout.strip().split("\n")[0] or "GONE"


def is_alive(owner: dict[str, Any]) -> bool:
    """Whether a recorded owner may still be writing."""
    me = this_process("")
    if owner.get("job_id") and owner["job_id"] == me["job_id"] and owner.get("pid") != me["pid"]:
        return False  # an earlier run of this same (requeued) job: Slurm ended it before starting this one
    if owner.get("host") == me["host"]:
        started = _start_time(int(owner.get("pid", -1)))
        return started is not None and abs(started - float(owner.get("pid_started") or started)) < 1.0
    if owner.get("job_id"):
        state = _slurm_state(str(owner["job_id"]))
        if state is not None:
            return state in LIVE_SLURM_STATES
    return True  # another host, nothing to ask: assume it lives


def describe(owner: dict[str, Any]) -> str:
    job = f"Slurm job {owner['job_id']}" if owner.get("job_id") else f"pid {owner.get('pid')}"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("since", 0))))
    return f"{owner.get('purpose', 'a process')} ({job} on {owner.get('host')}, since {since})"


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self._handle: Any = None

    def recorded(self) -> dict[str, Any] | None:
        try:
            recorded: dict[str, Any] | None = json.loads(self.path.read_text() or "null")
            return recorded
        except (OSError, ValueError):
            return None

    def holder(self) -> dict[str, Any] | None:
        """The live owner, or None (no lock file, or its owner is gone)."""
        if not self.path.exists():
            return None
        with self.path.open("a+") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return self.recorded() or {"purpose": "a process on this file system"}
            fcntl.flock(probe, fcntl.LOCK_UN)
        owner = self.recorded()
        return owner if owner and is_alive(owner) else None

    def acquire(self, purpose: str) -> dict[str, Any] | None:
        """Own the run dir (raises RunBusy naming the live owner); returns a dead owner taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            owner = self.recorded() or {"purpose": "a process on this file system"}
            raise RunBusy(f"{self.path.parent} is in use by {describe(owner)}") from None
        previous = self.recorded()
        if previous and previous.get("pid") != os.getpid() and is_alive(previous):
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
            raise RunBusy(
                f"{self.path.parent} is in use by {describe(previous)} (its lock is not visible "
                f"from here; if it is gone, delete {self.path})"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(this_process(purpose)))
        handle.flush()
        self._handle = handle
        return previous

    def release(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.seek(0)
                self._handle.truncate()
                fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    @contextlib.contextmanager
    def held(self, purpose: str) -> Iterator[None]:
        self.acquire(purpose)
        try:
            yield
        finally:
            self.release()


def own_run_dir(lock: RunLock, run_dir: Path, is_main: bool, world_size: int) -> None:
    """Collective. Rank 0 takes the run dir's lock before anything else is written; every rank
    learns whether it may go on (RunBusy where another live job holds it)."""

    from pemt.distributed import from_main

    refusal = None
    if is_main:
        try:
            gone = lock.acquire("training")
        except RunBusy as err:
            refusal = str(err)
        else:
            if gone:
                log.warning("took over %s from %s, which is gone", run_dir, describe(gone))
    refusal = from_main(refusal, world_size)
    if refusal:
        raise RunBusy(refusal)
