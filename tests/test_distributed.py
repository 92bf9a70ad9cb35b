"""The job environment each task exports for the rendezvous: what submitit reads from Slurm,
computed independently in every task's own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from pemt.distributed import RENDEZVOUS_PORTS, rendezvous_port

EXPORT = """
import json, os
from pemt.distributed import _export_job_environment
_export_job_environment()
print(json.dumps({k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}))
"""


def _task_environment(job_id: str, rank: int, tasks: int, per_node: int) -> dict[str, str]:
    """What one task of a Slurm job exports, seen from a fresh process of its own (its own hash
    seed, and a shell's stale RANK that the job's view must override)."""
    env = {
        **os.environ,
        "PYTHONHASHSEED": str(rank + 11),
        "RANK": "99",
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": job_id,
        "SLURM_NTASKS": str(tasks),
        "SLURM_JOB_NUM_NODES": str(tasks // per_node),
        "SLURM_NODEID": str(rank // per_node),
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank % per_node),
        "SLURM_JOB_NODELIST": "localhost,node-b",
    }
    env.pop("MASTER_PORT", None)
    done = subprocess.run(
        [sys.executable, "-c", EXPORT], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_task_of_a_job_agrees_on_the_rendezvous_and_knows_its_rank() -> None:
    exported = [_task_environment("4242", rank, tasks=4, per_node=2) for rank in range(4)]
    assert {e["MASTER_PORT"] for e in exported} == {str(rendezvous_port("4242"))}
    assert {e["MASTER_ADDR"] for e in exported} == {"localhost"}, "rank 0's node, for every task"
    assert [e["RANK"] for e in exported] == ["0", "1", "2", "3"]
    assert [e["LOCAL_RANK"] for e in exported] == ["0", "1", "0", "1"]
    assert {e["WORLD_SIZE"] for e in exported} == {"4"}
    other = _task_environment("4243", 0, tasks=4, per_node=2)
    assert other["MASTER_PORT"] != exported[0]["MASTER_PORT"], "neighbouring jobs on one node differ"


def test_ports_lie_below_the_ephemeral_range_and_spread_over_jobs() -> None:
    low, high = RENDEZVOUS_PORTS
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {rendezvous_port(str(job)) for job in range(2000)}
    assert all(low <= p <= high < ephemeral_low for p in ports)
    assert len(ports) > 1500, "different jobs rarely share a port"
