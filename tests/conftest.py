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
