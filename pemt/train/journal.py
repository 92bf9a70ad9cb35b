"""The job segments of one run, appended to `<run_dir>/jobs.jsonl` by global rank 0.

Each job that works on a run writes a `start` line (job id, hosts, world size, step) and, unless
it is killed outright, an `end` line (finished, preempted, terminated or failed, with the
reason). `tools/resume.py --status` reads it to say why a run stopped.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

JOURNAL = "jobs.jsonl"


def job_identity() -> dict[str, Any]:
    from pemt.distributed import submitit_environment

    env = submitit_environment()
    # Slurm counts requeues of one job id; 0 for a fresh job (and outside Slurm).
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    if env is not None:
        return {"job_id": str(env.job_id), "hosts": list(env.hostnames), "cluster": env.cluster, "restart": restart}
    return {
        "job_id": os.environ.get("SLURM_JOB_ID", f"pid-{os.getpid()}"),
        "hosts": [socket.gethostname()],
        "cluster": "none",
        "restart": restart,
    }


class RunJournal:
    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path = Path(run_dir) / JOURNAL
        self.enabled = enabled
        self.job = job_identity()

    def _append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps({"time": time.time(), **self.job, **record}) + "\n")

    def start(self, step: int, world_size: int) -> dict[str, Any]:
        """Record this job's start; returns the segment (its number, job, hosts, step) and when
        the run's previous job last recorded anything (for the time lost between them)."""
        earlier = read_journal(self.path.parent)
        segment = {
            "segment": sum(r["event"] == "start" for r in earlier) + 1,
            **self.job,
            "step": step,
            "world_size": world_size,
            "previous_end": earlier[-1]["time"] if earlier else None,
        }
        self._append({"event": "start", "step": step, "world_size": world_size})
        return segment

    def end(self, outcome: str, step: int, reason: str | None = None) -> None:
        self._append({"event": "end", "outcome": outcome, "step": step, "reason": reason})


def read_journal(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / JOURNAL
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut by a kill
            continue
    return records
