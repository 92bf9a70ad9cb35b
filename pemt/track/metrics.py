"""Measurements of training: throughput, FLOPs and MFU, host and device memory."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import psutil
import torch

GIB = 1024**3

# Dense bf16 tensor-core peaks (TFLOP/s per device) from the vendors' data sheets, matched
# against the device name: the first key the name contains wins, so a variant (PCIe, NVL) comes
# before its family. Devices not listed are measured (see `peak_tflops`).
KNOWN_PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200 NVL": 835.0,
    "H100": 989.0,  # SXM ("H100 80GB HBM3")
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10": 125.0,
}


def host_rss_gib() -> float:
    return psutil.Process().memory_info().rss / GIB


def data_rss_gib() -> float:
    """Resident memory of this rank's child processes: its data workers (and their forkserver).
    Pages they share with each other count once per process, so this is an upper bound."""
    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # a worker that ended meanwhile
            continue
    return total / GIB


def device_memory() -> dict[str, float]:
    """Peak allocated and reserved memory of this rank's GPU since the last call (GiB and % of
    capacity) and the allocator's retries so far; empty on CPU."""
    if not torch.cuda.is_available():
        return {}
    capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    return {
        "device_max_allocated_gib": allocated / GIB,
        "device_max_reserved_gib": reserved / GIB,
        "device_max_allocated_pct": 100.0 * allocated / capacity,
        "device_max_reserved_pct": 100.0 * reserved / capacity,
        "device_alloc_retries": float(torch.cuda.memory_stats().get("num_alloc_retries", 0)),
    }


def _count_cpu_attention() -> None:
    """torch's counter knows the CUDA fused attention kernels but not the CPU one, so dense
    attention counted 0 FLOPs on CPU; give the CPU kernel the same formulas."""
    from torch.utils import flop_counter

    forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is None or forward in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(forward)
    def _forward(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
        return int(flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape))  # type: ignore[no-untyped-call]

    if backward is not None and backward not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(backward)
        def _backward(
            grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
        ) -> int:
            flops = flop_counter.sdpa_backward_flop_count(  # type: ignore[no-untyped-call]
                grad_out_shape, query_shape, key_shape, value_shape
            )
            return int(flops)


@contextlib.contextmanager
def counting_flops() -> Iterator[dict[str, int]]:
    """FLOPs of everything run inside, by torch's own counter (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    _count_cpu_attention()
    result = {"flops": 0}
    counter = FlopCounterMode(display=False)
    with counter:
        yield result
    result["flops"] = int(counter.get_total_flops())


def measured_peak_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """What this device reaches on a large matmul: the reference when no peak is known."""
    side = 4096 if device.type == "cuda" else 1024
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, caches
    if device.type == "cuda":
        torch.cuda.synchronize()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * side**3 * runs / (time.perf_counter() - started) / 1e12


def peak_tflops(configured: float | None, device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Peak TFLOP/s per device for MFU, and where the number comes from."""
    if configured:
        return float(configured), "config"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    known = data_sheet_peak(name) if dtype == torch.bfloat16 else None
    if known:
        return known, f"data sheet ({name})"
    return measured_peak_tflops(device, dtype), f"measured on {name} {dtype}: no data-sheet peak known for it"


def data_sheet_peak(device_name: str) -> float | None:
    """The dense bf16 peak of a known GPU from its name, or None."""
    for key, value in KNOWN_PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None


class Throughput:
    """Samples, steps, data-wait time and seconds since the last report."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.samples = 0
        self.steps = 0
        self.data_wait_s = 0.0

    def add(self, samples: int, data_wait_s: float) -> None:
        self.samples += samples
        self.steps += 1
        self.data_wait_s += data_wait_s

    def report(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        values = {
            "samples_per_s": self.samples / elapsed,
            "step_time_s": elapsed / max(1, self.steps),
            "data_wait_pct": 100.0 * self.data_wait_s / elapsed,
        }
        self.reset()
        return values
