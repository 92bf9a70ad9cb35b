"""The resumable stream: exact resume across world sizes, even ranks, bad data counted."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pemt.data.errors import BadSamples, DataError
from pemt.data.loader import build_loader
from pemt.data.shards import write_shards
from pemt.data.stream import plan_from_manifest, stream_slots
from pemt.data.synthetic import SyntheticSpec, generate, make_sample

DATA = OmegaConf.create(
    {
        "clips": 2,
        "frames_per_clip": 2,
        "fps": 4,
        "crop": 16,
        "sample_rate": 16000,
        "mel_bins": 16,
        "mel_window_ms": 25,
        "mel_hop_ms": 10,
        "streams": 4,
        "shuffle_buffer": 2,
        "num_workers": 2,
    }
)
GLOBAL_BATCH = 4
STEPS = 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 9 shards of 2 over 4 streams: streams of unequal length (6, 4, 4, 4 samples).
    spec = SyntheticSpec(videos=18, videos_per_shard=2, seconds=1.0, size=32)
    return generate(spec, tmp_path_factory.mktemp("stream") / "set", progress=False)


def _steps(shards: Path, world: int, start: int, stop: int, workers: int = 2) -> list[Counter]:
    """Keys each global step consumed, over all ranks of a `world`-rank job."""
    data = OmegaConf.merge(DATA, {"num_workers": workers})
    per_step = [Counter() for _ in range(start, stop)]
    for rank in range(world):
        loader = iter(
            build_loader(data, str(shards), GLOBAL_BATCH // world, rank, world, seed=7, start_micro_step=start)
        )
        for i in range(stop - start):
            batch = next(loader)
            assert batch["micro_step"] == start + i, "batches arrive in step order"
            assert not batch["errors"]
            per_step[i].update(batch["key"])
    return per_step


@pytest.fixture(scope="module")
def uninterrupted(shards: Path) -> list[Counter]:
    return _steps(shards, world=2, start=0, stop=STEPS)


@pytest.mark.parametrize(("before", "after"), [(2, 2), (2, 1), (1, 2)])
def test_resumed_stream_equals_uninterrupted(
    shards: Path, uninterrupted: list[Counter], before: int, after: int
) -> None:
    resumed = _steps(shards, before, 0, 3) + _steps(shards, after, 3, STEPS)
    assert resumed == uninterrupted


def test_every_step_is_full_and_the_same_at_any_world_size(shards: Path, uninterrupted: list[Counter]) -> None:
    assert all(sum(step.values()) == GLOBAL_BATCH for step in uninterrupted)
    assert _steps(shards, world=4, start=0, stop=STEPS, workers=0) == uninterrupted


def test_each_stream_epoch_sees_its_samples_once(shards: Path) -> None:
    plan = plan_from_manifest(str(shards), streams=4, seed=7, shuffle_buffer=2)
    everything = []
    for stream in range(4):
        length = plan.epoch_length(stream)
        slots = stream_slots(plan, stream, 0)
        epoch = [next(slots).sample["__key__"] for _ in range(length)]
        assert len(set(epoch)) == length
        second = [next(slots).sample["__key__"] for _ in range(length)]
        assert set(second) == set(epoch) and second != epoch, "next epoch: same samples, new order"
        everything += epoch
    assert sorted(everything) == [f"synthetic-{i:06d}" for i in range(18)]


def test_too_few_shards_for_the_streams_is_a_clear_error(tmp_path: Path) -> None:
    few = generate(SyntheticSpec(videos=2, videos_per_shard=2, seconds=1.0), tmp_path / "set", progress=False)
    with pytest.raises(ValueError, match="1 shards for data.streams=4"):
        build_loader(DATA, str(few), 2, 0, 2, seed=0)


def test_each_kind_of_damage_is_skipped_and_counted(damaged_shards: Path) -> None:
    data = OmegaConf.merge(DATA, {"streams": 1, "num_workers": 0})
    loader = iter(build_loader(data, str(damaged_shards), 4, 0, 1, seed=0))
    errors, keys = [], []
    for _ in range(3):  # one epoch: 12 slots
        batch = next(loader)
        errors += batch["errors"]
        keys += batch["key"]
    reasons = " | ".join(e["reason"] for e in errors)
    assert "undecodable video" in reasons or "no video frames" in reasons
    assert "no audio track" in reasons
    assert "malformed json metadata" in reasons
    assert "unreadable shard" in reasons or "manifest says 4" in reasons
    assert len(keys) + len(errors) == 12
    assert {"synthetic-000000", "synthetic-000004", "synthetic-000005"} <= set(keys)


def test_error_rate_threshold_stops_with_shard_names(damaged_shards: Path) -> None:
    data = OmegaConf.merge(DATA, {"streams": 1, "num_workers": 0})
    bad = BadSamples(max_error_rate=0.1, min_slots=8)
    loader = iter(build_loader(data, str(damaged_shards), 4, 0, 1, seed=0))
    for _ in range(3):
        bad.add(next(loader))
    with pytest.raises(DataError, match=r"shard-00000\d\.tar") as caught:
        bad.check(bad.errors, bad.slots)
    assert "data.max_error_rate=0.1" in str(caught.value)
    BadSamples(max_error_rate=0.9, min_slots=8).check(bad.errors, bad.slots)  # under the limit: fine


def _claim_size(tar: Path, member: str, size: int) -> None:
    """Rewrite one member's tar header to claim `size` bytes (base-256, checksum fixed)."""
    import tarfile

    with tarfile.open(tar) as handle:
        offset = handle.getmember(member).offset
    data = bytearray(tar.read_bytes())
    header = data[offset : offset + 512]
    header[124:136] = bytes([0x80]) + size.to_bytes(11, "big")
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}".encode() + b"\0 "
    data[offset : offset + 512] = header
    tar.write_bytes(bytes(data))


def test_metadata_and_members_that_would_crash_are_counted_bad_samples(tmp_path: Path) -> None:
    spec = SyntheticSpec(videos=10, seconds=1.0, size=32)
    good = [make_sample(spec, i) for i in range(10)]
    metadata = {
        "a list": b"[1, 2]",
        "null": b"null",
        "deep nesting": b"[" * 100_000 + b"]" * 100_000,
        "1e400": b'{"label": 1e400}',
        "a string label": b'{"label": "cat"}',
        "a negative class": b'{"labels": [1, -3]}',
        "two megabytes": b'{"x": "' + b"y" * (2 << 20) + b'"}',
    }
    samples = [dict(good[i], json=raw) for i, raw in enumerate(metadata.values())] + good[7:]
    out = tmp_path / "set"
    write_shards(iter(samples), out, samples_per_shard=5)
    # the second shard's last video's header claims a terabyte of extended header
    _claim_size(out / "shard-000001.tar", "synthetic-000009.mp4", 2**40)
    data = OmegaConf.merge(DATA, {"streams": 1, "num_workers": 0})
    loader = iter(build_loader(data, str(out), 5, 0, 1, seed=0))
    batches = [next(loader) for _ in range(2)]
    keys = [k for b in batches for k in b["key"]]
    reasons = [e["reason"] for b in batches for e in b["errors"]]
    assert sorted(keys) == ["synthetic-000007", "synthetic-000008"], reasons
    assert len(reasons) == 8
    text = " | ".join(reasons)
    for expected in (
        "is list, not an object",
        "is NoneType",
        "RecursionError",
        "1e400|inf",
        "'cat'",
        "-3",
        r"bytes \(at most",
        "unreadable shard after 4 samples",
    ):
        assert re.search(expected, text), f"{expected!r} not in {text}"


def test_a_label_the_task_cannot_take_is_a_counted_bad_sample(tmp_path: Path) -> None:
    from pemt.downstream.task import LabelCheck

    spec = SyntheticSpec(videos=4, seconds=1.0, size=32)
    samples = [make_sample(spec, i) for i in range(4)]
    samples[1]["json"] = b'{"label": 7}'
    write_shards(iter(samples), tmp_path / "set", samples_per_shard=4)
    data = OmegaConf.merge(DATA, {"streams": 1, "num_workers": 0})
    batch = next(iter(build_loader(data, str(tmp_path / "set"), 4, 0, 1, seed=0, check=LabelCheck(4, False))))
    assert len(batch["key"]) == 3 and batch["label"].max() < 4
    [error] = batch["errors"]
    assert error["key"] == "synthetic-000001" and "label(s) [7] outside 0..3" in error["reason"]
