"""Decoded samples a data worker keeps, so that a video is decoded once rather than once an epoch.

Only decodes that made no random choice are kept (pemt.data.decode.WindowDraws): a video exactly
as long as the window whose frames are no larger than the crop, as the digits task's are, decodes
to the same clips under any window seed, so serving it again changes nothing, bitwise. A sample
whose window or crop is drawn keeps its augmentation: it is decoded afresh every time.

The cache fills up to its bound (`data.decoded_cache_mb`) and then takes nothing more; it never
evicts. An epoch reads every sample once in a new order, so a least-recently-used cache smaller
than the set would have dropped each sample before it came round again, and hit nothing; one that
keeps its first samples serves that share of every later epoch. Each worker keeps its own (any
sample can come to any worker), so a rank holds up to `data.num_workers` times the bound.
"""

from __future__ import annotations

from typing import Any

import torch


def sample_bytes(sample: dict[str, Any]) -> int:
    """What a decoded sample's tensors hold."""
    return sum(v.numel() * v.element_size() for v in sample.values() if isinstance(v, torch.Tensor))


class DecodedCache:
    """Decoded samples by (shard, key), up to `max_bytes` of their tensors."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self.samples: dict[tuple[str, str], dict[str, Any]] = {}

    def get(self, shard: str, key: str) -> dict[str, Any] | None:
        return self.samples.get((shard, key))

    def offer(self, shard: str, key: str, sample: dict[str, Any]) -> bool:
        """Keep `sample` if it fits; whether it was kept."""
        size = sample_bytes(sample)
        if self.held + size > self.max_bytes or (shard, key) in self.samples:
            return False
        self.samples[(shard, key)] = sample
        self.held += size
        return True
