"""The training stream: WebDataset shards in a resumable order, decoded with PyAV in workers.

Rank r reads its share of the virtual streams (see pemt.data.stream). Each micro-step takes
`per_stream` slots from each of them; with several workers, worker w decodes the micro-steps
w, w + N, ... and only reads past the others' slots, so batches arrive in step order. Samples
that cannot be decoded are dropped from their batch and reported with it (`errors`), never
raised: the trainer counts them and stops past `data.max_error_rate`.

What a worker holds: the index of each shard it is in (member names and offsets from the tar
headers), a shuffle buffer of such entries (`data.shuffle_buffer` samples, a few hundred bytes
each), one decode (its output plus the decoder's state, about a GOP) and the finished batches
waiting for the trainer (`prefetch_factor` per worker; frames stay uint8 until the device), and
for remote shards up to 32 MiB of the blocks it read last or reads ahead for its next batch
(pemt.data.remote_file). It reads only the samples it decodes, and of each only what its window
needs. With `data.decoded_cache_mb`, it also keeps up to that much of the decoded samples that
drew no random window or crop (pemt.data.decoded_cache).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pemt.config import ConfigError, one_of, positive_int, positive_number
from pemt.data.decode import ClipSpec, DecodeError, WindowDraws, decode_clips
from pemt.data.decoded_cache import DecodedCache
from pemt.data.members import member_bytes, member_size, member_source, read_ahead_samples
from pemt.data.metadata import MAX_METADATA_BYTES, parse_metadata
from pemt.data.storage import check_location, is_remote, retries_so_far, retry_from_config
from pemt.data.stream import Slot, StreamPlan, plan_from_manifest, stream_slots

# Sound stored beside (or instead of) the video, in the order they are looked for.
SOUND_MEMBERS = ("flac", "wav")


def clip_spec(data_cfg: DictConfig) -> ClipSpec:
    return ClipSpec(
        clips=data_cfg.clips,
        frames_per_clip=data_cfg.frames_per_clip,
        fps=data_cfg.fps,
        crop=data_cfg.crop,
        sample_rate=data_cfg.sample_rate,
        mel_bins=data_cfg.mel_bins,
        mel_window_ms=data_cfg.mel_window_ms,
        mel_hop_ms=data_cfg.mel_hop_ms,
        short_videos=data_cfg.get("short_videos", "loop"),
        decode_threads=int(data_cfg.get("decode_threads", 1)),
    )


def _decode(slot: Slot, spec: ClipSpec, seed: int, train: bool) -> tuple[dict[str, Any], WindowDraws]:
    assert slot.sample is not None  # empty slots are reported, not decoded
    # The random window and crop depend on the slot alone: the same on any rank or worker.
    draws = WindowDraws(random.Random(f"decode-{seed}-{slot.stream}-{slot.position}") if train else None)
    return decode_drawn(slot.sample, spec, draws), draws


def decode_sample(sample: dict[str, Any], spec: ClipSpec, window_seed: str | None) -> dict[str, Any]:
    """A raw WebDataset sample (members as bytes, or as pemt.data.members.Member windows onto
    the shard) -> key, labels and clips. `window_seed` draws the random window and crop
    (training); None takes the centred ones."""
    return decode_drawn(sample, spec, WindowDraws(random.Random(window_seed) if window_seed is not None else None))


def decode_drawn(sample: dict[str, Any], spec: ClipSpec, draws: WindowDraws) -> dict[str, Any]:
    """decode_sample with the window and crop from `draws`, which then say whether they mattered."""
    sound = next((sample[k] for k in SOUND_MEMBERS if k in sample), None)
    if "mp4" not in sample and sound is None:
        raise DecodeError(f"no .mp4 or sound member (has {sorted(k for k in sample if not k.startswith('__'))})")
    meta = {"label": -1, "labels": []}
    if "json" in sample:
        if member_size(sample["json"]) > MAX_METADATA_BYTES:
            raise DecodeError(f"json metadata of {member_size(sample['json'])} bytes (at most {MAX_METADATA_BYTES})")
        meta = parse_metadata(member_bytes(sample["json"]))
    # video2dataset records the samples it could not fetch or decode with a status of their own
    if str(meta.get("status", "success")) != "success":
        raise DecodeError(f"video2dataset status {meta['status']!r}: {str(meta.get('error_message', ''))[:200]}")
    caption = member_bytes(sample["txt"]).decode(errors="replace") if "txt" in sample else None
    with contextlib.ExitStack() as opened:
        video = opened.enter_context(member_source(sample["mp4"])) if "mp4" in sample else None
        audio = opened.enter_context(member_source(sound)) if sound is not None else None
        clips = decode_clips(video, spec, draws, audio_data=audio)
    return {"key": sample["__key__"], "label": meta["label"], "labels": meta["labels"], "caption": caption, **clips}


class StreamDataset(IterableDataset[dict[str, Any]]):
    """Micro-batches of one rank from micro-step `start` on, in step order, without end."""

    def __init__(
        self,
        plan: StreamPlan,
        streams: list[int],
        per_stream: int,
        start: int,
        spec: ClipSpec,
        train: bool = True,
        check: Callable[[dict[str, Any]], None] | None = None,
        read_ahead: bool = True,
        cache_bytes: int = 0,
    ) -> None:
        super().__init__()
        self.plan, self.streams, self.per_stream = plan, streams, per_stream
        self.start, self.spec, self.train, self.check = start, spec, train, check
        self.read_ahead, self.cache_bytes = read_ahead, cache_bytes
        self.cache: DecodedCache | None = None  # made in the worker that fills it

    def _own_steps(self) -> Iterator[tuple[int, list[Slot]]]:
        """This worker's micro-steps and their slots; the other workers' slots are passed over (their
        index entries only: nothing of them is read)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        slots = {v: stream_slots(self.plan, v, self.start * self.per_stream) for v in self.streams}
        micro = self.start
        while True:
            step = [next(slots[v]) for v in self.streams for _ in range(self.per_stream)]
            if (micro - self.start) % workers == worker:
                yield micro, step
            micro += 1

    def _decode_slots(self, slots: list[Slot]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float, int]:
        samples, errors, decode_s, cached = [], [], 0.0, 0
        for slot in slots:
            if slot.sample is None:
                errors.append({"shard": slot.shard, "key": None, "reason": slot.error})
                continue
            began = time.perf_counter()
            key = str(slot.sample.get("__key__"))
            kept = self.cache.get(slot.shard, key) if self.cache is not None else None
            if kept is not None:  # checked when it was decoded
                samples.append(kept)
                cached += 1
                decode_s += time.perf_counter() - began
                continue
            try:
                sample, draws = _decode(slot, self.spec, self.plan.seed, self.train)
                if self.check is not None:
                    self.check(sample)
                samples.append(sample)
                if self.cache is not None and not draws.seed_dependent:
                    self.cache.offer(slot.shard, key, sample)
            except DecodeError as err:
                errors.append({"shard": slot.shard, "key": slot.sample.get("__key__"), "reason": str(err)})
            except Exception as err:  # noqa: BLE001 - whatever one sample does, it is one bad sample
                errors.append(
                    {
                        "shard": slot.shard,
                        "key": slot.sample.get("__key__"),
                        "reason": f"{type(err).__name__}: {str(err)[:300]}",
                    }
                )
            decode_s += time.perf_counter() - began
        return samples, errors, decode_s, cached

    def _read_ahead(self, slots: list[Slot]) -> None:
        if self.read_ahead:
            read_ahead_samples([slot.sample for slot in slots if slot.sample])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        retried = retries_so_far()
        self.cache = DecodedCache(self.cache_bytes) if self.cache_bytes else None
        steps = self._own_steps()
        upcoming = next(steps)
        self._read_ahead(upcoming[1])
        while True:
            micro, slots = upcoming
            # The next batch's remote members are fetched while this one decodes.
            upcoming = next(steps)
            self._read_ahead(upcoming[1])
            samples, errors, decode_s, cached = self._decode_slots(slots)
            batch = _collate(samples, errors, micro, decode_s)
            batch["cached"] = cached
            # remote reads tried again by this worker since its last batch (its skipped steps' included)
            now = retries_so_far()
            batch["retries"], retried = now - retried, now
            yield batch


def _collate(
    samples: list[dict[str, Any]], errors: list[dict[str, Any]], micro: int, decode_s: float = 0.0
) -> dict[str, Any]:
    batch = {
        "micro_step": micro,
        "key": [s["key"] for s in samples],
        "errors": errors,
        "slots": len(samples) + len(errors),
        "decode_s": decode_s,
    }
    if samples:
        batch["label"] = torch.tensor([s["label"] for s in samples])
        batch["labels"] = [s["labels"] for s in samples]  # every label of each sample (multi-label)
        batch["caption"] = [s["caption"] for s in samples]  # a video2dataset caption (.txt), or None
        batch["video"] = torch.stack([s["video"] for s in samples])  # uint8: video_to_float on the device
        batch["audio"] = torch.stack([s["audio"] for s in samples])
    return batch


def stream_layout(streams: int, rank: int, world_size: int, micro_batch: int) -> tuple[list[int], int]:
    """This rank's virtual streams and how many slots each gives per micro-step."""
    if streams % world_size:
        raise ValueError(f"data.streams={streams} is not divisible by world size {world_size}")
    mine = streams // world_size
    if micro_batch % mine:
        raise ValueError(
            f"micro batch {micro_batch} is not divisible by the {mine} streams per rank "
            f"(data.streams={streams} over {world_size} ranks)"
        )
    return list(range(rank * mine, (rank + 1) * mine)), micro_batch // mine


def build_loader(
    data_cfg: DictConfig,
    shards: str,
    micro_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    start_micro_step: int = 0,
    check: Callable[[dict[str, Any]], None] | None = None,
    cache_dir: str | None = None,
) -> DataLoader[dict[str, Any]]:
    """This rank's endless loader, resuming at `start_micro_step`. `check` (picklable: it runs in
    the workers) raises DecodeError for a decoded sample the task cannot use (a label out of range).
    `cache_dir`: where a shard set without manifest.json keeps the one built for it."""
    plan = plan_from_manifest(
        shards, int(data_cfg.streams), seed, int(data_cfg.shuffle_buffer), retry_from_config(data_cfg), cache_dir
    )
    streams, per_stream = stream_layout(plan.streams, rank, world_size, micro_batch)
    # local members are read from the page cache: nothing to fetch ahead, no work per batch
    read_ahead = is_remote(shards) and bool(OmegaConf.select(data_cfg, "remote.read_ahead", default=True))
    dataset = StreamDataset(
        plan,
        streams,
        per_stream,
        start_micro_step,
        clip_spec(data_cfg),
        check=check,
        read_ahead=read_ahead,
        cache_bytes=int(float(data_cfg.get("decoded_cache_mb", 0)) * 2**20),
    )
    workers = int(data_cfg.num_workers)
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        # Video decoders in forked workers can deadlock; forkserver starts them clean.
        multiprocessing_context="forkserver" if workers else None,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
        # Its own generator: starting an iterator must not draw from the global torch RNG,
        # or a resumed run's random stream would differ from an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
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


def check_data(cfg: DictConfig) -> None:
    """The `data.*` keys the loader reads."""
    for key in ("data.clips", "data.frames_per_clip", "data.streams"):
        positive_int(cfg, key)
    world = int(cfg.nodes) * int(cfg.gpus_per_node)
    if int(cfg.data.streams) % world:
        raise ConfigError(
            f"data.streams={cfg.data.streams} is not divisible by world size {world}; "
            "choose a multiple of nodes x gpus_per_node"
        )
    accum = int(cfg.train.grad_accum_steps)
    if cfg.train.global_batch_size % (int(cfg.data.streams) * accum):
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by data.streams="
            f"{cfg.data.streams} x train.grad_accum_steps={accum}: every stream gives the same number of "
            "samples to each step"
        )
    one_of(cfg, "data.short_videos", ("loop", "pad"))
    cache_mb = OmegaConf.select(cfg, "data.decoded_cache_mb", default=0)
    if isinstance(cache_mb, bool) or not isinstance(cache_mb, (int, float)) or cache_mb < 0:
        raise ConfigError(f"data.decoded_cache_mb={cache_mb!r}: give megabytes per data worker, >= 0 (0: off)")
    if cfg.data.name != "synthetic" and not cfg.data.shards:
        raise ConfigError("data.shards is not set: give a shard folder with its manifest.json")
    positive_int(cfg, "data.remote.attempts")
    positive_number(cfg, "data.remote.backoff_s")
    positive_number(cfg, "data.remote.timeout_s")
    one_of(cfg, "data.remote.read_ahead", (True, False))
    for key in ("data.shards", "eval.shards"):
        try:
            check_location(str(OmegaConf.select(cfg, key) or ""), key)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if cfg.data.name == "synthetic" and is_remote(str(cfg.data.shards or "")):
        raise ConfigError(
            f"data.shards={cfg.data.shards}: data=synthetic writes its shards to a local folder; "
            "upload them (tools/upload_shards.py) and read them with data=shards"
        )
    if cfg.data.name == "synthetic":
        from pemt.data.synthetic import spec_from_config

        try:
            spec_from_config(cfg)
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None
