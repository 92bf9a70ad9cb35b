"""One pass over a held-out shard folder, spread over the ranks, and its metrics.

Sample i of the folder (in manifest order) goes to rank i mod W and is decoded with the centred
window and crop. Every rank runs the same number of forward passes (ZeRO-3 gathers parameters
collectively), padding with repeats that are dropped. Undecodable samples are counted, not fatal.
Metrics: top-1 and top-5 accuracy (single-label), mean average precision over the classes that
have positives (multi-label, as Charades reports).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import webdataset as wds

from pemt.data.decode import ClipSpec, DecodeError
from pemt.data.loader import decode_sample
from pemt.data.shards import read_manifest

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _samples(folder: str) -> Iterator[tuple[str, dict | None, str | None]]:
    from pathlib import Path

    for entry in read_manifest(folder):
        url = str(Path(folder) / entry["name"])
        try:
            for sample in wds.tarfile_to_samples()([{"url": url}]):
                yield url, sample, None
        except Exception as err:  # noqa: BLE001 - a corrupt shard is reported, the rest evaluated
            yield url, None, f"unreadable shard: {err}"


def _batches(folder: str, spec: ClipSpec, rank: int, world: int, batch_size: int, max_samples: int | None
             ) -> tuple[list[dict], list[dict]]:
    """This rank's decoded samples grouped in batches, and the samples that failed."""
    mine, errors = [], []
    index = 0
    for url, sample, error in _samples(folder):
        if max_samples is not None and index >= max_samples:
            break
        if error is not None:
            errors.append({"shard": url, "key": None, "reason": error})
            continue
        if index % world == rank:
            try:
                mine.append(decode_sample(sample, spec, window_seed=None))
            except DecodeError as err:
                errors.append({"shard": url, "key": sample.get("__key__"), "reason": str(err)})
        index += 1
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)], errors


def _count_to_all(count: int, device: torch.device) -> int:
    if not dist.is_initialized():
        return count
    value = torch.tensor([count], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def predict(score: Scorer, folder: str, spec: ClipSpec, device: torch.device, dtype: torch.dtype,
            batch_size: int, max_samples: int | None = None) -> tuple[list[dict], list[dict]]:
    """Collective. Every sample's key, labels and scores, and every failure, from all ranks."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    batches, errors = _batches(folder, spec, rank, world, batch_size, max_samples)
    rounds = _count_to_all(len(batches), device)
    results = []
    for i in range(rounds):
        batch = batches[min(i, len(batches) - 1)] if batches else None
        if batch is None:  # nothing decoded here: run a blank input so the collectives still match
            video = torch.zeros(1, spec.clips, 3, spec.frames_per_clip, spec.crop, spec.crop)
            audio = torch.zeros(1, spec.clips, 1, spec.mel_bins, _mel_frames(spec))
        else:
            video, audio = torch.stack([s["video"] for s in batch]), torch.stack([s["audio"] for s in batch])
        scores = score(video.to(device, dtype), audio.to(device, dtype)).float().cpu()
        if batch is not None and i < len(batches):
            results += [{"key": s["key"], "labels": s["labels"], "scores": row.tolist()} for s, row in zip(batch, scores)]
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (results, errors))
        results = [r for part, _ in gathered for r in part]
        errors = [e for _, part in gathered for e in part]
    return sorted(results, key=lambda r: r["key"]), errors


def _mel_frames(spec: ClipSpec) -> int:
    hop = int(round(spec.sample_rate * spec.mel_hop_ms / 1000))
    return int(round(spec.clip_seconds * spec.sample_rate)) // hop + 1


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


def metrics(results: list[dict], classes: int, multi_label: bool) -> dict[str, float]:
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
