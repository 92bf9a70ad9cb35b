from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import pytest

from pemt.data.synthetic import SyntheticSpec, render

REPO = Path(__file__).resolve().parents[1]
# DeepSpeed JIT-compiles its communication op once; every test run reuses the project's cache.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# Small enough for a 2-core machine; 8 shards, one per virtual stream (data.streams=8).
SMALL_DATA = ["data.synthetic.videos=16", "data.synthetic.videos_per_shard=2", "data.synthetic.seconds=2.0"]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated synthetic shards shared by every launch in the session."""
    return tmp_path_factory.mktemp("cache")


def run_pretrain(root: Path, cache: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python launch/pretrain.py` as a user runs it, with outputs under `root`."""
    return run_launch("pretrain.py", root, cache, *SMALL_DATA, *overrides, timeout=timeout)


def run_launch(script: str, root: Path, cache: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python launch/<script>` as a user runs it, with outputs under `root`."""
    flags = [o for o in overrides if o.startswith("-")]
    values = [o for o in overrides if not o.startswith("-")]
    cmd = [sys.executable, str(REPO / "launch" / script), *flags, f"paths.root={root}", f"paths.cache={cache}", *values]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def run_name(*overrides: str) -> str:
    """The run folder Hydra derives from the science-changing overrides (sorted, comma-joined)."""
    from pemt.config import run_name as folder_name

    return folder_name(",".join(sorted([*SMALL_DATA, *overrides])))


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"


def video_without_audio(size: int = 32, seconds: float = 1.0) -> bytes:
    """A valid H.264 mp4 with no audio track."""
    import io

    frames, _, _ = render(SyntheticSpec(seconds=seconds, size=size), 0)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def encode_video(seconds: float = 4.0, fps: int = 16, size: tuple[int, int] = (48, 32), gop: int = 16,
                 bframes: int = 0, open_gop: bool = False, audio_seconds: float | None = None,
                 rate: int = 16000, layout: str = "mono", rotation: int = 0, fmt: str = "mp4",
                 vfr: bool = False) -> bytes:
    """A real H.264 (+ AAC) file made the way real-world ones differ: GOP, B-frames and open GOPs,
    variable frame rate, rotation metadata, audio of another length, rate or layout, container.
    Frame i carries its index in its colour (red = 7 i mod 256), a white marker top-left, and the
    audio is a 440 Hz tone."""
    import io
    from fractions import Fraction

    import numpy as np

    buffer = io.BytesIO()
    width, height = size
    with av.open(buffer, mode="w", format=fmt) as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"g": str(gop), "bf": str(bframes), "preset": "veryfast" if bframes else "ultrafast",
                         **({"x264-params": "open-gop=1"} if open_gop else {})}
        if vfr:
            video.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            video.set_display_rotation(rotation)
        sound = container.add_stream("aac", rate=rate, layout=layout) if audio_seconds != 0 else None
        clock = 0.0
        for i in range(int(seconds * fps)):
            image = np.zeros((height, width, 3), np.uint8)
            image[..., 0], image[..., 1] = (7 * i) % 256, (13 * i) % 256
            image[:4, :4] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if vfr:  # runs of five frames at 1.5x and 0.5x the nominal interval
                frame.pts, frame.time_base = int(round(clock * 1000)), Fraction(1, 1000)
                clock += (1.5 if (i // 5) % 2 == 0 else 0.5) / fps
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        if sound is not None:
            channels = len(av.AudioLayout(layout).channels)
            total = int((seconds if audio_seconds is None else audio_seconds) * rate)
            for begin in range(0, total, 1024):
                t = (begin + np.arange(min(1024, total - begin))) / rate
                tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
                piece = av.AudioFrame.from_ndarray(np.repeat(tone[None], channels, 0), format="fltp", layout=layout)
                piece.sample_rate, piece.pts, piece.time_base = rate, begin, Fraction(1, rate)
                for packet in sound.encode(piece):
                    container.mux(packet)
            for packet in sound.encode(None):
                container.mux(packet)
    return buffer.getvalue()


def repeat_video(data: bytes, times: int, fmt: str = "mp4") -> bytes:
    """The file's packets `times` over: a long video in seconds, not re-encoded."""
    import io

    from pemt.data.synthetic import repeat_video as repeat

    out = io.BytesIO()
    repeat(io.BytesIO(data), out, times, fmt)
    return out.getvalue()
