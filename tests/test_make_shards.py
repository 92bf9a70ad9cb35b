"""tools/make_shards.py: folders and lists of videos to shards, restartable."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from pemt.data.ingest import make_shards
from pemt.data.stream import plan_from_manifest, stream_slots
from pemt.data.synthetic import SyntheticSpec, make_sample


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    spec = SyntheticSpec(videos=7, seconds=1.0, size=32)
    for i in range(7):
        (folder / ("a" if i < 4 else "b")).mkdir(exist_ok=True)
        (folder / ("a" if i < 4 else "b") / f"clip{i}.mp4").write_bytes(make_sample(spec, i)["mp4"])
    (folder / "b" / "broken.mp4").write_bytes(b"not a video at all")
    return folder


def _keys(out: Path) -> list[str]:
    plan = plan_from_manifest(str(out), streams=1, seed=0, shuffle_buffer=1)
    slots = stream_slots(plan, 0, 0)
    return [next(slots).sample["__key__"] for _ in range(plan.epoch_length(0))]


def test_folder_to_shards_with_manifest_and_skips(videos: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), str(videos),
                             str(tmp_path / "out"), "--samples", "3"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 7 and manifest["skipped"] == 1
    assert [s["samples"] for s in manifest["shards"]] == [3, 2, 2]  # the broken file left a gap
    for entry in manifest["shards"]:
        data = (out / entry["name"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    [skipped] = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert skipped["path"].endswith("broken.mp4") and "unreadable video" in skipped["reason"]
    assert sorted(_keys(out)) == sorted([f"a__clip{i}" for i in range(4)] + [f"b__clip{i}" for i in range(4, 7)])


def test_interrupted_run_finishes_without_duplicates(videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    make_shards(videos, out, max_samples=2, processes=2, progress=False)
    first = sorted(_keys(out))
    # Interrupt: the last shard never finished (a partial file, no progress line), the
    # progress file ends mid-line.
    progress = (out / "progress.jsonl").read_text().splitlines()
    last = json.loads(progress[-1])
    (out / last["shard"]["name"]).rename(out / f".{last['shard']['name']}.partial")
    (out / "progress.jsonl").write_text("\n".join(progress[:-1]) + '\n{"index": 9, "sha')
    (out / "manifest.json").unlink()
    kept = {p.name: os.path.getmtime(p) for p in out.glob("shard-*.tar")}
    make_shards(videos, out, max_samples=2, processes=2, progress=False)
    assert sorted(_keys(out)) == first
    assert {p.name: os.path.getmtime(p) for p in out.glob("shard-*.tar") if p.name in kept} == kept
    assert not list(out.glob(".*.partial"))


def test_csv_list_with_labels(videos: Path, tmp_path: Path) -> None:
    listing = tmp_path / "list.csv"
    listing.write_text(f"path,label\n{videos}/a/clip0.mp4,3\n{videos}/b/clip5.mp4,1\n")
    manifest = make_shards(listing, tmp_path / "out", max_mb=100, progress=False)
    assert manifest["samples"] == 2 and len(manifest["shards"]) == 1


def test_separate_flac_is_packed_and_decoded(tmp_path: Path) -> None:
    import av
    import numpy as np

    from conftest import video_without_audio
    from pemt.data.decode import ClipSpec, decode_clips

    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "silent.mp4").write_bytes(video_without_audio())
    with av.open(str(folder / "silent.flac"), mode="w") as container:
        stream = container.add_stream("flac", rate=16000, layout="mono")
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray((tone * 32767).astype(np.int16)[None, :], format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    make_shards(folder, tmp_path / "out", max_samples=4, progress=False)
    plan = plan_from_manifest(str(tmp_path / "out"), streams=1, seed=0, shuffle_buffer=1)
    sample = next(stream_slots(plan, 0, 0)).sample
    assert "flac" in sample
    spec = ClipSpec(2, 2, 4, 16, 16000, 16, 25, 10)
    out = decode_clips(sample["mp4"], spec, None, audio_data=sample["flac"])
    assert out["audio"].shape[0] == 2 and out["audio"].max() > -5, "the tone is there"
