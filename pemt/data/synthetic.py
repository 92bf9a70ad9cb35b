"""Synthetic audio-visual videos with structure a model can learn, written as shards.

Three tasks (`data.synthetic.task`):
- `classes`: each of K classes pairs a visual pattern (a shape of one colour moving at one speed)
  with a sound (a tone of one pitch, beating in one range of tempi). Within a video the shape
  flashes in time with the beats, at a per-video tempo and phase. Either modality alone (even a
  colour histogram) tells the class: easy, and probes saturate on it.
- `sync`: the class is which of 4 shapes flashes *in time with* which of 8 tones (32 classes).
  Every video also shows a decoy shape flashing off the beat and plays a decoy tone with no flash,
  over moving distractors and noise, colours drawn at random: the picture alone shows two shapes,
  the sound two tones, and only their synchrony says which pair is the class (a probe on either
  modality is capped near 1/16 and 1/8, on both without timing near 1/4).
- `rhythm`: as `sync`, but the pair (and each decoy, at a tempo of its own) beats all through the
  video instead of flashing twice: the rhythm is predictable within each modality and the pair's
  synchrony shows on every beat (still not learned in 300 steps on 2 CPU cores:
  benchmarks/results/sharing_quality.md).
Everything is deterministic from the seed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import av
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from pemt.config import plain
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
    task: str = "classes"  # classes | sync | rhythm

    def __post_init__(self) -> None:
        if self.task not in ("classes", "sync", "rhythm"):
            raise ValueError(f"data.synthetic.task={self.task!r}: choose classes, sync or rhythm")
        if self.task != "classes" and not 2 <= self.classes <= len(_SHAPES) * len(_SYNC_PITCHES):
            raise ValueError(
                f"data.synthetic.classes={self.classes}: the {self.task} task has at most "
                f"{len(_SHAPES) * len(_SYNC_PITCHES)} (shape, tone) pairs"
            )

    def described(self) -> dict[str, Any]:
        """The spec as recorded (the default task left out, so sets made before it existed keep their name)."""
        facts = asdict(self)
        if self.task == "classes":
            facts.pop("task")
        return facts

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.described(), sort_keys=True).encode()).hexdigest()[:12]


_COLOURS = np.array(
    [
        [230, 40, 40],
        [40, 200, 60],
        [50, 90, 240],
        [240, 210, 40],
        [200, 60, 220],
        [40, 210, 210],
        [250, 140, 30],
        [150, 150, 150],
    ],
    dtype=np.float32,
)


_SHAPES = ("square", "disc", "bar", "cross")
_SYNC_PITCHES = tuple(300.0 * 2 ** (i / 2.5) for i in range(8))  # 300 Hz to 2.1 kHz, clearly apart
SYNC_SLOT_S = 0.5  # events start on a half-second grid (a clip of the default window)
SYNC_FLASH_S = 0.25  # how long a flash or a tone lasts
RHYTHM_HZ = (0.8, 2.4)  # beats per second of the rhythm task (on half of each beat)
RHYTHM_APART_HZ = 0.3  # the least difference between a video's three tempi


@dataclass(frozen=True)
class ClassStyle:
    colour: np.ndarray
    shape: str
    speed: float  # frame widths per second
    pitch: float  # Hz
    beat_hz: tuple[float, float]  # range of the class's rhythm


def class_style(label: int, classes: int) -> ClassStyle:
    """Each class: a colour, a shape and a motion, paired with a pitch and a rhythm."""
    spread = label / max(1, classes - 1)
    return ClassStyle(
        colour=_COLOURS[label % len(_COLOURS)] * (1.0 - 0.3 * (label // len(_COLOURS)) / max(1, classes)),
        shape=_SHAPES[label % len(_SHAPES)],
        speed=0.4 + 0.8 * spread,
        pitch=220.0 * 2**spread,  # one octave spread over the classes
        beat_hz=(1.0 + 1.5 * spread, 1.5 + 1.5 * spread),
    )


def _shape_mask(shape: str, side: int) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side] - (side - 1) / 2
    r = side / 2
    masks: dict[str, np.ndarray] = {
        "square": np.ones((side, side), dtype=bool),
        "disc": xx**2 + yy**2 <= r**2,
        "bar": np.abs(yy) <= r / 3,
        "cross": (np.abs(xx) <= r / 4) | (np.abs(yy) <= r / 4),
    }
    return masks[shape]


def render(spec: SyntheticSpec, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Frames (N, H, W, 3) uint8, mono audio (S,) float32 and metadata for one video."""
    renderers = {"classes": render_classes, "sync": render_sync, "rhythm": render_rhythm}
    return renderers[spec.task](spec, index)


def render_classes(spec: SyntheticSpec, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The `classes` task: frames, audio and metadata for one video.

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
        frame[y0 : y0 + side, x0 : x0 + side][mask] = style.colour * (1.0 if on else 0.35)
        frames[i] = frame.clip(0, 255).astype(np.uint8)
    clock = np.arange(int(spec.seconds * spec.sample_rate)) / spec.sample_rate
    envelope = np.where(((clock * beat_hz + phase) % 1.0) < 0.5, 1.0, 0.15)
    audio = 0.4 * envelope * np.sin(2 * np.pi * style.pitch * clock) + 0.01 * rng.standard_normal(clock.shape)
    meta = {
        "id": f"synthetic-{index:06d}",
        "label": label,
        "duration": spec.seconds,
        "fps": spec.source_fps,
        "source": "synthetic",
        "shape": style.shape,
        "beat_hz": beat_hz,
    }
    return frames, audio.astype(np.float32), meta


def render_sync(spec: SyntheticSpec, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The `sync` task: class = (shape, tone) that flash and sound together; a decoy shape flashes
    off the beat, a decoy tone sounds without a flash, distractors move over noise."""
    rng = np.random.default_rng([spec.seed, index, 7])
    label = int(rng.integers(spec.classes))
    shape, pitch = label % len(_SHAPES), label // len(_SHAPES)
    decoy_shape = int(rng.choice([s for s in range(len(_SHAPES)) if s != shape]))
    decoy_pitch = int(rng.choice([p for p in range(len(_SYNC_PITCHES)) if p != pitch]))
    slots = int(spec.seconds / SYNC_SLOT_S)
    if slots < 6:
        raise ValueError(f"data.synthetic.seconds={spec.seconds}: the sync task needs at least {6 * SYNC_SLOT_S} s")
    order = rng.permutation(slots)
    synced, flash_only, tone_only = order[:2], order[2:4], order[4:6]
    jitter = rng.uniform(0.0, SYNC_SLOT_S - SYNC_FLASH_S, size=slots)

    def events(chosen: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        starts = [s * SYNC_SLOT_S + jitter[s] for s in chosen]
        return lambda t: np.any([(start <= t) & (t < start + SYNC_FLASH_S) for start in starts], axis=0)

    frames, audio = _scene(
        spec,
        rng,
        {shape: events(synced), decoy_shape: events(flash_only)},
        {pitch: events(synced), decoy_pitch: events(tone_only)},
    )
    meta = {
        **_meta(spec, index, label, "synthetic-sync", shape, pitch, decoy_shape, decoy_pitch),
        "synced_slots": sorted(int(s) for s in synced),
    }
    return frames, audio, meta


@dataclass(frozen=True)
class RhythmDraw:
    """What a `rhythm` video is made of: the class's (shape, tone), the decoys, and the tempo (Hz)
    and phase (of a beat) of the pair, the decoy shape and the decoy tone, in that order."""

    label: int
    shape: int
    pitch: int
    decoy_shape: int
    decoy_pitch: int
    tempi: tuple[float, float, float]
    phases: tuple[float, float, float]

    def lit(self, which: int, t: np.ndarray) -> np.ndarray:
        """Whether beat `which` (0 the pair, 1 the decoy shape, 2 the decoy tone) is on at times t (s)."""
        return ((t * self.tempi[which] + self.phases[which]) % 1.0) < 0.5


def draw_rhythm(rng: np.random.Generator, classes: int) -> RhythmDraw:
    label = int(rng.integers(classes))
    shape, pitch = label % len(_SHAPES), label // len(_SHAPES)
    decoy_shape = int(rng.choice([s for s in range(len(_SHAPES)) if s != shape]))
    decoy_pitch = int(rng.choice([p for p in range(len(_SYNC_PITCHES)) if p != pitch]))
    # Three tempi at least RHYTHM_APART_HZ apart, so no decoy keeps time with the pair for long.
    while True:
        tempi = rng.uniform(*RHYTHM_HZ, size=3)
        if min(abs(a - b) for i, a in enumerate(tempi) for b in tempi[i + 1 :]) >= RHYTHM_APART_HZ:
            break
    phases = rng.uniform(0.0, 1.0, size=3)
    return RhythmDraw(
        label,
        shape,
        pitch,
        decoy_shape,
        decoy_pitch,
        (float(tempi[0]), float(tempi[1]), float(tempi[2])),
        (float(phases[0]), float(phases[1]), float(phases[2])),
    )


def rhythm_rng(spec: SyntheticSpec, index: int) -> np.random.Generator:
    """The generator of video `index`: its draw first, then its scene."""
    return np.random.default_rng([spec.seed, index, 11])


def render_rhythm(spec: SyntheticSpec, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The `rhythm` task: class = (shape, tone) that beat at one tempo and phase; a decoy shape and a
    decoy tone beat at tempi of their own, distractors move over noise. As in `sync` only timing
    binds the pair, but each video repeats it every beat, so the within-modality objectives (what
    comes next in the rhythm) and the pair objective see it many times a video."""
    rng = rhythm_rng(spec, index)
    draw = draw_rhythm(rng, spec.classes)

    Beat = Callable[[np.ndarray], np.ndarray]
    lit: dict[int, Beat] = {draw.shape: partial(draw.lit, 0), draw.decoy_shape: partial(draw.lit, 1)}
    sounding: dict[int, Beat] = {draw.pitch: partial(draw.lit, 0), draw.decoy_pitch: partial(draw.lit, 2)}
    frames, audio = _scene(spec, rng, lit, sounding)
    meta = {
        **_meta(
            spec, index, draw.label, "synthetic-rhythm", draw.shape, draw.pitch, draw.decoy_shape, draw.decoy_pitch
        ),
        "tempo_hz": draw.tempi[0],
        "decoy_tempi_hz": list(draw.tempi[1:]),
    }
    return frames, audio, meta


def _meta(
    spec: SyntheticSpec, index: int, label: int, source: str, shape: int, pitch: int, decoy_shape: int, decoy_pitch: int
) -> dict[str, Any]:
    return {
        "id": f"synthetic-{index:06d}",
        "label": label,
        "duration": spec.seconds,
        "fps": spec.source_fps,
        "source": source,
        "shape": _SHAPES[shape],
        "pitch_hz": _SYNC_PITCHES[pitch],
        "decoy_shape": _SHAPES[decoy_shape],
        "decoy_pitch_hz": _SYNC_PITCHES[decoy_pitch],
    }


def _scene(
    spec: SyntheticSpec,
    rng: np.random.Generator,
    lit: dict[int, Callable[[np.ndarray], np.ndarray]],
    sounding: dict[int, Callable[[np.ndarray], np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """Frames and audio of the joint tasks: each shape in `lit` (index -> when it is lit, a function
    of time in s) in its own corner, in a random colour, dim when not lit; each tone in `sounding`
    likewise; two distractor blobs moving over a noisy background, and noise in the sound."""
    n_frames, size = int(round(spec.seconds * spec.source_fps)), spec.size
    side = max(6, size // 4)
    colours = _COLOURS[rng.permutation(len(_COLOURS) - 1)[: len(lit)]]  # random (and bright): colour says nothing
    corners = rng.permutation([(2, 2), (2, size - side - 2), (size - side - 2, 2), (size - side - 2, size - side - 2)])
    yy, xx = np.mgrid[:size, :size]
    blobs = rng.uniform(0, size, size=(2, 2)), rng.uniform(-8, 8, size=(2, 2))  # distractors: place, velocity
    base = rng.uniform(10, 40, size=(size, size, 3)).astype(np.float32)
    frames = np.empty((n_frames, size, size, 3), dtype=np.uint8)
    for i in range(n_frames):
        t = i / spec.source_fps
        frame = base + rng.normal(0, 6, size=base.shape).astype(np.float32)
        for (y, x), (vy, vx) in zip(*blobs):
            cy, cx = (y + vy * t) % size, (x + vx * t) % size
            frame[(yy - cy) ** 2 + (xx - cx) ** 2 <= (size / 8) ** 2] += 60
        for (which, when), (y0, x0), colour in zip(lit.items(), corners, colours):
            region = frame[y0 : y0 + side, x0 : x0 + side]
            region[_shape_mask(_SHAPES[which], side)] = colour * (1.0 if when(np.float64(t)) else 0.3)
        frames[i] = frame.clip(0, 255).astype(np.uint8)

    clock = np.arange(int(spec.seconds * spec.sample_rate)) / spec.sample_rate
    audio = 0.03 * rng.standard_normal(clock.shape)
    for which, when in sounding.items():
        on = when(clock)
        audio[on] += 0.4 * np.sin(2 * np.pi * _SYNC_PITCHES[which] * clock[on])
    return frames, audio.astype(np.float32)


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
                piece = audio[audio_pos : audio_pos + chunk]
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


def make_sample(spec: SyntheticSpec, index: int) -> dict[str, Any]:
    frames, audio, meta = render(spec, index)
    return {
        "__key__": meta["id"],
        "mp4": encode_mp4(frames, audio, spec.source_fps, spec.sample_rate),
        "json": json.dumps(meta).encode(),
    }


def spec_from_config(cfg: DictConfig) -> SyntheticSpec:
    return SyntheticSpec(**plain(cfg.data.synthetic))


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
    samples = tqdm(
        (make_sample(spec, i) for i in range(spec.videos)),
        total=spec.videos,
        desc="synthetic videos",
        disable=not progress,
    )
    write_shards(samples, staging, samples_per_shard=spec.videos_per_shard, extra={"synthetic": spec.described()})
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
        packets = [
            (p.stream.index, bytes(p), p.pts, p.dts, p.is_keyframe, p.duration)
            for p in given.demux()
            if p.dts is not None
        ]
        spans = {
            s.index: max(p[2] + (p[5] or 0) for p in packets if p[0] == s.index)
            - min(p[2] for p in packets if p[0] == s.index)
            for s in streams
        }
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
