"""CPU ranks reuse freed host memory: a step's activations are not faulted in afresh every step."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO, free_port

# A training step of a small 3D CNN (the clip encoders' kind of work); page faults per step.
STEP = """
import resource, torch
from torch import nn
{setup}
torch.set_num_threads(1)
torch.manual_seed(0)
net = nn.Sequential(
    nn.Conv3d(3, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU(),
    nn.Conv3d(16, 32, 3, padding=1), nn.BatchNorm3d(32), nn.ReLU(),
    nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, 8),
)
x = torch.randn(4, 3, 8, 48, 48)
def step():
    net(x).square().mean().backward()
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


def _faults_per_step(setup: str) -> float:
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(free_port())
    done = subprocess.run(
        [sys.executable, "-c", STEP.format(setup=setup)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return float(done.stdout.split()[-1])


def test_freed_host_memory_is_reused_instead_of_faulted_in_every_step() -> None:
    default = _faults_per_step("")
    kept = _faults_per_step("from pemt.host_memory import keep_freed_host_memory\nassert keep_freed_host_memory()")
    # glibc's default hands freed activations back and faults them in again: ~10k pages of 4 KiB a step
    assert default > 4_000, default
    assert kept < default / 5, (kept, default)


def test_a_cpu_rank_keeps_freed_host_memory_once_it_joins_the_job() -> None:
    joined = _faults_per_step("from pemt.distributed import init_distributed\ninit_distributed()")
    assert joined < 2000, joined
