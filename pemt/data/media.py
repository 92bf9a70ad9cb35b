"""Opening a media file with PyAV, and the stream arithmetic video and audio decoding share."""

from __future__ import annotations

import io
from fractions import Fraction
from typing import BinaryIO

import av

from pemt.data.errors import DecodeError

Source = bytes | BinaryIO


def open_source(source: Source) -> av.container.InputContainer:
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    return av.open(source, mode="r", metadata_errors="ignore")


def time_base(stream: av.stream.Stream) -> Fraction:
    # FFmpeg gives every demuxed stream one; None would be a container PyAV did not open
    if stream.time_base is None:
        raise DecodeError(f"stream {stream.index} has no time base")
    return stream.time_base


def seek_keyframe(container: av.container.InputContainer, stream: av.stream.Stream, seconds: float) -> None:
    """To the keyframe at or before `seconds` (stream time); a file without an index (or one that
    refuses) is simply decoded from where it is, which only costs time."""
    try:
        container.seek(max(0, int(seconds / time_base(stream))), stream=stream, backward=True, any_frame=False)
    except av.error.FFmpegError:
        container.seek(0)
