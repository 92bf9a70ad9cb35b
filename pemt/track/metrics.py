"""Measurements of a training step: throughput, host and device memory."""

from __future__ import annotations

import time

import psutil
import torch

GIB = 1024**3


def host_rss_gib() -> float:
    return psutil.Process().memory_info().rss / GIB


def device_memory_gib() -> dict[str, float]:
    """Peak allocated and reserved memory on this rank's GPU since the last call; empty on CPU."""
    if not torch.cuda.is_available():
        return {}
    stats = {"device_max_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
             "device_max_reserved_gib": torch.cuda.max_memory_reserved() / GIB}
    torch.cuda.reset_peak_memory_stats()
    return stats


class Throughput:
    """Samples and seconds since the last report."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.samples = 0
        self.steps = 0

    def add(self, samples: int) -> None:
        self.samples += samples
        self.steps += 1

    def report(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        values = {"samples_per_s": self.samples / elapsed, "step_time_s": elapsed / max(1, self.steps)}
        self.reset()
        return values
