"""The data workers' decoded-sample cache (`data.decoded_cache_mb`): it serves again only decodes
that drew nothing at random, so a run with it reads bitwise what a run without it reads."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from conftest import encode_video
from pemt.config import ConfigError, compose_config
from pemt.data.decode import WindowDraws, decode_clips
from pemt.data.decoded_cache import DecodedCache
from pemt.data.loader import build_loader, check_data, clip_spec
from pemt.data.synthetic import SyntheticSpec, generate

DATA = OmegaConf.create(
    {
        "clips": 2,
        "frames_per_clip": 2,
        "fps": 4,  # a 1 s window
        "crop": 16,
        "sample_rate": 16000,
        "mel_bins": 16,
        "mel_window_ms": 25,
        "mel_hop_ms": 10,
        "streams": 2,
        "shuffle_buffer": 2,
        "num_workers": 1,
    }
)
SPEC = clip_spec(DATA)
VIDEOS, BATCH, STEPS = 8, 4, 8  # 4 epochs
# a sample's uint8 frames + float32 log-mel (51 hops a clip)
SAMPLE_BYTES = 2 * 3 * 2 * 16 * 16 + 2 * 16 * 51 * 4


@pytest.mark.parametrize(
    ("seconds", "size", "drawn"),
    [(1.0, (32, 32), False), (1.0, (16, 16), False), (1.0, (48, 32), True), (3.0, (32, 32), True)],
    ids=["window-long square", "crop-sized", "wider than high", "longer than the window"],
)
def test_a_decode_says_whether_its_seed_mattered(seconds: float, size: tuple[int, int], drawn: bool) -> None:
    data = encode_video(seconds=seconds, size=size)
    decoded = []
    for seed in range(4):
        draws = WindowDraws(random.Random(seed))
        decoded.append(decode_clips(data, SPEC, draws))
        assert draws.seed_dependent == drawn
    same = all(torch.equal(d[k], decoded[0][k]) for d in decoded for k in ("video", "audio"))
    assert same != drawn, "a decode that drew nothing gives the same clips under any seed, and one that drew does not"
    centred = WindowDraws(None)
    decode_clips(data, SPEC, centred)
    assert not centred.seed_dependent, "the centred window and crop are one choice"


def _shards(root: Path, seconds: float) -> Path:
    return generate(SyntheticSpec(videos=VIDEOS, videos_per_shard=2, seconds=seconds, size=32), root, progress=False)


@pytest.fixture(scope="module")
def window_long(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Videos exactly as long as the window, with square frames: nothing to draw."""
    return _shards(tmp_path_factory.mktemp("cache") / "window-long", 1.0)


def _read(shards: Path, cache_mb: float, workers: int = 1) -> list[dict[str, Any]]:
    data = OmegaConf.merge(DATA, {"decoded_cache_mb": cache_mb, "num_workers": workers})
    loader = iter(build_loader(data, str(shards), BATCH, 0, 1, seed=3))
    return [next(loader) for _ in range(STEPS)]


def _same_batches(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return all(
        x["key"] == y["key"] and torch.equal(x["video"], y["video"]) and torch.equal(x["audio"], y["audio"])
        for x, y in zip(a, b, strict=True)
    )


@pytest.fixture(scope="module")
def uncached(window_long: Path) -> list[dict[str, Any]]:
    return _read(window_long, 0)


def test_samples_that_drew_nothing_are_decoded_once_and_served_bitwise_the_same(
    window_long: Path, uncached: list[dict[str, Any]]
) -> None:
    assert sum(b["cached"] for b in uncached) == 0
    cached = _read(window_long, 16)
    assert _same_batches(cached, uncached)
    # one worker: every sample is decoded the first time it comes, served from the cache after
    slots = sum(len(b["key"]) for b in cached)
    assert sum(b["cached"] for b in cached) == slots - VIDEOS
    two_workers = _read(window_long, 16, workers=2)
    assert _same_batches(two_workers, uncached)
    assert sum(b["cached"] for b in two_workers) > 0


def test_the_cache_keeps_what_fits_and_decodes_the_rest(window_long: Path, uncached: list[dict[str, Any]]) -> None:
    fits = 3
    cached = _read(window_long, (fits + 0.5) * SAMPLE_BYTES / 2**20)
    assert _same_batches(cached, uncached)
    seen: Counter[str] = Counter()
    served = 0
    for batch in cached:
        seen.update(batch["key"])
        served += batch["cached"]
    # only the first `fits` samples decoded are kept: each is served on its later visits
    first = list(dict.fromkeys(k for b in cached for k in b["key"]))[:fits]
    assert served == sum(seen[k] - 1 for k in first)

    cache = DecodedCache(SAMPLE_BYTES)
    sample = {"video": torch.zeros(SAMPLE_BYTES, dtype=torch.uint8)}
    assert cache.offer("a.tar", "k", sample) and not cache.offer("a.tar", "k2", sample)
    assert cache.get("a.tar", "k") is sample and cache.get("b.tar", "k") is None


def test_samples_with_a_drawn_window_keep_their_augmentation(tmp_path: Path) -> None:
    longer = _shards(tmp_path / "longer", 3.0)
    plain, cached = _read(longer, 0), _read(longer, 16)
    assert sum(b["cached"] for b in cached) == 0
    assert _same_batches(cached, plain)
    clips: dict[str, list[torch.Tensor]] = {}
    for batch in cached:
        for key, video in zip(batch["key"], batch["video"]):
            clips.setdefault(key, []).append(video)
    assert any(not torch.equal(v[0], v[1]) for v in clips.values() if len(v) > 1), "each epoch draws a new window"


@pytest.mark.parametrize("value", [-1, "lots", True])
def test_a_bad_cache_size_is_refused_naming_the_key(value: object) -> None:
    cfg = compose_config("pretrain", overrides=[f"data.decoded_cache_mb={str(value).lower()}"])
    with pytest.raises(ConfigError, match="data.decoded_cache_mb"):
        check_data(cfg)
