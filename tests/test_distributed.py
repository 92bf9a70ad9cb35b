"""The job environment each task exports for the rendezvous: what submitit reads from Slurm,
computed independently in every task's own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, free_port
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


LEAVE = """
import os, sys, torch, torch.distributed as dist
import torch.multiprocessing as mp
from pemt.distributed import leave_distributed

def rank_main(rank, port, together):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    for _ in range(3):
        dist.all_reduce(torch.ones(1 << 20))
    leave_distributed(together=together)

if __name__ == "__main__":
    for round_ in range(4):  # left to the exit, each round aborts a rank about half the time
        args = (int(sys.argv[1]) + round_, round_ % 2 == 0)  # alone, or after meeting the other rank
        mp.start_processes(rank_main, args=args, nprocs=2, start_method="spawn")
"""


def test_ranks_that_leave_the_process_group_exit_cleanly(tmp_path: Path) -> None:
    """A finished job's tasks exit 0: a gloo group left to the interpreter's exit aborts a rank
    (SIGABRT) after the work is done, which Slurm records as a failed task."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVE)
    done = subprocess.run(
        [sys.executable, str(script), str(free_port(4))],  # one port per round
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_training_leaves_the_process_group_however_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    from pemt.train import trainer

    left = []

    class Failing:
        def __init__(self, cfg, task=None) -> None:
            pass

        def fit(self) -> dict:
            raise SystemExit(0)  # as a requeue ends rank 0

    monkeypatch.setattr(trainer, "Trainer", Failing)
    monkeypatch.setattr(trainer, "leave_distributed", lambda together: left.append(together))
    with pytest.raises(SystemExit):
        trainer.train(None)  # type: ignore[arg-type]
    assert left == [False], "after a failure or a requeue each rank leaves on its own"
    monkeypatch.setattr(Failing, "fit", lambda self: {"step": 1})
    assert trainer.train(None) == {"step": 1}  # type: ignore[arg-type]
    assert left == [False, True], "ranks that all ended the run leave together"


ABSENT_PEER = """
import os, sys, time, torch, torch.distributed as dist
import pemt.distributed
from pemt.train import exit_deadline

rank = int(sys.argv[2])
os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo")
dist.all_reduce(torch.ones(8))
if rank == 1:  # stuck elsewhere: it never comes to leave
    time.sleep(600)
exit_deadline.arm(10.0)  # as train() does in a job
pemt.distributed.LEAVE_TOGETHER_S = 2.0
pemt.distributed.leave_distributed(together=True)
print("result written", flush=True)  # as submitit does once the job function returns
"""


def test_a_rank_whose_peer_never_comes_to_leave_still_ends(tmp_path: Path) -> None:
    """A gloo group waits on a peer that is alive but elsewhere, in its teardown and at the exit:
    a finished rank waits for its peers a bounded time, returns (the job's result gets written),
    and its exit deadline ends the process."""
    script = tmp_path / "absent.py"
    script.write_text(ABSENT_PEER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    port = str(free_port())
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    ranks = [subprocess.Popen([sys.executable, str(script), port, str(r)], cwd=REPO, env=env, **pipes) for r in (0, 1)]
    try:
        out, err = ranks[0].communicate(timeout=120)  # without the deadline: the peer's 600 s
        assert b"ranks did not meet before leaving the process group" in err, err[-3000:]
        assert out == b"result written\n"
        assert ranks[0].returncode == 1 and b"Thread" in err, "ended by the deadline, stacks in the log"
        assert ranks[1].poll() is None, "the peer was there all along"
    finally:
        for process in ranks:
            process.kill()
            process.communicate()


STUCK_AT_EXIT = """
import threading
from pemt.train import exit_deadline

def waits_for_a_peer_that_is_gone():
    threading.Event().wait()

exit_deadline.arm(1.0)
threading.Thread(target=waits_for_a_peer_that_is_gone).start()  # not a daemon: the exit waits on it
"""


def test_a_job_process_stuck_at_exit_ends_with_its_stacks_in_the_log() -> None:
    done = subprocess.run(
        [sys.executable, "-c", STUCK_AT_EXIT],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, "past the deadline the process exits, as failed"
    assert "waits_for_a_peer_that_is_gone" in done.stderr, "the log says where it was stuck"
