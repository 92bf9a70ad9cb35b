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


# glibc's starting thresholds (128 KiB), fixed: its default raises them as it goes, by an amount that
# depends on the heap's history (3.7k-12k faults per step here), which would make the baseline drift.
GLIBC_START = """
import ctypes, ctypes.util
from pemt.host_memory import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
libc = ctypes.CDLL(ctypes.util.find_library("c"))
assert libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024) and libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
"""


def test_freed_host_memory_is_reused_instead_of_faulted_in_every_step() -> None:
    returned = _faults_per_step(GLIBC_START)
    kept = _faults_per_step(
        GLIBC_START + "from pemt.host_memory import keep_freed_host_memory\nassert keep_freed_host_memory()"
    )
    # handed back and faulted in again: the step's activations, thousands of pages of 4 KiB
    assert returned > 4_000, returned
    assert kept < returned / 5, (kept, returned)


def test_a_cpu_rank_keeps_freed_host_memory_once_it_joins_the_job() -> None:
    joined = _faults_per_step("from pemt.distributed import init_distributed\ninit_distributed()")
    assert joined < 5000, joined  # ~0.3-1.4k; without the setting 15-17k
