"""Host memory on CPU ranks: keep freed blocks for the next step instead of returning them to the OS.

glibc gives large freed blocks back to the kernel (munmap, or trimming the heap's top), so a CPU
training step faults in and zeroes its activations afresh every time: at the mid-size benchmark
model, ~100k page faults and 0.2 s of kernel time per step. With the thresholds raised, blocks up
to glibc's 32 MiB ceiling come from the heap and stay there for the next step: the faults fall to
~0 and a step on one rank takes 0.68x as long (benchmarks/results/step_overhead_cpu.md). The cost:
the process keeps what a step used (its peak) resident between steps, which it needs again at once.
GPU ranks keep glibc's defaults: their activations are in the CUDA caching allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit; larger blocks are always mapped
TRIM_THRESHOLD = 2**30  # free memory at the heap's top beyond this goes back to the OS


def keep_freed_host_memory() -> bool:
    """Tell glibc's allocator to keep freed blocks in the process. Returns False where the C
    library has no `mallopt` (macOS, musl): there nothing changes."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
