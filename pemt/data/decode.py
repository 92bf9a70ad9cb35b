"""PyAV decoding of one sample's window: a sequence of clips and the log-mel audio of each clip.

Only the window is decoded. The video is sought to the keyframe before the window's start and
decoded up to its end; each sampled frame is resized, cropped and written into the output as it
arrives, so a decode holds the output plus the decoder's own state (about a GOP), whatever the
file's length, and its time grows with the window, not with the video or where the window lies.
The audio is sought the same way. A video shorter than the window is decoded whole: its frame
times are read from the packets first, so only the frames the window shows are converted.

Frame rule: the frame at time t is the last frame whose presentation time is <= t (the first
frame for times before it). Frames are turned upright by the stream's rotation metadata.
Audio follows its timestamps: where the track starts late or ends early, the window is silent
there. Anything that makes a sample unusable raises DecodeError with the reason.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import cast

import av
import numpy as np
import torch

from pemt.data.audio import audio_window, cut_window, decode_audio
from pemt.data.errors import DecodeError as DecodeError  # where callers have always found it
from pemt.data.media import Source, open_source, seek_keyframe, time_base

# Packets of a short video are read this far past the window's end to find every frame shown in
# it (B-frames arrive out of presentation order).
REORDER_MARGIN_S = 2.0


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
    short_videos: str = "loop"  # loop | pad: how a video shorter than the window is filled
    decode_threads: int = 1  # FFmpeg threads per decode; data workers give the parallelism

    @property
    def clip_seconds(self) -> float:
        return self.frames_per_clip / self.fps

    @property
    def seconds(self) -> float:
        return self.clips * self.clip_seconds

    @property
    def clip_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))


class WindowDraws:
    """A decode's random choices: where the window starts and where the crop lies, drawn from
    `rng` (training) or centred (None). `seed_dependent` turns True when a draw had more than one
    possible outcome; a decode that leaves it False gave the same clips under any seed (a video
    exactly as long as the window, frames no larger than the crop), which is what lets the loader
    keep it (pemt.data.decoded_cache)."""

    def __init__(self, rng: random.Random | None) -> None:
        self.rng = rng
        self.seed_dependent = False

    def fraction(self) -> float:
        """Where the window starts, as a fraction of the slack: drawn before the slack is known."""
        return self.rng.random() if self.rng is not None else 0.5

    def start(self, fraction: float, slack: float) -> float:
        self.seed_dependent |= self.rng is not None and slack > 0
        return slack * fraction

    def offset(self, slack: int) -> int:
        """A crop's offset along one side, 0 .. slack pixels."""
        if self.rng is None:
            return slack // 2
        self.seed_dependent |= slack > 0
        return self.rng.randint(0, slack)


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
    stft = torch.stft(
        flat,
        n_fft=n_fft,
        hop_length=hop,
        win_length=win,
        window=torch.hann_window(win),
        center=True,
        return_complex=True,
    )
    mel = mel_filterbank(spec.sample_rate, n_fft, spec.mel_bins) @ stft.abs().pow(2)
    return torch.log(1e-6 + mel).reshape(*samples.shape[:-1], spec.mel_bins, -1)


def mel_frames(spec: ClipSpec) -> int:
    """Spectrogram frames per clip."""
    hop = int(round(spec.sample_rate * spec.mel_hop_ms / 1000))
    return spec.clip_samples // hop + 1


def video_to_float(video: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """Decoded uint8 frames as the model reads them: [0, 1] in `dtype` on `device`. Converted
    there, so loaders hold and move a quarter of the bytes."""
    return video.to(device, non_blocking=True).to(torch.float32).div_(255.0).to(dtype)


class _Converter:
    """The crop of a frame, upright, as crop x crop RGB: the crop's square (a side as long as the
    frame's short side) is cut from the decoded frame and only it is scaled and converted, in one
    FFmpeg filter graph (cropping first converts ~half the pixels of a 16:9 frame, not all).

    Where the square lies along the long side is drawn as a resized frame's crop would be: an
    offset of 0 .. (resized long side - crop) pixels, uniform (training) or centred. Rotation
    metadata turns the result upright. The graph runs `threads` threads, as the decoder does:
    left to FFmpeg (cores + 1 threads) it converted a 32 px frame ~4x slower than on one, and a
    digits-task sample took 15.3 ms to decode instead of 9.6 (same pixels)."""

    def __init__(self, frame: av.VideoFrame, crop: int, draws: WindowDraws, threads: int) -> None:
        self.crop, self.threads = crop, threads
        self.turns = round((frame.rotation or 0) / 90) % 4
        short = min(frame.width, frame.height)
        scale = crop / short
        upright = (frame.height, frame.width) if self.turns % 2 else (frame.width, frame.height)
        resized = [max(crop, round(side * scale)) for side in upright]
        left = draws.offset(resized[0] - crop)
        top = draws.offset(resized[1] - crop)
        # where that crop lies as a fraction of the frame, so a change of size mid-stream keeps it
        self.fraction = (left / max(1, resized[0] - crop), top / max(1, resized[1] - crop))
        self.graph: av.filter.Graph | None = None
        self.size: tuple[int, int, str] | None = None

    def _build(self, frame: av.VideoFrame) -> None:
        width, height = frame.width, frame.height
        side = min(width, height)
        upright = (height, width) if self.turns % 2 else (width, height)
        x0, y0 = (round(f * (u - side)) for f, u in zip(self.fraction, upright))
        # the upright square's place in the coded frame (np.rot90 turns coded into upright)
        x, y = {
            0: (x0, y0),
            1: (width - y0 - side, x0),
            2: (width - x0 - side, height - y0 - side),
            3: (y0, height - x0 - side),
        }[self.turns]
        graph = av.filter.Graph()
        graph.threads = self.threads
        chain = [
            graph.add_buffer(
                width=width,
                height=height,
                format=frame.format.name,  # type: ignore[arg-type]  # PyAV takes the name too
                time_base=frame.time_base or Fraction(1, 1000),
            ),
            graph.add("crop", f"{side}:{side}:{x}:{y}"),
            graph.add("scale", f"{self.crop}:{self.crop}:flags=bilinear"),
            graph.add("format", "rgb24"),
            graph.add("buffersink"),
        ]
        for a, b in zip(chain, chain[1:]):
            a.link_to(b)
        graph.configure()
        self.graph, self.size = graph, (width, height, frame.format.name)

    def convert(self, frame: av.VideoFrame) -> np.ndarray:
        if self.size != (frame.width, frame.height, frame.format.name):
            self._build(frame)
        graph = self.graph
        assert graph is not None  # built above
        graph.push(frame)
        array = cast(av.VideoFrame, graph.pull()).to_ndarray()
        return np.rot90(array, self.turns) if self.turns else array


class _FramePicker:
    """Fills out[i] with the frame shown at times[i] (sorted), converting each frame at most once."""

    def __init__(self, times: np.ndarray, crop: int, draws: WindowDraws, threads: int) -> None:
        self.times, self.crop, self.draws, self.threads = times, crop, draws, threads
        self.out = np.empty((len(times), crop, crop, 3), dtype=np.uint8)
        self.filled = 0
        self.converter: _Converter | None = None
        self.previous: tuple[float, av.VideoFrame] | None = None
        self.first_time: float | None = None

    @property
    def done(self) -> bool:
        return self.filled == len(self.times)

    def _fill_until(self, limit: float, frame: av.VideoFrame) -> None:
        """Give `frame` to every unfilled time before `limit`."""
        converted = None
        while self.filled < len(self.times) and self.times[self.filled] < limit:
            if converted is None:
                assert self.converter is not None  # made by the first add()
                converted = self.converter.convert(frame)
            self.out[self.filled] = converted
            self.filled += 1

    def add(self, frame: av.VideoFrame, time: float) -> None:
        if self.converter is None:
            self.converter = _Converter(frame, self.crop, self.draws, self.threads)
            self.first_time = time
        if self.previous is None:
            self._fill_until(time, frame)  # times before the first frame: the first frame
        else:
            self._fill_until(time, self.previous[1])
        self.previous = (time, frame)

    def finish(self) -> None:
        """At the end of the stream: the last frame holds."""
        if self.previous is None:
            raise DecodeError("no video frames")
        self._fill_until(math.inf, self.previous[1])


def _frame_times(container: av.container.InputContainer, stream: av.stream.Stream, until: float) -> np.ndarray:
    """Presentation times of the video's frames from its packets (no decoding), sorted, up to
    the first one past `until`."""
    found = []
    unit = time_base(stream)
    for packet in container.demux(stream):
        if packet.pts is None:
            if packet.dts is None:
                continue
            stamp = packet.dts
        else:
            stamp = packet.pts
        found.append(float(stamp * unit))
        if packet.dts is not None and float(packet.dts * unit) > until + REORDER_MARGIN_S:
            break
    starts = np.unique(np.array(found, dtype=np.float64))
    past = np.searchsorted(starts, until, side="right")
    return starts[: past + 1]


def _decode_into(picker: _FramePicker, container: av.container.InputContainer, stream: av.stream.Stream) -> None:
    for index, decoded in enumerate(container.decode(stream)):
        frame = cast(av.VideoFrame, decoded)
        time = frame.time
        if time is None:  # no timestamps (a raw elementary stream): count frames
            time = index / float(stream.average_rate or 25)
        picker.add(frame, time)
        if picker.done:
            return
    picker.finish()


class _WindowPastEnd(Exception):
    """The header's duration was longer than the video: the window starts after its last frame."""

    def __init__(self, last_frame: float) -> None:
        super().__init__(last_frame)
        self.last_frame = last_frame


def _window_frames(
    container: av.container.InputContainer,
    stream: av.stream.Stream,
    times: np.ndarray,
    crop: int,
    draws: WindowDraws,
    threads: int,
) -> np.ndarray:
    """Frames at `times` of a video longer than the window: seek, decode the window, stop."""
    picker = _FramePicker(times, crop, draws, threads)
    seek_keyframe(container, stream, float(times[0]))
    _decode_into(picker, container, stream)
    stream_start = float((stream.start_time or 0) * time_base(stream))
    if picker.first_time is not None and picker.first_time > max(times[0], stream_start) + 1e-6:
        # The seek landed past the window's start (a broken index): decode from the start.
        container.seek(0)
        picker = _FramePicker(times, crop, draws, threads)
        _decode_into(picker, container, stream)
    if picker.previous is not None and picker.previous[0] < times[0]:
        raise _WindowPastEnd(picker.previous[0])
    return picker.out


def _short_frames(
    container: av.container.InputContainer,
    stream: av.stream.Stream,
    times: np.ndarray,
    crop: int,
    draws: WindowDraws,
    loop: bool,
    threads: int,
) -> np.ndarray:
    """Frames at `times` of a video no longer than the window: it loops (or holds its last
    frame). Frame times come from the packets, so only the frames shown are converted."""
    starts = _frame_times(container, stream, float(times.max()))
    if len(starts) == 0:
        raise DecodeError("no video frames")
    span = starts[-1] + (starts[-1] - starts[-2] if len(starts) > 1 else 1.0)
    picked = np.clip(np.searchsorted(starts, times % span if loop else times, side="right") - 1, 0, len(starts) - 1)
    shown, inverse = np.unique(picked, return_inverse=True)
    container.seek(0)
    picker = _FramePicker(starts[shown], crop, draws, threads)
    _decode_into(picker, container, stream)
    return picker.out[inverse]


def _header_duration(container: av.container.InputContainer) -> float | None:
    if container.duration and container.duration > 0:
        return container.duration / av.time_base
    return None


def _mel_clips(window: np.ndarray, spec: ClipSpec) -> torch.Tensor:
    """The log-mel spectrogram of each clip of the window's samples."""
    clips = torch.from_numpy(window).reshape(spec.clips, spec.clip_samples)
    return log_mel(clips, spec).unsqueeze(1)


def _video_frames(
    container: av.container.InputContainer, spec: ClipSpec, draws: WindowDraws
) -> tuple[np.ndarray, float, bool]:
    """The window's frames, where it starts, and whether the video is shorter than the window."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    threads = max(0, spec.decode_threads)
    stream.codec_context.thread_count = threads
    duration = _header_duration(container) or spec.seconds
    # the same draw as a window anywhere in the file: start = slack x fraction
    fraction = draws.fraction()
    offsets = np.arange(spec.clips * spec.frames_per_clip) / spec.fps
    for _ in range(2):
        slack = max(0.0, duration - spec.seconds)
        if slack == 0:
            loop = spec.short_videos == "loop"
            return _short_frames(container, stream, offsets, spec.crop, draws, loop, threads), 0.0, True
        start = draws.start(fraction, slack)
        try:
            return _window_frames(container, stream, start + offsets, spec.crop, draws, threads), start, False
        except _WindowPastEnd as past:  # the header's duration lied: the frames there are decide
            duration = past.last_frame
            container.seek(0)
    raise DecodeError("the video's frames do not reach the window its header promises")


def decode_clips(
    data: Source | None,
    spec: ClipSpec,
    rng: random.Random | WindowDraws | None = None,
    audio_data: Source | None = None,
) -> dict[str, torch.Tensor]:
    """Encoded video -> {"video": (T, 3, F, crop, crop) uint8, "audio": (T, 1, mel, frames)}.

    `data` and `audio_data` are bytes or seekable binary files. The sound comes from
    `audio_data` (a separate file, e.g. flac) when given, else from the video's own audio track.
    With no video (`data` None) the frames are black. `rng` picks a random window and crop
    (training); None takes the centred ones (evaluation); a WindowDraws also records whether
    they mattered. Videos shorter than the window loop or are padded (`spec.short_videos`).
    `video_to_float` turns the pixels into model input.
    """
    if data is None:
        return _decode_audio_only(audio_data, spec)
    needed = spec.clips * spec.clip_samples
    loop = spec.short_videos == "loop"
    try:
        with open_source(data) as container:
            if not container.streams.video:
                raise DecodeError("no video track")
            draws = rng if isinstance(rng, WindowDraws) else WindowDraws(rng)
            frames, start, short = _video_frames(container, spec, draws)
            if audio_data is None:
                audio = audio_window(container, start, needed, spec.sample_rate, short, loop)
        if audio_data is not None:
            with open_source(audio_data) as sound:
                audio = audio_window(sound, start, needed, spec.sample_rate, short, loop)
    except av.error.FFmpegError as err:
        raise DecodeError(f"undecodable video: {err}") from err
    except (MemoryError, OverflowError) as err:
        raise DecodeError(f"undecodable video: {type(err).__name__}: {err}") from err
    video = torch.from_numpy(frames).reshape(spec.clips, spec.frames_per_clip, spec.crop, spec.crop, 3)
    return {"video": video.permute(0, 4, 1, 2, 3).contiguous(), "audio": _mel_clips(audio, spec)}


def _decode_audio_only(audio_data: Source | None, spec: ClipSpec) -> dict[str, torch.Tensor]:
    """A sound without picture (ESC-50's clips): its centred window, and black frames."""
    if audio_data is None:
        raise DecodeError("neither video nor audio data")
    needed = spec.clips * spec.clip_samples
    try:
        with open_source(audio_data) as sound:
            duration = _header_duration(sound)
            if duration is None or duration <= spec.seconds:  # short, or of unknown length: decode it whole
                audio, _ = decode_audio(sound, 0.0, spec.sample_rate, None)
                start = max(0.0, len(audio) / spec.sample_rate - spec.seconds) / 2
                if spec.short_videos == "loop" and len(audio) < needed:
                    audio = np.tile(audio, math.ceil(needed / len(audio)))
                window = cut_window(audio, int(round(start * spec.sample_rate)), needed)
            else:
                start = (duration - spec.seconds) / 2
                window = audio_window(sound, start, needed, spec.sample_rate, short=False, loop=False)
    except av.error.FFmpegError as err:
        raise DecodeError(f"undecodable audio: {err}") from err
    except (MemoryError, OverflowError) as err:
        raise DecodeError(f"undecodable audio: {type(err).__name__}: {err}") from err
    video = torch.zeros(spec.clips, 3, spec.frames_per_clip, spec.crop, spec.crop, dtype=torch.uint8)
    return {"video": video, "audio": _mel_clips(window, spec)}
