"""One pass over a held-out shard folder, spread over the ranks, and its metrics.

Sample i of the folder (in manifest order) goes to rank i mod W and is decoded with the centred
window and crop. Every rank runs the same number of forward passes (ZeRO-3 gathers parameters
collectively), a blank input where it has nothing left. Undecodable samples are counted, not fatal.
Metrics: top-1 and top-5 accuracy (single-label), mean average precision over the classes that
have positives (multi-label, as Charades reports).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from pemt.data.decode import ClipSpec, DecodeError, mel_frames, video_to_float
from pemt.data.loader import decode_sample
from pemt.data.shard_sets import load_manifest, location
from pemt.data.storage import Retry
from pemt.data.stream import shard_samples

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _my_slots(
    folder: str,
    entries: list[dict[str, Any]],
    rank: int,
    world: int,
    max_samples: int | None,
    retry: Retry | None = None,
) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """Slot i of the folder (its manifest `entries` in order; a shard that ends early keeps its
    slots, empty) is rank i mod W's: (shard, raw sample or None, why there is none)."""
    index = 0
    for entry in entries:
        url = location(folder, entry["name"])
        for sample, error in shard_samples(url, int(entry["samples"]), retry, entry.get("bytes")):
            if max_samples is not None and index >= max_samples:
                return
            if index % world == rank:
                yield url, sample, error
            index += 1


def _slot_count(entries: list[dict[str, Any]], max_samples: int | None) -> int:
    total = sum(int(e["samples"]) for e in entries)
    return total if max_samples is None else min(total, max_samples)


def predict(
    score: Scorer,
    folder: str,
    spec: ClipSpec,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    max_samples: int | None = None,
    retry: Retry | None = None,
    cache_dir: str | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Collective. Every sample's key, labels and scores, and every failure, from all ranks.

    Batches are decoded as they are scored (a rank holds one batch, not its share of the set);
    every rank runs the same number of rounds, known from the manifest."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    entries = load_manifest(folder, cache_dir, retry).entries  # once: a remote manifest is a request
    rounds = math.ceil(math.ceil(_slot_count(entries, max_samples) / world) / batch_size)
    slots = _my_slots(folder, entries, rank, world, max_samples, retry)
    results, errors = [], []
    for _ in range(rounds):
        batch = []
        for url, sample, error in itertools.islice(slots, batch_size):
            if sample is None:
                errors.append({"shard": url, "key": None, "reason": error})
                continue
            try:
                batch.append(decode_sample(sample, spec, window_seed=None))
            except DecodeError as err:
                errors.append({"shard": url, "key": sample.get("__key__"), "reason": str(err)})
        if batch:
            video, audio = torch.stack([s["video"] for s in batch]), torch.stack([s["audio"] for s in batch])
        else:  # nothing decoded here: a blank input, so the collectives still match
            video = torch.zeros(1, spec.clips, 3, spec.frames_per_clip, spec.crop, spec.crop, dtype=torch.uint8)
            audio = torch.zeros(1, spec.clips, 1, spec.mel_bins, mel_frames(spec))
        scores = score(video_to_float(video, device, dtype), audio.to(device, dtype)).float().cpu()
        results += [{"key": s["key"], "labels": s["labels"], "scores": row.tolist()} for s, row in zip(batch, scores)]
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (results, errors))
        results = [r for part, _ in gathered for r in part]
        errors = [e for _, part in gathered for e in part]
    return sorted(results, key=lambda r: r["key"]), errors


def top_k_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(1).float().mean())


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """AP of one class: mean precision at the rank of each positive."""
    order = scores.argsort(descending=True)
    hits = positives[order].float()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean AP over the classes with at least one positive."""
    present = [c for c in range(targets.shape[1]) if targets[:, c].any()]
    if not present:
        raise ValueError("no positive labels in the evaluation set: mAP is undefined")
    return sum(average_precision(scores[:, c], targets[:, c].bool()) for c in present) / len(present)


def metrics(results: list[dict[str, Any]], classes: int, multi_label: bool) -> dict[str, float]:
    if not results:
        raise ValueError("no evaluation sample could be decoded")
    scores = torch.tensor([r["scores"] for r in results])
    if multi_label:
        targets = multi_hot([r["labels"] for r in results], classes)
        return {"test_map": 100.0 * mean_average_precision(scores, targets), "test_samples": len(results)}
    labels = torch.tensor([r["labels"][0] if r["labels"] else -1 for r in results])
    out = {"test_top1": 100.0 * top_k_accuracy(scores, labels, 1), "test_samples": len(results)}
    if classes > 5:
        out["test_top5"] = 100.0 * top_k_accuracy(scores, labels, 5)
    return out


def multi_hot(labels: list[list[int]], classes: int) -> torch.Tensor:
    targets = torch.zeros(len(labels), classes)
    for row, values in enumerate(labels):
        targets[row, values] = 1.0
    return targets
