"""Existing WebDataset corpora read as they are: a folder of shards webdataset's ShardWriter wrote
(video2dataset's layout), a brace pattern (local, HTTP, S3) or a list file; the manifest built from
their headers, kept and reused, rebuilt when a shard changes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import describe, free_port, keys_by_step, run_launch
from pemt.data.shard_sets import BUILT_PREFIX, load_manifest
from pemt.data.storage import Retry
from pemt.data.stream import plan_from_manifest, stream_slots
from pemt.data.synthetic import SyntheticSpec, encode_mp4, render

VIDEOS, PER_SHARD, STREAMS = 16, 2, 8
FAST = Retry(attempts=2, backoff_s=0.05, timeout_s=10)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated mp4 files (h264 + aac) with a list for make_shards."""
    folder = tmp_path_factory.mktemp("corpus") / "videos"
    folder.mkdir()
    spec = SyntheticSpec(videos=VIDEOS, seconds=1.0, size=32)
    rows = []
    for index in range(VIDEOS):
        frames, audio, meta = render(spec, index)
        (folder / f"vid{index:03d}.mp4").write_bytes(encode_mp4(frames, audio, spec.source_fps, spec.sample_rate))
        rows.append({"path": f"vid{index:03d}.mp4", "label": meta["label"]})
    (folder / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def written(videos: Path) -> Path:
    """The videos as webdataset's own ShardWriter writes them, with video2dataset's fields."""
    import webdataset as wds

    out = videos.parent / "shardwriter"
    out.mkdir()
    labels = [json.loads(line)["label"] for line in (videos / "list.jsonl").read_text().splitlines()]
    with wds.ShardWriter(str(out / "part-%06d.tar"), maxcount=PER_SHARD, verbose=0) as writer:
        for index, label in enumerate(labels):
            key = f"vid{index:03d}"
            meta = {"key": key, "status": "success", "url": f"https://example.org/{key}", "duration": 1.0}
            writer.write(
                {
                    "__key__": key,
                    "mp4": (videos / f"{key}.mp4").read_bytes(),
                    "json": json.dumps({**meta, "label": label}).encode(),
                    "txt": f"a caption of {key}".encode(),
                }
            )
    return out


@pytest.fixture(scope="module")
def packed(videos: Path) -> Path:
    from pemt.data.ingest import make_shards

    out = videos.parent / "packed"
    make_shards(videos / "list.jsonl", out, max_samples=PER_SHARD, processes=1, progress=False)
    return out


def _keys(source: str, cache: Path, positions: int = 4) -> list[str]:
    plan = plan_from_manifest(source, STREAMS, seed=3, shuffle_buffer=2, retry=FAST, cache_dir=str(cache))
    keys = []
    for stream in range(STREAMS):
        slots = stream_slots(plan, stream, 0)
        keys += [next(slots).sample["__key__"] for _ in range(positions)]
    return keys


def test_a_shardwriter_folder_is_indexed_from_its_headers_and_kept_beside_it(written: Path, packed: Path) -> None:
    manifest = load_manifest(str(written))
    assert [e["samples"] for e in manifest.entries] == [PER_SHARD] * (VIDEOS // PER_SHARD)
    assert manifest.locations[0] == str(written / "part-000000.tar")
    [kept] = written.glob(f"{BUILT_PREFIX}*.json")
    before = kept.stat().st_mtime_ns
    assert load_manifest(str(written)).digest == manifest.digest and kept.stat().st_mtime_ns == before, "reused"
    assert _keys(str(written), written) == _keys(str(packed), packed), "the same order as make_shards' shards"


def test_patterns_and_list_files_name_the_same_shards(written: Path, tmp_path: Path) -> None:
    pattern = str(written / "part-{000000..000007}.tar")
    listing = tmp_path / "shards.txt"
    listing.write_text("# the corpus\n" + "".join(f"{written}/part-{i:06d}.tar\n" for i in range(8)))
    folder = _keys(str(written), tmp_path)
    assert _keys(pattern, tmp_path) == folder == _keys(str(listing), tmp_path)


def test_a_read_only_folder_keeps_its_index_in_the_cache_and_a_changed_shard_is_indexed_again(
    written: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from pemt.data import shard_sets

    corpus = tmp_path / "corpus"
    shutil.copytree(written, corpus, ignore=shutil.ignore_patterns(f"{BUILT_PREFIX}*"))
    monkeypatch.setattr(shard_sets, "_writable", lambda folder: Path(folder) != corpus)  # read-only (tests run as root)
    cache = tmp_path / "cache"
    first = load_manifest(str(corpus), cache)
    assert not list(corpus.glob(f"{BUILT_PREFIX}*")) and len(list((cache / "manifests").glob("*.json"))) == 1
    assert load_manifest(str(corpus), cache).digest == first.digest
    shard = corpus / "part-000007.tar"
    shard.write_bytes(shard.read_bytes()[:-1024] + b"\0" * 1024)  # rewritten: the same size, a new mtime
    os.utime(shard, ns=(1, 1))
    assert load_manifest(str(corpus), cache).digest != first.digest, "a changed shard is indexed again"


def test_a_sample_video2dataset_could_not_fetch_is_a_bad_sample_and_captions_ride_along(written: Path) -> None:
    from pemt.data.decode import ClipSpec, DecodeError
    from pemt.data.loader import decode_sample
    from pemt.data.stream import shard_samples

    sample, _ = next(shard_samples(str(written / "part-000000.tar"), PER_SHARD))
    spec = ClipSpec(
        clips=2, frames_per_clip=2, fps=4, crop=32, sample_rate=16000, mel_bins=16, mel_window_ms=25, mel_hop_ms=10
    )
    assert decode_sample(sample, spec, None)["caption"] == "a caption of vid000"
    failed = {**sample, "json": json.dumps({"status": "failed_to_download", "error_message": "HTTP 404"}).encode()}
    with pytest.raises(DecodeError, match="video2dataset status 'failed_to_download': HTTP 404"):
        decode_sample(failed, spec, None)


@pytest.fixture(scope="module")
def http(written: Path) -> Iterator[str]:
    from servers import FileServer

    server = FileServer(written.parent, free_port())
    yield f"{server.url}/{written.name}"
    server.stop()


@pytest.fixture(scope="module")
def s3(written: Path) -> Iterator[str]:
    from servers import S3Server, s3_environment

    server = S3Server(free_port())
    saved = dict(os.environ)
    os.environ.update(s3_environment(server.url))
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="corpus")
    for tar in sorted(written.glob("*.tar")):
        client.upload_file(str(tar), "corpus", f"k700/{tar.name}")
    yield "s3://corpus/k700"
    os.environ.clear()
    os.environ.update(saved)
    server.stop()


@pytest.mark.parametrize("where", ["http", "s3"])
def test_a_remote_brace_pattern_is_indexed_by_ranged_reads_and_read_in_the_same_order(
    where: str, http: str, s3: str, written: Path, tmp_path: Path
) -> None:
    base = http if where == "http" else s3
    remote = _keys(f"{base}/part-{{000000..000007}}.tar", tmp_path / "cache")
    assert remote == _keys(str(written), written)
    assert len(list((tmp_path / "cache" / "manifests").glob("*.json"))) == 1, "kept in the cache"
    if where == "s3":
        assert _keys(base, tmp_path / "listed") == remote, "an s3:// prefix of .tar files is listed"


@pytest.mark.slow
def test_a_shardwriter_folder_trains_with_the_order_of_the_packed_videos(
    written: Path, packed: Path, tmp_path: Path
) -> None:
    steps = ["train.max_steps=3", "train.record_samples=true", "train.checkpoint_every=3"]
    steps += ["mlflow.system_metrics=false"]
    result = run_launch(
        "pretrain.py", tmp_path, tmp_path / "cache", "data=shards", f"data.shards={written}", *steps, timeout=600
    )
    assert result.returncode == 0, describe(result)
    [run_dir] = [p.parent for p in (tmp_path / "pemt-pretrain").rglob("samples")]
    trained = keys_by_step(run_dir)
    plan = plan_from_manifest(str(packed), STREAMS, seed=0, shuffle_buffer=256)
    expected = {step: [] for step in trained}
    for stream in range(STREAMS):
        slots = stream_slots(plan, stream, 0)
        for step in sorted(expected):
            expected[step].append(next(slots).sample["__key__"])
    assert {s: sorted(k) for s, k in trained.items()} == {s: sorted(k) for s, k in expected.items()}
