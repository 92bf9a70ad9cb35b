"""PyAV decoding: one encoded video -> a sequence of clips and the log-mel audio of each clip."""

from __future__ import annotations

import functools
import io
import math
import random
from dataclasses import dataclass

import av
import numpy as np
import torch


class DecodeError(ValueError):
    """A sample that cannot become model input; the message says why."""


@dataclass(frozen=True)
class ClipSpec:
    clips: int
    frames_per_clip: int
    fps: float
    crop: int
    sample_rate: int
    mel_bins: int
    mel_window_ms: float
    mel_hop_ms: float
    short_videos: str = "loop"   # loop | pad: how a video shorter than the window is filled

    @property
    def clip_seconds(self) -> float:
        return self.frames_per_clip / self.fps

    @property
    def seconds(self) -> float:
        return self.clips * self.clip_seconds


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, mel_bins: int) -> torch.Tensor:
    """Triangular filters on the HTK mel scale, shape (mel_bins, n_fft // 2 + 1)."""
    def to_mel(hz: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    def to_hz(mel: np.ndarray) -> np.ndarray:
        return 700.0 * (10 ** (mel / 2595.0) - 1.0)

    edges = to_hz(np.linspace(0.0, to_mel(np.array(sample_rate / 2)), mel_bins + 2))
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs - lower) / np.maximum(centre - lower, 1e-9)
    falling = (upper - freqs) / np.maximum(upper - centre, 1e-9)
    return torch.from_numpy(np.clip(np.minimum(rising, falling), 0.0, None)).float()


def log_mel(samples: torch.Tensor, spec: ClipSpec) -> torch.Tensor:
    """log(1e-6 + mel power) of mono samples (..., S) -> (..., mel_bins, frames)."""
    win = int(round(spec.sample_rate * spec.mel_window_ms / 1000))
    hop = int(round(spec.sample_rate * spec.mel_hop_ms / 1000))
    n_fft = 1 << (win - 1).bit_length()
    flat = samples.reshape(-1, samples.shape[-1])
    stft = torch.stft(flat, n_fft=n_fft, hop_length=hop, win_length=win,
                      window=torch.hann_window(win), center=True, return_complex=True)
    mel = mel_filterbank(spec.sample_rate, n_fft, spec.mel_bins) @ stft.abs().pow(2)
    return torch.log(1e-6 + mel).reshape(*samples.shape[:-1], spec.mel_bins, -1)


def _frames(container: av.container.InputContainer, times: np.ndarray, crop: int,
            rng: random.Random | None, loop: bool) -> np.ndarray:
    """The decoded frame shown at each time, resized and cropped. Past the end the video
    loops, or (`loop` false) holds its last frame."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    decoded: list[tuple[float, av.VideoFrame]] = []
    last_needed = float(times.max())
    for frame in container.decode(stream):
        decoded.append((float(frame.time or 0.0), frame))
        if decoded[-1][0] > last_needed:
            break
    if not decoded:
        raise DecodeError("no video frames")
    starts = np.array([t for t, _ in decoded])
    span = starts[-1] + (starts[-1] - starts[-2] if len(starts) > 1 else 1.0)
    picked = np.searchsorted(starts, times % span if loop else times, side="right") - 1
    first = decoded[0][1]
    scale = crop / min(first.width, first.height)
    width, height = max(crop, round(first.width * scale)), max(crop, round(first.height * scale))
    if rng is None:
        left, top = (width - crop) // 2, (height - crop) // 2
    else:
        left, top = rng.randint(0, width - crop), rng.randint(0, height - crop)
    out = np.empty((len(times), crop, crop, 3), dtype=np.uint8)
    cache: dict[int, np.ndarray] = {}
    for i, index in enumerate(np.clip(picked, 0, len(decoded) - 1)):
        if index not in cache:
            array = decoded[index][1].to_ndarray(format="rgb24", width=width, height=height)
            cache[index] = array[top:top + crop, left:left + crop]
        out[i] = cache[index]
    return out


def _audio(container: av.container.InputContainer, sample_rate: int) -> np.ndarray:
    if not container.streams.audio:
        raise DecodeError("no audio track")
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    pieces = []
    for frame in container.decode(container.streams.audio[0]):
        pieces.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(frame))
    pieces.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(None))
    if not pieces:
        raise DecodeError("empty audio track")
    return np.concatenate(pieces)


def decode_clips(data: bytes | None, spec: ClipSpec, rng: random.Random | None = None,
                 audio_data: bytes | None = None) -> dict[str, torch.Tensor]:
    """Encoded video -> {"video": (T, 3, F, crop, crop) in [0, 1], "audio": (T, 1, mel, frames)}.

    The sound comes from `audio_data` (a separate file, e.g. flac) when given, else from the
    video's own audio track. With no video (`data` None) the frames are black.
    `rng` picks a random window and crop (training); None takes the centred ones (evaluation).
    Videos shorter than the window loop or are padded (`spec.short_videos`).
    """
    if data is None:
        return _decode_audio_only(audio_data, spec)
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise DecodeError("no video track")
            duration = container.duration / av.time_base if container.duration else spec.seconds
            slack = max(0.0, duration - spec.seconds)
            start = rng.uniform(0.0, slack) if rng is not None else slack / 2
            times = start + np.arange(spec.clips * spec.frames_per_clip) / spec.fps
            frames = _frames(container, times, spec.crop, rng, spec.short_videos == "loop")
            if audio_data is None:
                container.seek(0)
                audio = _audio(container, spec.sample_rate)
        if audio_data is not None:
            with av.open(io.BytesIO(audio_data)) as sound:
                audio = _audio(sound, spec.sample_rate)
    except av.error.FFmpegError as err:
        raise DecodeError(f"undecodable video: {err}") from err
    video = torch.from_numpy(frames).reshape(spec.clips, spec.frames_per_clip, spec.crop, spec.crop, 3)
    video = video.permute(0, 4, 1, 2, 3).float().div_(255.0)
    return {"video": video.contiguous(), "audio": _mel_clips(audio, start, spec)}


def _decode_audio_only(audio_data: bytes | None, spec: ClipSpec) -> dict[str, torch.Tensor]:
    """A sound without picture (ESC-50's clips): its centred window, and black frames."""
    if audio_data is None:
        raise DecodeError("neither video nor audio data")
    try:
        with av.open(io.BytesIO(audio_data)) as sound:
            audio = _audio(sound, spec.sample_rate)
    except av.error.FFmpegError as err:
        raise DecodeError(f"undecodable audio: {err}") from err
    start = max(0.0, len(audio) / spec.sample_rate - spec.seconds) / 2
    video = torch.zeros(spec.clips, 3, spec.frames_per_clip, spec.crop, spec.crop)
    return {"video": video, "audio": _mel_clips(audio, start, spec)}


def _mel_clips(audio: np.ndarray, start: float, spec: ClipSpec) -> torch.Tensor:
    """The log-mel spectrogram of each clip of the window starting at `start` seconds."""
    clip_samples = int(round(spec.clip_seconds * spec.sample_rate))
    first = int(round(start * spec.sample_rate))
    needed = spec.clips * clip_samples
    if first + needed > len(audio):  # short: loop the sound with the picture, or pad with silence
        reps = math.ceil((first + needed) / len(audio))
        audio = np.tile(audio, reps) if spec.short_videos == "loop" else np.pad(audio, (0, first + needed - len(audio)))
    window = audio[first:first + needed]
    return log_mel(torch.from_numpy(window.copy()).reshape(spec.clips, clip_samples), spec).unsqueeze(1)
