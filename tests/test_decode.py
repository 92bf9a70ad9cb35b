"""Decoding a sample's window from real-world encodings: the frame rule, seeking, audio by its
timestamps, what a decode reads, and the inputs that must become counted bad samples."""

from __future__ import annotations

import io
import random
import struct
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from conftest import encode_video, repeat_video
from pemt.data.decode import ClipSpec, DecodeError, decode_clips, log_mel

SPEC = ClipSpec(
    clips=3, frames_per_clip=4, fps=8, crop=32, sample_rate=16000, mel_bins=16, mel_window_ms=25, mel_hop_ms=10
)
TIMES = np.arange(SPEC.clips * SPEC.frames_per_clip) / SPEC.fps


def _frame_codes(data: bytes) -> tuple[np.ndarray, np.ndarray, float]:
    """Brute force: every frame decoded from the start: presentation times, colour codes (red),
    and the header's duration."""
    with av.open(io.BytesIO(data)) as container:
        duration = container.duration / av.time_base
        frames = [(f.time, int(f.to_ndarray(format="rgb24")[-1, -1, 0])) for f in container.decode(video=0)]
    return np.array([t for t, _ in frames]), np.array([c for _, c in frames]), duration


def _window_start(duration: float, seed: int | None) -> float:
    fraction = random.Random(seed).random() if seed is not None else 0.5
    return max(0.0, duration - SPEC.seconds) * fraction


def _reference_codes(frames: tuple[np.ndarray, np.ndarray, float], seed: int | None) -> np.ndarray:
    """The colour code of the last frame shown at or before each time of the window."""
    starts, codes, duration = frames
    picked = np.searchsorted(starts, _window_start(duration, seed) + TIMES, side="right") - 1
    return codes[np.clip(picked, 0, len(codes) - 1)]


def _reds(out: dict) -> np.ndarray:
    """The red value of each output frame (away from the marker)."""
    return out["video"][:, 0, :, -1, -1].reshape(-1).numpy().astype(int)


ENCODINGS = {
    "closed gop": {},
    "b-frames, open gop": {"bframes": 3, "open_gop": True, "gop": 12},
    "variable frame rate": {"vfr": True},
    "mpeg-ts, no index": {"fmt": "mpegts"},
    "matroska": {"fmt": "matroska"},
}


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("repeats", [1, 6], ids=["short", "long"])
def test_each_time_gets_the_frame_shown_then(encoding: str, repeats: int) -> None:
    kw = ENCODINGS[encoding]
    data = encode_video(seconds=3.0, **kw)
    if repeats > 1:
        data = repeat_video(data, repeats, fmt={"mpegts": "mpegts", "matroska": "matroska"}.get(kw.get("fmt"), "mp4"))
    frames = _frame_codes(data)
    for seed in (None, 0, 1, 2):
        want = _reference_codes(frames, seed)
        got = _reds(decode_clips(data, SPEC, random.Random(seed) if seed is not None else None))
        assert np.abs(got - want).max() <= 2, f"seed {seed}: frames {got} instead of {want}"


def test_the_window_is_read_not_the_file() -> None:
    """A decode reads (and so decodes) what its window needs: a small part of a long file, the
    same wherever the window lies."""
    ten_minutes = repeat_video(encode_video(seconds=4.0, size=(64, 48)), 150)

    class Counting(io.BytesIO):
        total = 0

        def read(self, size: int = -1) -> bytes:
            chunk = super().read(size)
            Counting.total += len(chunk)
            return chunk

    read = []
    for seed in range(4):  # windows from near the start to near the end
        Counting.total = 0
        decode_clips(Counting(ten_minutes), SPEC, random.Random(seed))
        read.append(Counting.total)
    # most of what is read is the file's index (moov): the sample tables of 10 minutes
    assert max(read) < 0.1 * len(ten_minutes), f"read {read} of {len(ten_minutes)} bytes"
    assert max(read) < 1.5 * min(read), f"bytes read depend on where the window lies: {read}"


def test_rotation_metadata_turns_frames_upright() -> None:
    # The marker is top-left as coded; shown rotated 90 degrees counterclockwise it is bottom-left.
    upright = decode_clips(encode_video(seconds=1.0, size=(32, 32), rotation=90), SPEC, None)
    frame = upright["video"][0, :, 0].permute(1, 2, 0).float()
    corners = {"top left": frame[:4, :4], "bottom left": frame[-4:, :4], "top right": frame[:4, -4:]}
    assert corners["bottom left"].mean() > 200, {k: v.mean().item() for k, v in corners.items()}
    assert corners["top left"].mean() < 200 and corners["top right"].mean() < 200


def _tone_window(data: bytes, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoded log-mel, log-mel of the same window cut from a decode of the whole track)."""
    with av.open(io.BytesIO(data)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SPEC.sample_rate)
        pieces = [r.to_ndarray().reshape(-1) for f in container.decode(audio=0) for r in resampler.resample(f)]
        pieces += [r.to_ndarray().reshape(-1) for r in resampler.resample(None)]
    whole = np.concatenate(pieces)
    with av.open(io.BytesIO(data)) as container:
        start = _window_start(container.duration / av.time_base, seed)
    first, needed = int(round(start * SPEC.sample_rate)), SPEC.clips * SPEC.clip_samples
    reference = torch.from_numpy(whole[first : first + needed].copy()).reshape(SPEC.clips, -1)
    return decode_clips(data, SPEC, random.Random(seed))["audio"], log_mel(reference, SPEC).unsqueeze(1)


# (16000, "mono"): already the model's rate and layout, read without a resampler
@pytest.mark.parametrize(
    ("rate", "layout"), [(8000, "mono"), (16000, "mono"), (16000, "stereo"), (44100, "stereo"), (48000, "5.1")]
)
def test_audio_window_equals_the_same_window_of_the_whole_track(rate: int, layout: str) -> None:
    data = encode_video(seconds=20.0, rate=rate, layout=layout)
    for seed in (0, 1):
        decoded, reference = _tone_window(data, seed)
        assert decoded.shape == reference.shape
        # mel power agrees to rounding; the 440 Hz band is loud in every clip
        assert torch.allclose(decoded.exp(), reference.exp(), rtol=1e-3, atol=1e-4)
        assert decoded.mean(-1)[..., 1:5].max() > -2.0


def test_audio_that_ends_before_the_video_is_silence_after_its_end() -> None:
    data = encode_video(seconds=20.0, audio_seconds=1.0)  # 20 s of video, 1 s of sound
    late = decode_clips(data, SPEC, random.Random(3))  # fraction 0.24: from ~4.4 s
    assert late["audio"].max() < -13.0, "no sound past the track's end"
    assert decode_clips(data, SPEC, None)["audio"].max() < -13.0
    assert decode_clips(encode_video(seconds=1.0), SPEC, None)["audio"].max() > 0.0, "a short one loops its sound"


def _claimed_duration(data: bytes, seconds: float) -> bytes:
    """A Matroska file whose header states another duration than its frames have."""
    patched = bytearray(data)
    at = patched.find(b"\x44\x89")  # the Segment's Duration element
    assert patched[at + 2] == 0x88, "an 8-byte float duration"
    struct.pack_into(">d", patched, at + 3, seconds * 1000.0)  # in milliseconds
    return bytes(patched)


def test_a_header_that_lies_about_the_duration_decodes_the_frames_there_are() -> None:
    data = encode_video(seconds=6.0, fmt="matroska")
    for claimed in (3e9, 0.1):  # a century; a tenth of a second
        lying = _claimed_duration(data, claimed)
        for seed in (0, 1):
            reds = _reds(decode_clips(lying, SPEC, random.Random(seed)))
            assert len(set(reds.tolist())) == len(reds), f"claimed {claimed} s: frozen frames {reds}"


def _wav(with_nan: bool = False) -> bytes:
    """3 s of float PCM: silence, or silence with a NaN every 1000 samples."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="wav") as container:
        stream = container.add_stream("pcm_f32le", rate=16000, layout="mono")
        samples = np.zeros((1, 48000), np.float32)
        if with_nan:
            samples[0, ::1000] = np.nan
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 16000, 0, Fraction(1, 16000)
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "video", "audio", "reason"),
    [
        ("empty file", b"", None, "undecodable video"),
        ("not a video", b"\x00" * 4096, None, "undecodable video"),
        ("cut in half", "half", None, "undecodable video|no video frames"),
        ("no frames", "empty video", None, "undecodable video|no video frames"),
        ("no audio track", "silent", None, "no audio track"),
        ("non-finite sound", "silent", "nan", "non-finite audio"),
    ],
)
def test_unusable_inputs_are_decode_errors_with_their_reason(name: str, video, audio, reason: str) -> None:
    whole = encode_video(seconds=2.0)
    video = {
        "half": whole[: len(whole) // 2],
        "silent": encode_video(seconds=2.0, audio_seconds=0),
        "empty video": encode_video(seconds=0.0),
    }.get(video, video)
    audio = _wav(with_nan=True) if audio == "nan" else audio
    with pytest.raises(DecodeError, match=reason):
        decode_clips(video, SPEC, random.Random(0), audio_data=audio)


def test_the_crop_is_a_square_of_the_short_side_scaled_to_the_crop() -> None:
    """A 96x48 frame whose red channel is 2 x (column): a centred crop shows columns 24..71 of the
    source; a training crop lies where a resized frame's crop would (offset 0 .. 32 of 64 pixels)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 96, 48, "yuv444p"
        stream.options = {"preset": "ultrafast", "qp": "0"}  # lossless: the gradient survives
        image = np.zeros((48, 96, 3), np.uint8)
        image[..., 0] = (2 * np.arange(96)).astype(np.uint8)[None, :]
        for _ in range(16):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    data = buffer.getvalue()
    spec = ClipSpec(
        clips=1, frames_per_clip=1, fps=8, crop=32, sample_rate=16000, mel_bins=16, mel_window_ms=25, mel_hop_ms=10
    )
    with pytest.raises(DecodeError, match="no audio track"):  # the picture is decoded first
        decode_clips(data, spec, None)
    sound = _wav()
    centre = decode_clips(data, spec, None, audio_data=sound)["video"][0, 0, 0].float()
    assert abs(centre[16, 0].item() - 2 * 24.75) <= 3 and abs(centre[16, -1].item() - 2 * 71.25) <= 3
    for seed in range(4):
        draw = random.Random(seed)
        draw.random()  # the window's draw comes first
        left = draw.randint(0, 64 - 32)  # where a 64x32 resized frame's crop would start
        red = decode_clips(data, spec, random.Random(seed), audio_data=sound)["video"][0, 0, 0].float()
        first_column = left / 32 * 48  # the same place on the 96-wide source, in source pixels
        assert abs(red[16, 0].item() - 2 * (first_column + 0.75)) <= 4, (seed, left, red[16, 0].item())


def test_frames_are_converted_on_the_decode_threads_with_the_same_pixels_at_any_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The crop/scale/convert graph runs `decode_threads` threads, as the decoder does (left to
    FFmpeg, cores + 1, it made small frames ~4x slower to convert); the pixels never depend on it."""
    data = encode_video(seconds=2.0, size=(96, 64))
    graphs: list[av.filter.Graph] = []
    make_graph = av.filter.Graph

    def recorded() -> av.filter.Graph:
        graphs.append(make_graph())
        return graphs[-1]

    monkeypatch.setattr(av.filter, "Graph", recorded)
    decoded = {}
    for threads in (1, 0, 3):
        spec = ClipSpec(**{**SPEC.__dict__, "decode_threads": threads})
        decoded[threads] = decode_clips(data, spec, random.Random(5))["video"]
        if threads:  # 0: FFmpeg's count, which it writes back (cores + 1)
            assert graphs and {graph.threads for graph in graphs} == {threads}
        graphs.clear()
    assert torch.equal(decoded[1], decoded[0]) and torch.equal(decoded[1], decoded[3])
