from __future__ import annotations

import fcntl
import json
import os
import random
import socket
import subprocess
import sys
import wave
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

from pemt.data.synthetic import SyntheticSpec, encode_mp4, render

REPO = Path(__file__).resolve().parents[1]
# DeepSpeed JIT-compiles its communication op once; every test run reuses the project's cache.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Test workers running side by side share the cores, as ranks on one host do: a worker whose
# torch threads outnumber its share of the cores has them wait on each other at every op.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _WORKERS))

# Small enough for a 2-core machine; 8 shards, one per virtual stream (data.streams=8).
SMALL_DATA = ["data.synthetic.videos=16", "data.synthetic.videos_per_shard=2", "data.synthetic.seconds=2.0"]


@pytest.fixture(scope="session")
def single_rank_deepspeed() -> None:
    """DeepSpeed's process group in this process: one rank over gloo, for engine-level tests."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated synthetic shards shared by every launch in the session."""
    return tmp_path_factory.mktemp("cache")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with the most end-to-end (`slow`) tests first, each kept whole: test workers take
    files in this order, and a long file taken last would run alone at the end."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    first = {}
    for index, item in enumerate(items):
        first.setdefault(item.path, index)
    items.sort(key=lambda item: (-slow[item.path], first[item.path]))


def run_pretrain(root: Path, cache: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python launch/pretrain.py` as a user runs it, with outputs under `root`."""
    return run_launch("pretrain.py", root, cache, *SMALL_DATA, *overrides, timeout=timeout)


def run_launch(
    script: str, root: Path, cache: Path, *overrides: str, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`python launch/<script>` as a user runs it, with outputs under `root`."""
    flags = [o for o in overrides if o.startswith("-")]
    values = [o for o in overrides if not o.startswith("-")]
    cmd = [sys.executable, str(REPO / "launch" / script), *flags, f"paths.root={root}", f"paths.cache={cache}", *values]
    try:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        # The launcher's own output shows rank 0 only: what every rank last wrote says which one hung.
        pytest.fail(f"{err}\n--- launcher stderr\n{_text(err.stderr)[-3000:]}\n{_job_logs(root)}", pytrace=False)


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _job_logs(root: Path, lines: int = 25) -> str:
    """The last lines of every task's log under `root` (submitit's job folders)."""
    parts = []
    for log in sorted(root.rglob(".submitit/*/*_log.*")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {log.relative_to(root)}\n" + "\n".join(tail))
    return "\n".join(parts) or f"(no job logs under {root})"


def run_resume(*args: str) -> subprocess.CompletedProcess:
    """`python tools/resume.py ARGS` as a user runs it."""
    cmd = [sys.executable, str(REPO / "tools" / "resume.py"), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def run_name(*overrides: str) -> str:
    """The run folder Hydra derives from the science-changing overrides (sorted, comma-joined)."""
    from pemt.config import run_name as folder_name

    return folder_name(",".join(sorted([*SMALL_DATA, *overrides])))


def keys_by_step(run_dir: Path) -> dict[int, list[str]]:
    """The sample keys every step saw, over all ranks (from train.record_samples=true)."""
    steps: dict[int, list[str]] = {}
    for record in sorted((run_dir / "samples").glob("rank*.jsonl")):
        for line in record.read_text().splitlines():
            entry = json.loads(line)
            steps[entry["step"]] = sorted(steps.get(entry["step"], []) + entry["keys"])
    return steps


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


@pytest.fixture(scope="session")
def damaged_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 shards of 4 samples: good ones, and each kind of damage (read locally and remotely)."""
    from pemt.data.shards import write_shards
    from pemt.data.synthetic import make_sample

    spec = SyntheticSpec(videos=12, seconds=1.0, size=32)
    good = [make_sample(spec, i) for i in range(12)]
    truncated = dict(good[1], mp4=good[1]["mp4"][:2000])
    silent = dict(good[2], mp4=video_without_audio())
    malformed = dict(good[3], json=b"{not json")
    samples = [good[0], truncated, silent, malformed, *good[4:]]
    out = tmp_path_factory.mktemp("damaged") / "set"
    write_shards(iter(samples), out, samples_per_shard=4)
    # A corrupt tar: the last shard is cut in the middle of its second member.
    last = out / "shard-000002.tar"
    last.write_bytes(last.read_bytes()[: 512 * 3 + 3000])
    return out


def encode_video(
    seconds: float = 4.0,
    fps: int = 16,
    size: tuple[int, int] = (48, 32),
    gop: int = 16,
    bframes: int = 0,
    open_gop: bool = False,
    audio_seconds: float | None = None,
    rate: int = 16000,
    layout: str = "mono",
    rotation: int = 0,
    fmt: str = "mp4",
    vfr: bool = False,
) -> bytes:
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
        video.options = {
            "g": str(gop),
            "bf": str(bframes),
            "preset": "veryfast" if bframes else "ultrafast",
            **({"x264-params": "open-gop=1"} if open_gop else {}),
        }
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


def write_video(path: Path, index: int = 0) -> None:
    spec = SyntheticSpec(seconds=1.0, size=24)
    frames, audio, _ = render(spec, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_mp4(frames, audio, spec.source_fps, spec.sample_rate))


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000) -> None:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1), handle.setsampwidth(2), handle.setframerate(rate)
        handle.writeframes(samples.tobytes())


def make_charades(root: Path) -> None:
    (root / "Charades").mkdir(parents=True)
    (root / "Charades" / "Charades_v1_classes.txt").write_text(
        "c000 Holding some clothes\nc001 Putting clothes somewhere\nc002 Taking some clothes from somewhere\n"
    )
    header = "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"
    train = {
        "46GP8": "c000 0.0 5.0;c002 1.0 3.0",
        "N11GT": "c001 2.0 4.0",
        "0IH69": "c000 1.0 2.0",
        "KRF68": "c002 0.0 1.0;c001 0.5 1.5",
    }
    test = {"YSKX3": "c000 0.0 1.0;c001 1.0 2.0", "ZZZZ1": "c002 0.0 1.0", "QQQQ2": ""}
    for name, table in (("train", train), ("test", test)):
        (root / "Charades" / f"Charades_v1_{name}.csv").write_text(
            header + "".join(f'{vid},P1,Kitchen,6,7,Yes,s,o,d,"{acts}",10\n' for vid, acts in table.items())
        )
    for i, vid in enumerate([*train, *test]):
        write_video(root / "Charades_v1_480" / f"{vid}.mp4", i)


_PORT_LOCKS = Path(os.environ.get("TMPDIR", "/tmp")) / "pemt-test-ports"
_held_ports: list[int] = []  # lock file descriptors, held until this process ends


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _reserve(port: int) -> int | None:
    """A lock on `port` held for this process, if no other test process holds it and it is free."""
    handle = os.open(_PORT_LOCKS / str(port), os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with socket.socket() as probe:  # not in use by something outside the tests
            probe.bind(("127.0.0.1", port))
    except OSError:
        os.close(handle)
        return None
    return handle


def free_port(count: int = 1) -> int:
    """The first of `count` consecutive TCP ports for servers a test starts, held for this
    process without a socket.

    Binding port 0 and closing it hands the port back to the kernel, which may give it to any
    other process before the server binds it. Instead the ports come from below the kernel's
    ephemeral range (which `bind(0)` and outgoing connections never use) and are reserved with
    lock files every test process on the machine respects, for as long as this process lives.
    """
    _PORT_LOCKS.mkdir(parents=True, exist_ok=True)
    high = min(_ephemeral_low(), 32768)
    high = high if high > 21000 else 30000  # a machine whose ephemeral range starts low
    for first in random.sample(range(20000, high - count), 200):
        handles = []
        for port in range(first, first + count):
            handle = _reserve(port)
            if handle is None:
                break
            handles.append(handle)
        if len(handles) == count:
            _held_ports.extend(handles)
            return first
        for handle in handles:
            os.close(handle)
    raise RuntimeError(f"no {count} free ports between 20000 and {high}")
