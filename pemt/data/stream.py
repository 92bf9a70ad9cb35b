"""A deterministic, resumable order over shards: a fixed number of virtual streams.

Shards are dealt once to `streams` virtual streams (balanced by sample count). Each stream
walks its shards in a seeded order that changes every epoch, shuffling within each shard with a
seeded buffer. Every micro-step takes the next `per_step` samples of every stream, so the
samples of a step depend only on the step, never on the world size: rank r of W owns streams
[r V/W, (r+1) V/W), and a run resumed at step s at any world size that divides V sees exactly
the samples an uninterrupted run would have seen. Positions are slots: a sample that fails to
decode leaves its slot empty (the batch is one smaller) instead of shifting the rest.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import webdataset as wds

from pemt.data.members import can_index, indexed_samples
from pemt.data.shard_sets import load_manifest
from pemt.data.storage import Retry, StorageError, is_remote


@dataclass(frozen=True)
class Slot:
    """One position of a stream: the raw sample, or why there is none."""

    stream: int
    position: int
    shard: str
    sample: dict[str, Any] | None
    error: str | None = None


@dataclass(frozen=True)
class StreamPlan:
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    streams: int
    seed: int
    shuffle_buffer: int
    retry: Retry = Retry()  # remote shards: how each read is retried
    sizes: tuple[int | None, ...] = ()  # each shard's bytes, where the manifest says (saves a request)

    def __post_init__(self) -> None:
        if len(self.urls) < self.streams:
            raise ValueError(
                f"{len(self.urls)} shards for data.streams={self.streams}: every virtual "
                "stream needs at least one shard (lower data.streams or write smaller shards)"
            )

    @functools.cached_property
    def assignment(self) -> list[list[int]]:
        """Shard indices per stream, dealt largest first to the lightest stream."""
        loads = [0] * self.streams
        owned: list[list[int]] = [[] for _ in range(self.streams)]
        for index in sorted(range(len(self.urls)), key=lambda i: (-self.counts[i], i)):
            lightest = min(range(self.streams), key=lambda v: (loads[v], v))
            owned[lightest].append(index)
            loads[lightest] += self.counts[index]
        return owned

    def epoch_order(self, stream: int, epoch: int) -> list[int]:
        order = sorted(self.assignment[stream])
        random.Random(f"order-{self.seed}-{stream}-{epoch}").shuffle(order)
        return order

    def epoch_length(self, stream: int) -> int:
        return sum(self.counts[i] for i in self.assignment[stream])


def plan_from_manifest(
    source: str,
    streams: int,
    seed: int,
    shuffle_buffer: int,
    retry: Retry | None = None,
    cache_dir: str | None = None,
) -> StreamPlan:
    """Sample counts come from the shard set's manifest (pemt.data.shard_sets); they fix every
    slot's place."""
    manifest = load_manifest(source, cache_dir, retry)
    entries = manifest.entries
    return StreamPlan(
        manifest.locations,
        tuple(e["samples"] for e in entries),
        streams,
        seed,
        shuffle_buffer,
        retry or Retry(),
        tuple(e.get("bytes") for e in entries),
    )


def _read_samples(url: str, retry: Retry, size: int | None = None) -> Iterator[dict[str, Any]]:
    """A shard's samples in order. A tar, local or remote, is indexed (members read later, only
    by the worker that decodes them: pemt.data.members); a local compressed one is streamed by
    WebDataset."""
    if can_index(url):
        return indexed_samples(url, retry, size)
    if is_remote(url):
        raise StorageError(f"{url}: remote shards are read by range, which needs uncompressed .tar files")
    samples: Iterator[dict[str, Any]] = wds.tarfile_to_samples()([{"url": url}])
    return samples


def shard_samples(
    url: str, count: int, retry: Retry | None = None, size: int | None = None
) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    """Exactly `count` entries: the shard's samples, then placeholders if it ends early. `size`:
    the shard's bytes as its manifest gives them (a remote one is then not asked)."""
    produced = 0
    try:
        for sample in _read_samples(url, retry or Retry(), size):
            if produced == count:
                break
            produced += 1
            yield sample, None
    except Exception as err:  # a corrupt tar ends the shard; its remaining slots stay empty
        reason = f"unreadable shard after {produced} samples: {type(err).__name__}: {err}"
    else:
        reason = f"shard has {produced} samples, manifest says {count}"
    for _ in range(count - produced):
        yield None, reason


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    while buffer:
        yield buffer.pop(rng.randrange(len(buffer)))


def stream_slots(plan: StreamPlan, stream: int, start: int) -> Iterator[Slot]:
    """Slots of one virtual stream from position `start` on, without end."""
    length = plan.epoch_length(stream)
    epoch, offset = divmod(start, length)
    position = start - offset
    while True:
        for shard in plan.epoch_order(stream, epoch):
            count = plan.counts[shard]
            if offset >= count:  # the whole shard lies before the resume point: never opened
                offset -= count
                position += count
                continue
            rng = random.Random(f"shuffle-{plan.seed}-{stream}-{epoch}-{shard}")
            url = plan.urls[shard]
            size = plan.sizes[shard] if plan.sizes else None
            samples = shard_samples(url, count, plan.retry, size)
            for index, (sample, error) in enumerate(_shuffled(samples, plan.shuffle_buffer, rng)):
                if index >= offset:
                    yield Slot(stream, position, url, sample, error)
                position += 1
            offset = 0
        epoch += 1
