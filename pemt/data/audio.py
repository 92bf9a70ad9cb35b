"""The audio of a sample's window: sought, resampled to mono at the model's rate, placed by its
timestamps. Where the track does not cover the window it is silence; a short video's track
repeats with its picture or ends in silence."""

from __future__ import annotations

import math

import av
import numpy as np

from pemt.data.errors import DecodeError
from pemt.data.media import seek_keyframe

# Audio is decoded from this long before the window: AAC frames overlap their neighbours and
# resamplers filter across samples, so the first output after a seek differs from a decode from
# the start; a quarter second settles both.
AUDIO_PRE_ROLL_S = 0.25


def _mono(resampler: av.AudioResampler | None, frame: av.AudioFrame | None) -> list[np.ndarray]:
    if resampler is None:  # already what the model reads: the samples as they are
        return [] if frame is None else [frame.to_ndarray().reshape(-1)]
    return [r.to_ndarray().reshape(-1) for r in resampler.resample(frame)]


def _resampler_for(frame: av.AudioFrame, rate: int) -> av.AudioResampler | None:
    """A resampler to float mono at `rate`, or None where the track is that already: the samples
    are the same, and the resampler took a third of a digits video's whole decode (33 -> 20 ms)."""
    if frame.format.name in ("flt", "fltp") and len(frame.layout.channels) == 1 and frame.sample_rate == rate:
        return None
    return av.AudioResampler(format="flt", layout="mono", rate=rate)


def _on_output_grid(frame: av.AudioFrame, rate: int) -> tuple[av.AudioFrame, int]:
    """The first frame after a seek, trimmed to start on an instant that is a whole sample at
    `rate` (and that sample's index): the resampler then computes the same samples as in a decode
    from the start, not ones shifted by a fraction of a sample."""
    position = int(round((frame.time or 0.0) * frame.sample_rate))
    step = frame.sample_rate // math.gcd(frame.sample_rate, rate)
    trim = -position % step
    if trim and trim < frame.samples:
        planes = frame.to_ndarray()
        planar = planes.shape[0] == len(frame.layout.channels) and frame.format.is_planar
        kept = planes[:, trim:] if planar else planes[:, trim * len(frame.layout.channels) :]
        trimmed = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(kept),  # type: ignore[arg-type]  # any of the sample formats
            format=frame.format.name,
            layout=frame.layout.name,
        )
        trimmed.sample_rate = frame.sample_rate
        frame, position = trimmed, position + trim
    return frame, position * rate // frame.sample_rate


def decode_audio(
    container: av.container.InputContainer, begin: float, rate: int, stop_at: int | None
) -> tuple[np.ndarray, int]:
    """Mono samples at `rate` from the audio packet at or before `begin` seconds, and the index
    (time x rate) of the first one; decoding stops once sample `stop_at` is held (None: the end)."""
    if not container.streams.audio:
        raise DecodeError("no audio track")
    stream = container.streams.audio[0]
    if begin > 0:
        seek_keyframe(container, stream, begin)
    else:
        container.seek(0)
    resampler: av.AudioResampler | None = None
    pieces: list[np.ndarray] = []
    held, origin = 0, None
    for frame in container.decode(stream):
        if origin is None:
            frame, origin = _on_output_grid(frame, rate) if begin > 0 else (frame, 0)
            resampler = _resampler_for(frame, rate)
        for piece in _mono(resampler, frame):
            pieces.append(piece)
            held += len(piece)
        # a few samples more: the resampler holds some back until it is flushed
        if stop_at is not None and origin + held >= stop_at + 64:
            break
    else:
        pieces += _mono(resampler, None)
    if not pieces or not sum(len(p) for p in pieces):
        raise DecodeError("empty audio track")
    audio = np.concatenate(pieces)
    if not np.isfinite(audio).all():
        raise DecodeError("non-finite audio samples")
    return audio, origin or 0


def audio_window(
    container: av.container.InputContainer, start: float, needed: int, rate: int, short: bool, loop: bool
) -> np.ndarray:
    """`needed` mono samples at `rate` from `start` seconds on.

    A long video's track is sought and placed by its timestamps: what it does not cover is
    silence. A short video's track (`short`, decoded whole from its first sample) repeats with its
    picture (`loop`) or ends in silence."""
    first = int(round(start * rate))
    if short:
        audio, origin = decode_audio(container, 0.0, rate, None)
        if loop and first + needed > len(audio):
            audio = np.tile(audio, math.ceil((first + needed) / len(audio)))
    else:
        audio, origin = decode_audio(container, start - AUDIO_PRE_ROLL_S, rate, first + needed)
    return cut_window(audio, first - origin, needed)


def cut_window(audio: np.ndarray, offset: int, needed: int) -> np.ndarray:
    """audio[offset:offset + needed], silent where that reaches outside the array."""
    window = np.zeros(needed, dtype=np.float32)
    lo, hi = max(0, offset), min(len(audio), offset + needed)
    if hi > lo:
        window[lo - offset : hi - offset] = audio[lo:hi]
    return window
