"""Synthetic audio-visual videos with structure a model can learn, written as shards.

Each of K classes pairs a visual pattern (a shape of one colour moving at one speed) with a
sound (a tone of one pitch, beating in one range of tempi). Within a video the shape flashes in
time with the beats, at a per-video tempo and phase, so which audio belongs to which video is
learnable from timing as well as from class. Everything is deterministic from the seed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pemt.data.shards import write_shards


@dataclass(frozen=True)
class SyntheticSpec:
    videos: int = 64
    classes: int = 4
    seconds: float = 3.0
    source_fps: int = 16
    size: int = 48
    sample_rate: int = 16000
    videos_per_shard: int = 8
    seed: int = 0

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


_COLOURS = np.array(
    [[230, 40, 40], [40, 200, 60], [50, 90, 240], [240, 210, 40], [200, 60, 220], [40, 210, 210],
     [250, 140, 30], [150, 150, 150]], dtype=np.float32,
)


_SHAPES = ("square", "disc", "bar", "cross")


@dataclass(frozen=True)
class ClassStyle:
    colour: np.ndarray
    shape: str
    speed: float      # frame widths per second
    pitch: float      # Hz
    beat_hz: tuple[float, float]  # range of the class's rhythm


def class_style(label: int, classes: int) -> ClassStyle:
    """Each class: a colour, a shape and a motion, paired with a pitch and a rhythm."""
    spread = label / max(1, classes - 1)
    return ClassStyle(
        colour=_COLOURS[label % len(_COLOURS)] * (1.0 - 0.3 * (label // len(_COLOURS)) / max(1, classes)),
        shape=_SHAPES[label % len(_SHAPES)],
        speed=0.4 + 0.8 * spread,
        pitch=220.0 * 2 ** spread,                 # one octave spread over the classes
        beat_hz=(1.0 + 1.5 * spread, 1.5 + 1.5 * spread),
    )


def _shape_mask(shape: str, side: int) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side] - (side - 1) / 2
    r = side / 2
    return {"square": np.ones((side, side), dtype=bool),
            "disc": xx**2 + yy**2 <= r**2,
            "bar": np.abs(yy) <= r / 3,
            "cross": (np.abs(xx) <= r / 4) | (np.abs(yy) <= r / 4)}[shape]


def render(spec: SyntheticSpec, index: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Frames (N, H, W, 3) uint8, mono audio (S,) float32 and metadata for one video.

    The shape flashes on the beats of the tone: per-video tempo and phase within the class's
    rhythm, so audio and video of one video are in sync and other pairings mostly are not.
    """
    rng = np.random.default_rng([spec.seed, index])
    label = int(rng.integers(spec.classes))
    style = class_style(label, spec.classes)
    beat_hz = float(rng.uniform(*style.beat_hz))
    phase = float(rng.uniform(0, 1))
    n_frames = int(round(spec.seconds * spec.source_fps))
    side = max(4, spec.size // 4)
    mask = _shape_mask(style.shape, side)
    y0 = int(rng.integers(0, spec.size - side))
    frames = np.empty((n_frames, spec.size, spec.size, 3), dtype=np.uint8)
    base = rng.uniform(10, 40, size=(spec.size, spec.size, 3)).astype(np.float32)
    for i in range(n_frames):
        t = i / spec.source_fps
        on = ((t * beat_hz + phase) % 1.0) < 0.5
        x0 = int(((t * style.speed + phase) % 1.0) * (spec.size - side))
        frame = base.copy()
        frame[y0:y0 + side, x0:x0 + side][mask] = style.colour * (1.0 if on else 0.35)
        frames[i] = frame.clip(0, 255).astype(np.uint8)
    t = np.arange(int(spec.seconds * spec.sample_rate)) / spec.sample_rate
    envelope = np.where(((t * beat_hz + phase) % 1.0) < 0.5, 1.0, 0.15)
    audio = 0.4 * envelope * np.sin(2 * np.pi * style.pitch * t) + 0.01 * rng.standard_normal(t.shape)
    meta = {"id": f"synthetic-{index:06d}", "label": label, "duration": spec.seconds,
            "fps": spec.source_fps, "source": "synthetic", "shape": style.shape, "beat_hz": beat_hz}
    return frames, audio.astype(np.float32), meta


def encode_mp4(frames: np.ndarray, audio: np.ndarray, fps: int, sample_rate: int) -> bytes:
    """H.264 video + AAC audio in an mp4 container, interleaved second by second."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height = frames.shape[2], frames.shape[1]
        video.pix_fmt = "yuv420p"
        video.options = {"preset": "veryfast", "crf": "23"}
        sound = container.add_stream("aac", rate=sample_rate, layout="mono")
        chunk = 1024
        audio_pos = 0
        for i, array in enumerate(frames):
            for packet in video.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
            until = int((i + 1) / fps * sample_rate)
            while audio_pos + chunk <= until or (i == len(frames) - 1 and audio_pos < len(audio)):
                piece = audio[audio_pos:audio_pos + chunk]
                frame = av.AudioFrame.from_ndarray(piece[None, :], format="fltp", layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = audio_pos
                frame.time_base = Fraction(1, sample_rate)
                for packet in sound.encode(frame):
                    container.mux(packet)
                audio_pos += len(piece)
        for stream in (video, sound):
            for packet in stream.encode(None):
                container.mux(packet)
    return buffer.getvalue()


def make_sample(spec: SyntheticSpec, index: int) -> dict:
    frames, audio, meta = render(spec, index)
    return {"__key__": meta["id"], "mp4": encode_mp4(frames, audio, spec.source_fps, spec.sample_rate),
            "json": json.dumps(meta).encode()}


def spec_from_config(cfg: DictConfig) -> SyntheticSpec:
    return SyntheticSpec(**OmegaConf.to_container(cfg.data.synthetic, resolve=True))


def shard_dir(cfg: DictConfig) -> Path:
    """Where the synthetic shards for this config live (or will)."""
    if cfg.data.shards:
        return Path(cfg.data.shards)
    return Path(cfg.paths.cache) / "synthetic" / spec_from_config(cfg).digest()


def generate(spec: SyntheticSpec, out_dir: Path, progress: bool = True) -> Path:
    """Write the whole synthetic set to `out_dir`; it appears only once complete."""
    if (out_dir / "manifest.json").exists():
        return out_dir
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    samples = (make_sample(spec, i) for i in range(spec.videos))
    samples = tqdm(samples, total=spec.videos, desc="synthetic videos", disable=not progress)
    write_shards(samples, staging, samples_per_shard=spec.videos_per_shard,
                 extra={"synthetic": asdict(spec)})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(out_dir)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def ensure_synthetic_shards(cfg: DictConfig) -> Path:
    return generate(spec_from_config(cfg), shard_dir(cfg))


def repeat_video(source: str | BinaryIO, target: str | BinaryIO, times: int, fmt: str | None = None) -> None:
    """`source`'s packets `times` over, timestamps shifted: a long video made in seconds and not
    re-encoded (for tests and benchmarks of long inputs)."""
    with av.open(source) as given, av.open(target, mode="w", format=fmt or given.format.name.split(",")[0]) as out:
        streams = list(given.streams)
        packets = [(p.stream.index, bytes(p), p.pts, p.dts, p.is_keyframe, p.duration)
                   for p in given.demux() if p.dts is not None]
        spans = {s.index: max(p[2] + (p[5] or 0) for p in packets if p[0] == s.index)
                 - min(p[2] for p in packets if p[0] == s.index) for s in streams}
        targets = {s.index: out.add_stream_from_template(s) for s in streams}
        for repeat in range(times):
            for index, payload, pts, dts, key, duration in packets:
                packet = av.Packet(payload)
                packet.stream, packet.time_base = targets[index], streams[index].time_base
                packet.pts, packet.dts = pts + repeat * spans[index], dts + repeat * spans[index]
                packet.is_keyframe = key
                if duration:
                    packet.duration = duration
                out.mux(packet)
