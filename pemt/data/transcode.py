"""Making videos cheap to decode once, when they are packed, instead of every epoch.

A source video is re-encoded to H.264 at a smaller size (short side), at most a frame rate,
with a keyframe every second (so a training decode seeks close to its window), at a stated
quality (x264's CRF). Its sound is kept as it is (the packets copied) or resampled and encoded
as AAC. Rotation metadata is carried over. Frame rule as in decoding: output frame k is the
source frame shown at k / fps.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, cast

import av


@dataclass(frozen=True)
class Transcode:
    short_side: int | None = None  # pixels of the shorter side; None: the source's
    fps: float | None = None  # at most this many frames per second; None: the source's
    crf: int = 23  # x264 constant rate factor: 18 near-lossless, 23 default, 28 small
    preset: str = "veryfast"  # x264 speed/size trade-off
    sample_rate: int | None = None  # None: the sound is kept as it is; else resampled to this, AAC
    keyframe_s: float = 1.0  # seconds between keyframes: how far a window's seek lands before it

    def __post_init__(self) -> None:
        if self.short_side is not None and (self.short_side < 16 or self.short_side % 2):
            raise ValueError(f"--short-side {self.short_side}: an even number of pixels >= 16")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"--fps {self.fps}: must be > 0")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"--crf {self.crf}: x264 takes 0 (lossless) to 51")

    def describe(self) -> dict[str, Any]:
        """What the manifest records of the transform."""
        return {"codec": "h264", **asdict(self), "sound": "kept" if self.sample_rate is None else "aac"}


def _size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    if short_side is None or short_side >= min(width, height):
        return width - width % 2, height - height % 2
    scale = short_side / min(width, height)

    def even(side: int) -> int:  # yuv420p needs even sides
        return max(2, int(round(side * scale / 2)) * 2)

    return even(width), even(height)


def transcode(path: str, spec: Transcode) -> tuple[bytes, dict[str, Any]]:
    """The re-encoded mp4's bytes and its facts (duration, fps, width, height). Raises ValueError
    with the reason when the source cannot be read."""
    out = io.BytesIO()
    try:
        with av.open(path, metadata_errors="ignore") as source:
            if not source.streams.video:
                raise ValueError("no video track")
            video_in = source.streams.video[0]
            audio_in = source.streams.audio[0] if source.streams.audio else None
            rate = float(video_in.average_rate or video_in.guessed_rate or 25)
            fps = min(rate, spec.fps) if spec.fps else rate
            first = next(source.decode(video_in), None)  # size and rotation, before any stream is opened
            if first is None:
                raise ValueError("no video frames")
            source.seek(0)
            with av.open(out, mode="w", format="mp4") as target:
                writer = _VideoWriter(target, video_in, fps, spec, first)
                audio = _AudioWriter(target, audio_in, spec) if audio_in is not None else None
                streams = [video_in] + ([audio_in] if audio_in is not None else [])
                for packet in source.demux(*streams):
                    if packet.stream.type == "video":
                        for frame in packet.decode():
                            writer.add(cast(av.VideoFrame, frame))
                    elif audio is not None:
                        audio.add(packet)
                writer.close()
                if audio is not None:
                    audio.close()
                facts = {"duration": writer.duration, "fps": fps, "width": writer.width, "height": writer.height}
    except av.error.FFmpegError as err:
        raise ValueError(f"cannot transcode: {err}") from err
    return out.getvalue(), facts


class _VideoWriter:
    def __init__(
        self,
        target: av.container.OutputContainer,
        source: av.video.stream.VideoStream,
        fps: float,
        spec: Transcode,
        first: av.VideoFrame,
    ) -> None:
        self.target = target
        self.rate = Fraction(fps).limit_denominator(1001)
        self.stream = target.add_stream("libx264", rate=self.rate)
        self.stream.pix_fmt = "yuv420p"
        gop = max(1, round(spec.keyframe_s * fps))
        # keyframes exactly every gop frames, so a seek lands at most keyframe_s before a window
        self.stream.options = {
            "crf": str(spec.crf),
            "preset": spec.preset,
            "g": str(gop),
            "keyint_min": str(gop),
            "sc_threshold": "0",
        }
        self.spec, self.source = spec, source
        self.width, self.height = _size(first.width, first.height, spec.short_side)
        self.stream.width, self.stream.height = self.width, self.height
        if first.rotation:
            self.stream.set_display_rotation(first.rotation)
        self.frames = 0
        self.previous: av.VideoFrame | None = None
        self.last_time = 0.0

    @property
    def duration(self) -> float:
        return self.frames / float(self.rate)

    def _emit(self, frame: av.VideoFrame) -> None:
        scaled = frame.reformat(width=self.width, height=self.height, format="yuv420p", interpolation="AREA")
        scaled.pts, scaled.time_base = self.frames, Fraction(1) / self.rate
        self.target.mux(self.stream.encode(scaled))
        self.frames += 1

    def add(self, frame: av.VideoFrame) -> None:
        """Output frames whose time falls before this frame's get the frame shown until now."""
        time = frame.time if frame.time is not None else self.last_time + 1 / float(self.rate)
        if self.previous is None:
            self.previous = frame
        while self.frames / float(self.rate) < time - 1e-9:
            self._emit(self.previous)
        self.previous, self.last_time = frame, time

    def close(self) -> None:
        if self.previous is not None:
            end = self.last_time + 1 / float(self.source.average_rate or self.rate)
            while self.frames / float(self.rate) < end - 1e-9 or self.frames == 0:
                self._emit(self.previous)
        self.target.mux(self.stream.encode(None))


class _AudioWriter:
    """The sound's packets copied as they are, or decoded, resampled and encoded as AAC."""

    def __init__(
        self, target: av.container.OutputContainer, source: av.audio.stream.AudioStream, spec: Transcode
    ) -> None:
        self.source, self.target = source, target
        self.stream: av.audio.stream.AudioStream
        if spec.sample_rate is None:
            self.stream = target.add_stream_from_template(source)
            self.resampler = None
        else:
            layout = "mono" if source.codec_context.layout.nb_channels == 1 else "stereo"
            self.stream = target.add_stream("aac", rate=spec.sample_rate, layout=layout)
            self.resampler = av.AudioResampler(format="fltp", layout=layout, rate=spec.sample_rate)

    def _encode(self, frames: list[av.AudioFrame]) -> None:
        for frame in frames:
            frame.pts = None  # the encoder numbers samples itself: a continuous track
            self.target.mux(self.stream.encode(frame))

    def add(self, packet: av.Packet[Any]) -> None:
        if self.resampler is None:
            if packet.dts is not None:
                packet.stream = self.stream
                self.target.mux(packet)
            return
        for frame in packet.decode():
            self._encode(self.resampler.resample(cast(av.AudioFrame, frame)))

    def close(self) -> None:
        if self.resampler is not None:
            self._encode(self.resampler.resample(None))
            self.target.mux(self.stream.encode(None))
