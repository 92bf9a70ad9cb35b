"""Counting samples that could not be used, and stopping when there are too many."""

from __future__ import annotations

from collections import Counter
from typing import Any


class DecodeError(ValueError):
    """A sample that cannot become model input; the message says why."""


class DataError(RuntimeError):
    """Too much of the data is unusable; the message names the shards."""


class BadSamples:
    """Per-rank tally of slots and failures; the decision is taken on totals over all ranks."""

    def __init__(self, max_error_rate: float, min_slots: int = 32) -> None:
        self.max_error_rate = max_error_rate
        self.min_slots = min_slots
        self.slots = 0
        self.errors = 0
        self.by_shard: Counter[str] = Counter()
        self.examples: list[str] = []

    def add(self, batch: dict[str, Any]) -> None:
        self.slots += batch["slots"]
        for error in batch["errors"]:
            self.errors += 1
            self.by_shard[error["shard"]] += 1
            if len(self.examples) < 5:
                self.examples.append(f"{error['shard']} {error['key'] or '(no sample)'}: {error['reason']}")

    def check(self, total_errors: float, total_slots: float) -> None:
        """Raise DataError if the error share over all ranks exceeds the limit."""
        if total_slots < self.min_slots or total_errors <= self.max_error_rate * total_slots:
            return
        worst = ", ".join(f"{shard} ({n})" for shard, n in self.by_shard.most_common(10)) or "(on other ranks)"
        raise DataError(
            f"{total_errors:.0f} of {total_slots:.0f} samples unusable ({total_errors / total_slots:.1%} > "
            f"data.max_error_rate={self.max_error_rate}); shards with failures on this rank: {worst}; "
            f"for example: {'; '.join(self.examples)}"
        )
