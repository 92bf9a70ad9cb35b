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
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_shards.py"), str(videos), str(tmp_path / "out"), "--samples", "3"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
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


def test_list_labels_and_other_columns_reach_the_samples(videos: Path, tmp_path: Path) -> None:
    import webdataset as wds

    listing = tmp_path / "list.csv"
    listing.write_text(f"path,label,speaker\n{videos}/a/clip0.mp4,3,ann\n{videos}/b/clip5.mp4,0,bob\n")
    manifest = make_shards(listing, tmp_path / "out", max_mb=100, progress=False)
    assert manifest["samples"] == 2 and len(manifest["shards"]) == 1
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text(json.dumps({"path": f"{videos}/a/clip0.mp4", "label": 0, "shown": [0, 4, 0]}) + "\n")
    make_shards(jsonl, tmp_path / "out_jsonl", max_samples=4, progress=False)
    metas = [
        json.loads(sample["json"])
        for out in ("out", "out_jsonl")
        for sample in wds.WebDataset(str(tmp_path / out / "shard-000000.tar"), shardshuffle=False)
    ]
    # class 0 is kept as a label (not taken for "no label"); other columns ride along as given
    assert [(m["label"], m.get("speaker"), m.get("shown")) for m in metas] == [
        (3, "ann", None),
        (0, "bob", None),
        (0, None, [0, 4, 0]),
    ]


def test_separate_flac_is_packed_and_decoded(tmp_path: Path) -> None:
    import av
    import numpy as np

    from conftest import video_without_audio
    from pemt.data.decode import ClipSpec
    from pemt.data.loader import decode_sample

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
    out = decode_sample(sample, spec, window_seed=None)
    assert out["audio"].shape[0] == 2 and out["audio"].max() > -5, "the tone is there"


def test_transcoding_while_packing_makes_small_seekable_videos(videos: Path, tmp_path: Path) -> None:
    import io

    import av

    from pemt.data.shards import transform_warnings

    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "make_shards.py"),
            str(videos),
            str(out),
            "--samples",
            "4",
            "--short-side",
            "16",
            "--fps",
            "8",
            "--sample-rate",
            "8000",
            "--keep-original",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 7 and manifest["transcode"]["short_side"] == 16
    assert manifest["transcode"]["fps"] == 8 and manifest["transcode"]["sound"] == "aac"
    plan = plan_from_manifest(str(out), streams=1, seed=0, shuffle_buffer=1)
    sample = next(stream_slots(plan, 0, 0)).sample
    with av.open(io.BytesIO(sample["mp4"].read())) as container:
        video, sound = container.streams.video[0], container.streams.audio[0]
        assert (video.width, video.height) == (16, 16) and video.average_rate == 8 and sound.rate == 8000
        keyframes = [e.timestamp * video.time_base for e in video.index_entries if e.flags & 1]
        assert len(keyframes) >= 1 and all(b - a <= 1 for a, b in zip(keyframes, keyframes[1:]))
    assert "original.mp4" in sample, "--keep-original stores the source too"
    meta = json.loads(sample["json"].read())
    assert meta["fps"] == 8 and meta["width"] == 16
    ask = {"crop": 32, "fps": 16, "sample_rate": 16000}
    warned = " | ".join(transform_warnings(out, type("Data", (), ask)))
    assert "upscaled" in warned and "repeat" in warned and "8000 Hz" in warned
    assert not transform_warnings(out, type("Data", (), {"crop": 16, "fps": 8, "sample_rate": 8000}))


def test_another_grouping_is_refused_or_restarted(videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    make_shards(videos, out, max_samples=2, progress=False)
    with pytest.raises(ValueError, match="samples_per_shard.*--restart"):
        make_shards(videos, out, max_samples=3, progress=False)
    manifest = make_shards(videos, out, max_samples=3, progress=False, restart=True)
    assert [s["samples"] for s in manifest["shards"]] == [3, 2, 2]
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [f"shard-00000{i}.tar" for i in range(3)]


def test_distinct_inputs_never_share_a_key(tmp_path: Path) -> None:
    spec = SyntheticSpec(videos=4, seconds=1.0, size=32)
    names = ["a/b.mp4", "a__b.mp4", "a.b.mp4", "a_b.mp4"]
    for i, name in enumerate(names):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(make_sample(spec, i)["mp4"])
    make_shards(tmp_path / "in", tmp_path / "out", max_samples=8, progress=False)
    keys = _keys(tmp_path / "out")
    assert len(set(keys)) == 4 and all("." not in k for k in keys), keys
