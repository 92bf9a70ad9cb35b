"""The training stream: WebDataset shards, split by node and worker, decoded with PyAV.

Each rank reads its own shards (split by node, then by worker) and cycles through them
without end, reshuffled on every pass, so every rank yields as many batches as the trainer
asks for however unevenly the shards divide: no rank runs dry and hangs the others.
"""

from __future__ import annotations

import json
import random
from typing import Iterator

import torch
import webdataset as wds
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from pemt.data.decode import ClipSpec, decode_clips
from pemt.data.shards import list_shards


def clip_spec(data_cfg: DictConfig) -> ClipSpec:
    return ClipSpec(
        clips=data_cfg.clips, frames_per_clip=data_cfg.frames_per_clip, fps=data_cfg.fps,
        crop=data_cfg.crop, sample_rate=data_cfg.sample_rate, mel_bins=data_cfg.mel_bins,
        mel_window_ms=data_cfg.mel_window_ms, mel_hop_ms=data_cfg.mel_hop_ms,
    )


class _CycleShards:
    """Pipeline stage: repeat this worker's shard list forever, reshuffled each pass."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        shards = list(src)
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"shards-{self.seed}-{rank}-{worker}")
        while shards:
            rng.shuffle(shards)
            yield from shards


class _Decode:
    def __init__(self, spec: ClipSpec, seed: int) -> None:
        self.spec = spec
        self.seed = seed
        self.rng: random.Random | None = None

    def __call__(self, sample: dict) -> dict:
        if self.rng is None:  # seeded per worker, in the worker
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            self.rng = random.Random(f"decode-{self.seed}-{rank}-{worker}")
        clips = decode_clips(sample["mp4"], self.spec, self.rng)
        meta = json.loads(sample["json"]) if "json" in sample else {}
        return {"key": sample["__key__"], "label": int(meta.get("label", -1)), **clips}


def _collate(samples: list[dict]) -> dict:
    return {
        "key": [s["key"] for s in samples],
        "label": torch.tensor([s["label"] for s in samples]),
        "video": torch.stack([s["video"] for s in samples]),
        "audio": torch.stack([s["audio"] for s in samples]),
    }


def build_loader(data_cfg: DictConfig, shards: str, batch_size: int, world_size: int,
                 seed: int) -> DataLoader:
    """An endless loader of `batch_size` batches for this rank (rank from RANK/WORLD_SIZE)."""
    urls = list_shards(shards)
    workers = int(data_cfg.num_workers)
    if len(urls) < world_size * max(1, workers):
        raise ValueError(
            f"{shards}: {len(urls)} shards for {world_size} ranks x {max(1, workers)} workers; "
            "every worker needs at least one shard (write smaller shards or lower data.num_workers)"
        )
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_node,
        wds.split_by_worker,
        _CycleShards(seed),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(int(data_cfg.shuffle_buffer), rng=random.Random(seed)),
        wds.map(_Decode(clip_spec(data_cfg), seed), handler=wds.warn_and_continue),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    )
    return DataLoader(
        pipeline, batch_size=None, num_workers=workers,
        # Video decoders in forked workers can deadlock; forkserver starts them clean.
        multiprocessing_context="forkserver" if workers else None,
        persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
    )


def shard_source(cfg: DictConfig) -> str:
    """The shards this run reads: the configured ones, or the generated synthetic set."""
    if cfg.data.name != "synthetic":
        return str(cfg.data.shards)
    from pemt.data.synthetic import shard_dir

    folder = shard_dir(cfg)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"synthetic shards missing at {folder}: launch through launch/pretrain.py, which "
            "generates them, or run tools/make_synthetic.py"
        )
    return str(folder)
