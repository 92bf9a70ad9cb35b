"""Synthetic mp4 generation, PyAV decoding and the sharded stream."""

from __future__ import annotations

import dataclasses
import io
import os
import random
from pathlib import Path

import av
import pytest
import torch

from conftest import video_without_audio
from pemt.data.decode import ClipSpec, DecodeError, decode_clips, log_mel
from pemt.data.shards import read_manifest
from pemt.data.synthetic import SyntheticSpec, encode_mp4, generate, make_sample, render

SPEC = ClipSpec(
    clips=4, frames_per_clip=4, fps=8, crop=32, sample_rate=16000, mel_bins=32, mel_window_ms=25, mel_hop_ms=10
)
SMALL = SyntheticSpec(videos=8, videos_per_shard=2, seconds=2.0)


def test_synthetic_videos_are_real_mp4_and_deterministic() -> None:
    sample = make_sample(SMALL, 3)
    assert make_sample(SMALL, 3)["mp4"] == sample["mp4"]
    with av.open(io.BytesIO(sample["mp4"])) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert container.streams.audio[0].codec_context.name == "aac"
        assert container.streams.video[0].frames == int(SMALL.seconds * SMALL.source_fps)


def test_decode_gives_configured_clip_shapes() -> None:
    out = decode_clips(make_sample(SMALL, 0)["mp4"], SPEC, random.Random(0))
    frames = 1 + int(SPEC.clip_seconds * SPEC.sample_rate) // int(SPEC.sample_rate * SPEC.mel_hop_ms / 1000)
    assert out["video"].shape == (4, 3, 4, 32, 32)
    assert out["audio"].shape == (4, 1, 32, frames)
    assert out["video"].dtype == torch.uint8 and out["video"].float().std() > 0
    assert torch.isfinite(out["audio"]).all()


def test_short_video_loops_to_fill_the_window() -> None:
    short = SyntheticSpec(videos=1, seconds=0.5)
    frames, audio, _ = render(short, 0)
    data = encode_mp4(frames, audio, short.source_fps, short.sample_rate)
    out = decode_clips(data, SPEC, None)  # the window is 2 s, the video 0.5 s
    assert out["video"].shape[0] == SPEC.clips
    # The last clip repeats the first: same frames a loop later.
    assert torch.allclose(out["video"][0].float(), out["video"][-1].float(), atol=0.05 * 255)


def test_short_video_can_be_padded_instead() -> None:
    short = SyntheticSpec(videos=1, seconds=0.5)
    frames, audio, _ = render(short, 0)
    data = encode_mp4(frames, audio, short.source_fps, short.sample_rate)
    out = decode_clips(data, dataclasses.replace(SPEC, short_videos="pad"), None)
    last = out["video"][-1]
    assert torch.equal(last[:, 0], last[:, -1]), "the last frame is held"
    assert out["audio"][-1].max() < out["audio"][0].max() - 5, "silence after the end"


def test_video_without_audio_is_rejected_with_reason() -> None:
    with pytest.raises(DecodeError, match="no audio track"):
        decode_clips(video_without_audio(), SPEC, None)


def test_truncated_video_is_rejected_with_reason() -> None:
    data = make_sample(SMALL, 0)["mp4"]
    with pytest.raises(DecodeError):
        decode_clips(data[: len(data) // 3], SPEC, None)


def test_log_mel_puts_a_tone_in_the_right_band() -> None:
    t = torch.arange(16000) / 16000
    low, high = log_mel(torch.sin(2 * torch.pi * 300 * t), SPEC), log_mel(torch.sin(2 * torch.pi * 3000 * t), SPEC)
    assert low.mean(-1).argmax() < high.mean(-1).argmax()


def test_generate_writes_manifest_and_reuses_finished_sets(tmp_path: Path) -> None:
    out = generate(SMALL, tmp_path / "set", progress=False)
    urls = [out / e["name"] for e in read_manifest(out)]
    assert [u.name for u in urls] == [f"shard-{i:06d}.tar" for i in range(4)]
    mtime = os.path.getmtime(urls[0])
    generate(SMALL, tmp_path / "set", progress=False)
    assert os.path.getmtime(urls[0]) == mtime
    assert not list(tmp_path.glob(".set.partial-*"))


def test_missing_shards_or_manifest_name_the_place(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        read_manifest(tmp_path / "nothing")
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        read_manifest(tmp_path / "bare")
    (tmp_path / "bare" / "manifest.json").write_text('{"shards": [{"name": "a.tar"}]}')
    with pytest.raises(ValueError, match="not a shard manifest"):
        read_manifest(tmp_path / "bare")


def test_the_sync_task_hides_the_class_from_each_modality_alone() -> None:
    """The class is which shape flashes with which tone: every video also shows a decoy shape and
    plays a decoy tone, so the shapes seen and the tones heard do not give it; their timing does."""
    spec = SyntheticSpec(videos=64, classes=32, seconds=4.0, task="sync")
    metas = [render(spec, i)[2] for i in range(64)]
    assert len({m["label"] for m in metas}) > 20, "labels spread over the 32 classes"
    for meta in metas:
        assert meta["decoy_shape"] != meta["shape"] and meta["decoy_pitch_hz"] != meta["pitch_hz"]
    for index in (5, 6, 7):
        frames, audio, meta = render(spec, index)
        slot_frames, slot_samples = int(0.5 * spec.source_fps), int(0.5 * spec.sample_rate)
        tone = [audio[s * slot_samples : (s + 1) * slot_samples].std() > 0.1 for s in range(8)]
        flash = [frames[s * slot_frames : (s + 1) * slot_frames].max() > 180 for s in range(8)]
        assert sum(tone) == 4 and sum(flash) == 4, "2 synced events, a decoy tone twice, a decoy flash twice"
        together = [s for s in range(8) if tone[s] and flash[s]]
        assert together == meta["synced_slots"], "only the class's pair flashes and sounds together"
    assert SyntheticSpec().digest() == "be4069c12f93", "sets made before the task existed keep their folder"
    with pytest.raises(ValueError, match="at most 32"):
        SyntheticSpec(classes=40, task="sync")


def test_the_rhythm_task_binds_the_class_pair_by_its_beat_alone() -> None:
    """In `rhythm` two shapes blink and two tones beat all through the video; of the four
    (shape, tone) pairings exactly one keeps time together, and it is the class's."""
    import numpy as np

    from pemt.data.synthetic import _SHAPES, _SYNC_PITCHES, _shape_mask, draw_rhythm, rhythm_rng

    spec = SyntheticSpec(videos=64, classes=32, seconds=4.0, task="rhythm")
    assert len({render(spec, i)[2]["label"] for i in range(64)}) > 20, "labels spread over the 32 classes"
    side, size = spec.size // 4, spec.size
    corners = [(2, 2), (2, size - side - 2), (size - side - 2, 2), (size - side - 2, size - side - 2)]
    for index in range(6):
        frames, audio, meta = render(spec, index)
        # which corners hold a shape (they are lit at some time), and when each is lit
        regions = {c: frames[:, y : y + side, x : x + side].max(-1) for c, (y, x) in enumerate(corners)}
        lit = {c: np.percentile(r.reshape(len(r), -1), 90, axis=1) > 160 for c, r in regions.items()}
        shown = [c for c, on in lit.items() if 0.2 < on.mean() < 0.8]
        assert len(shown) == 2, "a class shape and a decoy shape, each lit about half the time"
        # when each tone sounds: its amplitude in 10 ms from each frame's time
        window = spec.sample_rate // 100
        starts = (np.arange(len(frames)) * spec.sample_rate // spec.source_fps)[:, None] + np.arange(window)
        clock = starts / spec.sample_rate
        sounding = {}
        for pitch in _SYNC_PITCHES:
            piece = audio[starts]
            amplitude = 2 * np.abs((piece * np.exp(-2j * np.pi * pitch * clock)).mean(1))
            sounding[pitch] = amplitude > 0.2
        heard = [p for p, on in sounding.items() if 0.2 < on.mean() < 0.8]
        assert len(heard) == 2, "a class tone and a decoy tone, each heard about half the time"
        agreement = {(c, p): float((lit[c] == sounding[p]).mean()) for c in shown for p in heard}
        together = [pair for pair, share in agreement.items() if share > 0.9]
        assert len(together) == 1, agreement
        assert max(share for pair, share in agreement.items() if pair not in together) < 0.8, agreement
        (corner, pitch) = together[0]
        assert pitch == meta["pitch_hz"] and meta["decoy_pitch_hz"] in heard
        drawn = regions[corner][lit[corner]].mean(0) > 160  # the pixels that light up
        assert (drawn == _shape_mask(meta["shape"], side)).mean() > 0.9, "the pair's shape is the class's"
        assert meta["label"] == _SHAPES.index(meta["shape"]) + len(_SHAPES) * _SYNC_PITCHES.index(pitch)
        # The draws alone (what benchmarks/rhythm_resolution.py reads) say the class and when it beats.
        draw = draw_rhythm(rhythm_rng(spec, index), spec.classes)
        assert (draw.label, draw.tempi[0], list(draw.tempi[1:])) == (
            meta["label"],
            meta["tempo_hz"],
            meta["decoy_tempi_hz"],
        )
        frame_times = np.arange(len(frames)) / spec.source_fps
        assert (draw.lit(0, frame_times) == lit[corner]).mean() > 0.9
