"""What one training sample costs to decode at the paper's window, against the decoder's floor.

    python benchmarks/video_decode.py                     # 10 s / 2 min / 10 min at 360p, 720p, 1080p
    python benchmarks/video_decode.py --quick             # a smoke run: 360p, 10 s and 2 min

Window: 30 clips x 16 frames at 16 fps (30 s), 112 px crop, 16 kHz mono audio. Sources are H.264
(x264 veryfast, CRF 23, a keyframe every 2 s) + AAC 44.1 kHz stereo at 25 fps, made here: a 10 s
clip per resolution, repeated (packets re-muxed, not re-encoded) into 2 and 10 minutes.

Per sample, each in a fresh process: core-seconds (process CPU time, all threads) and the memory
one decode adds over the process's resting RSS (sampled every 5 ms), for
  floor       the bare decoder: seek, decode exactly the window's video and audio frames, no
              conversion, no resampling;
  before      pemt's decoder before windowed decoding (git {BEFORE}): decodes from the start;
              skipped where it would hold more frames than this machine has memory for;
  pemt        pemt.data.decode.decode_clips on the file, as the loader reads a shard member;
  transcoded  the same on the source transcoded as tools/make_shards.py --short-side 128 --fps 16;
  torchcodec  torchcodec's VideoDecoder/AudioDecoder (CPU), if it is installed and loads.
Then the CPU cores per GPU the paper's model needs: FLOPs per sample from the trainer's counter
(model=avbert_base, sharing as configured, forward + backward) at 40% MFU of an H100 SXM's
989 TFLOP/s bf16. Writes benchmarks/results/video_decode.{md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEFORE = "a8404bc"  # the last commit whose decoder decoded from the start of the file
WINDOW = dict(
    clips=30, frames_per_clip=16, fps=16, crop=112, sample_rate=16000, mel_bins=32, mel_window_ms=25, mel_hop_ms=10
)
H100_BF16_TFLOPS, MFU = 989.0, 0.40
SOURCE_FPS = 25
RAW_FRAME_BYTES = 1.5  # yuv420p bytes per pixel: what the old decoder held per decoded frame
TORCHCODEC_NEEDS = (
    "It needs FFmpeg 4-8 shared libraries (Debian: libavcodec59 libavformat59 libavutil57 "
    "libswscale6 libswresample4 libavfilter8 libavdevice59) and a torchcodec build matching torch; "
    "PyPI's wheel is a CUDA 13 build that loads libnvrtc.so.13 even for CPU decoding, and the "
    "CPU build is on download.pytorch.org/whl/cpu."
)


# -- sources --------------------------------------------------------------------------------
def _encode_clip(path: Path, height: int, seconds: float) -> None:
    import av
    import numpy as np

    width = (height * 16 // 9) // 2 * 2
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=SOURCE_FPS)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "veryfast", "crf": "23", "g": str(2 * SOURCE_FPS)}
        audio = container.add_stream("aac", rate=44100, layout="stereo")
        yy, xx = np.mgrid[:height, :width]
        rng = np.random.default_rng(0)
        position = 0
        for i in range(int(seconds * SOURCE_FPS)):
            # moving gradients with speckle: detail a real camera's bitrate would carry
            image = np.stack([(xx + 7 * i) % 256, (yy + 3 * i) % 256, ((xx + yy) // 2 + 5 * i) % 256], -1)
            image = image.astype(np.uint8)
            image[::7, ::5] = rng.integers(0, 255, size=image[::7, ::5].shape)
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
            until = int((i + 1) / SOURCE_FPS * 44100)
            while position + 1024 <= until:
                t = (position + np.arange(1024)) / 44100
                tone = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(1024)).astype(np.float32)
                frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
                frame.sample_rate, frame.pts, frame.time_base = 44100, position, Fraction(1, 44100)
                for packet in audio.encode(frame):
                    container.mux(packet)
                position += 1024
        for stream in (video, audio):
            for packet in stream.encode(None):
                container.mux(packet)


def make_sources(work: Path, heights: list[int], lengths: list[int]) -> dict[tuple[str, int, int], Path]:
    """(kind, height, seconds) -> file, kind `source` or `transcoded`."""
    from tqdm import tqdm

    from pemt.data.synthetic import repeat_video
    from pemt.data.transcode import Transcode, transcode

    files = {}
    for height in tqdm(heights, desc="sources"):
        clip = work / f"{height}p_10s.mp4"
        if not clip.exists():
            _encode_clip(clip, height, 10)
        small = work / f"{height}p_10s_t128.mp4"
        if not small.exists():
            small.write_bytes(transcode(str(clip), Transcode(short_side=128, fps=16))[0])
        for seconds in lengths:
            for kind, base in (("source", clip), ("transcoded", small)):
                path = base if seconds == 10 else work / f"{base.stem.replace('_10s', f'_{seconds}s')}.mp4"
                if not path.exists():
                    repeat_video(str(base), str(path), seconds // 10)
                files[(kind, height, seconds)] = path
    return files


# -- one measurement, in its own process --------------------------------------------------------
def _window(seed: int, duration: float) -> float:
    seconds = WINDOW["clips"] * WINDOW["frames_per_clip"] / WINDOW["fps"]
    return max(0.0, duration - seconds) * random.Random(seed).random()


def _floor(path: str, seed: int) -> None:
    import av

    seconds = WINDOW["clips"] * WINDOW["frames_per_clip"] / WINDOW["fps"]
    with av.open(path) as container:
        start = _window(seed, container.duration / av.time_base)
        container.streams.video[0].codec_context.thread_count = 1  # the least core time, as pemt decodes
        for stream in (container.streams.video[0], container.streams.audio[0]):
            container.seek(int(start / stream.time_base), stream=stream)
            for frame in container.decode(stream):
                if frame.time is not None and frame.time > start + seconds:
                    break


def _before(path: str, seed: int) -> None:
    import git_decoder  # written next to this process by the parent: pemt's decoder at BEFORE

    data = Path(path).read_bytes()  # the old loader held each member's bytes
    git_decoder.decode_clips(data, git_decoder.ClipSpec(**WINDOW), random.Random(seed))


def _pemt(path: str, seed: int) -> None:
    from pemt.data.decode import ClipSpec, decode_clips

    with open(path, "rb") as handle:  # as a shard member is read: a file, not its bytes
        decode_clips(handle, ClipSpec(**WINDOW), random.Random(seed))


def _torchcodec(path: str, seed: int) -> None:
    import torch
    from torch.nn.functional import interpolate
    from torchcodec.decoders import AudioDecoder, VideoDecoder

    seconds = WINDOW["clips"] * WINDOW["frames_per_clip"] / WINDOW["fps"]
    video = VideoDecoder(path, seek_mode="approximate", device="cpu")
    start = _window(seed, float(video.metadata.duration_seconds))
    times = [start + i / WINDOW["fps"] for i in range(WINDOW["clips"] * WINDOW["frames_per_clip"])]
    frames = video.get_frames_played_at(seconds=times).data  # (N, 3, H, W) uint8
    scale = WINDOW["crop"] / min(frames.shape[-2:])
    resized = interpolate(frames.float(), scale_factor=scale, mode="bilinear")
    top, left = (resized.shape[-2] - WINDOW["crop"]) // 2, (resized.shape[-1] - WINDOW["crop"]) // 2
    resized[..., top : top + WINDOW["crop"], left : left + WINDOW["crop"]].to(torch.uint8)
    AudioDecoder(path, sample_rate=WINDOW["sample_rate"], num_channels=1).get_samples_played_in_range(
        start, start + seconds
    )


METHODS = {"floor": _floor, "before": _before, "pemt": _pemt, "transcoded": _pemt, "torchcodec": _torchcodec}


def measure(method: str, path: str, seed: int) -> dict:
    import psutil

    process = psutil.Process()
    resting = process.memory_info().rss
    peak, running = [resting], True

    def sample() -> None:
        while running:
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu, wall = time.process_time(), time.perf_counter()
    METHODS[method](path, seed)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    running = False
    sampler.join()
    return {"core_s": cpu, "wall_s": wall, "added_mb": (max(peak[0], process.memory_info().rss) - resting) / 2**20}


def run_measure(method: str, path: Path, seed: int, work: Path) -> dict | None:
    """One measurement in a fresh process (its own resting RSS and peak)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, __file__, "--measure", method, str(path), str(seed)], capture_output=True, text=True, env=env
    )
    if result.returncode:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _warm(method: str) -> None:
    """Imports the method needs, before the resting RSS is read."""
    import av  # noqa: F401
    import numpy  # noqa: F401
    import torch  # noqa: F401

    if method in ("pemt", "transcoded"):
        import pemt.data.decode  # noqa: F401
    elif method == "before":
        import git_decoder  # noqa: F401
    elif method == "torchcodec":
        import torchcodec.decoders  # noqa: F401


# -- the model's appetite ------------------------------------------------------------------
def flops_per_sample() -> float:
    """Forward + backward FLOPs of one sample at the window, by the trainer's counter. The model
    is built on the CPU (its orthogonal parametrisation checks itself) then moved to the meta
    device, so nothing is computed. The masked-embedding heads are off: two small linear layers."""
    import torch

    from pemt.config import compose_config
    from pemt.data.decode import mel_frames
    from pemt.data.loader import clip_spec
    from pemt.model.factory import build_pretraining_model
    from pemt.track.metrics import counting_flops

    overrides = ["model=avbert_base", "loss.mep_weight=0", *(f"data.{k}={v}" for k, v in WINDOW.items())]
    cfg = compose_config("pretrain", overrides=overrides)
    model = build_pretraining_model(cfg).to("meta")
    spec, batch = clip_spec(cfg.data), 2
    with torch.device("meta"):
        video = torch.empty(batch, spec.clips, 3, spec.frames_per_clip, spec.crop, spec.crop)
        audio = torch.empty(batch, spec.clips, 1, spec.mel_bins, mel_frames(spec))
    with counting_flops() as counted:
        model(video, audio, step_seed=0)["loss"].backward()
    return counted["flops"] / batch


# -- report --------------------------------------------------------------------------------
def _old_decoder_fits(height: int, seconds: int) -> bool:
    """The old decoder held every frame from the start to the window's end: at most the whole video."""
    width = height * 16 // 9
    held = seconds * SOURCE_FPS * width * height * RAW_FRAME_BYTES
    import psutil

    return held < 0.5 * psutil.virtual_memory().total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.replace("{BEFORE}", BEFORE), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heights", type=int, nargs="+", default=[360, 720, 1080])
    parser.add_argument("--lengths", type=int, nargs="+", default=[10, 120, 600], help="seconds (multiples of 10)")
    parser.add_argument("--seeds", type=int, default=2, help="windows per source")
    parser.add_argument("--quick", action="store_true", help="360p, 10 s and 2 min, one window")
    parser.add_argument("--work", type=Path, help="where sources are made (kept for reruns)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--measure", nargs=3, metavar=("METHOD", "PATH", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        method, path, seed = args.measure
        _warm(method)
        print(json.dumps(measure(method, path, int(seed))))
        return
    if args.quick:
        args.heights, args.lengths, args.seeds = [360], [10, 120], 1
    work = args.work or Path(tempfile.mkdtemp(prefix="pemt-decode-"))
    work.mkdir(parents=True, exist_ok=True)
    old = subprocess.run(
        ["git", "show", f"{BEFORE}:pemt/data/decode.py"], capture_output=True, text=True, cwd=HERE.parent
    )
    methods = ["floor", "pemt", "transcoded"]
    if old.returncode == 0:
        (work / "git_decoder.py").write_text(old.stdout)
        methods.insert(1, "before")
    else:
        print(f"no git history here ({old.stderr.strip()}): the 'before' column is left out")
    try:
        import torchcodec.decoders  # noqa: F401

        methods.append("torchcodec")
    except Exception as err:  # noqa: BLE001 - an optional backend: say why it is left out
        torchcodec_note = (
            f"torchcodec not measured: {type(err).__name__}: {str(err).splitlines()[0][:160]}. " + TORCHCODEC_NEEDS
        )
    else:
        torchcodec_note = ""
    files = make_sources(work, args.heights, args.lengths)

    from tqdm import tqdm

    rows = []
    todo = [(h, s, m) for h in args.heights for s in args.lengths for m in methods]
    for height, seconds, method in tqdm(todo, desc="measuring"):
        if method == "before" and not _old_decoder_fits(height, seconds):
            rows.append({"height": height, "seconds": seconds, "method": method, "skipped": True})
            continue
        path = files[("transcoded" if method == "transcoded" else "source", height, seconds)]
        runs = [run_measure(method, path, seed, work) for seed in range(args.seeds)]
        errors = [r["error"] for r in runs if "error" in r]
        if errors:
            rows.append({"height": height, "seconds": seconds, "method": method, "error": errors[0]})
            continue
        rows.append(
            {
                "height": height,
                "seconds": seconds,
                "method": method,
                "core_s": statistics.mean(r["core_s"] for r in runs),
                "added_mb": max(r["added_mb"] for r in runs),
            }
        )
    flops = flops_per_sample()
    report(rows, methods, flops, args, torchcodec_note)


def report(rows: list[dict], methods: list[str], flops: float, args: argparse.Namespace, note: str) -> None:
    per_gpu = MFU * H100_BF16_TFLOPS * 1e12 / flops  # samples/s one GPU trains
    get = {(r["height"], r["seconds"], r["method"]): r for r in rows}

    def cell(height: int, seconds: int, method: str) -> str:
        r = get.get((height, seconds, method))
        if r is None or r.get("skipped"):
            return "not run (would hold the video)"
        if "error" in r:
            return f"error: {r['error'][:60]}"
        return f"{r['core_s']:.2f} s, +{r['added_mb']:.0f} MB"

    header = (
        "| source | " + " | ".join(methods) + " | pemt / floor | pemt / transcoded | cores per GPU (pemt, transcoded) |"
    )
    lines = [header, "|" + "---|" * (len(methods) + 4)]
    for height in args.heights:
        for seconds in args.lengths:
            values = [cell(height, seconds, m) for m in methods]
            ours, floor, small = (get.get((height, seconds, m), {}) for m in ("pemt", "floor", "transcoded"))
            ratio = f"{ours['core_s'] / floor['core_s']:.2f}x" if "core_s" in ours and "core_s" in floor else "-"
            speedup = f"{ours['core_s'] / small['core_s']:.1f}x" if "core_s" in ours and "core_s" in small else "-"
            cores = (
                f"{per_gpu * ours['core_s']:.0f}, {per_gpu * small['core_s']:.0f}"
                if "core_s" in ours and "core_s" in small
                else "-"
            )
            lines.append(
                f"| {height}p, {seconds // 60} min {seconds % 60} s | "
                + " | ".join(values)
                + f" | {ratio} | {speedup} | {cores} |"
            )
    setting = (
        f"{datetime.date.today()}, {os.cpu_count()} cores, one decode per process; window "
        f"{WINDOW['clips']} clips x {WINDOW['frames_per_clip']} frames at {WINDOW['fps']} fps, crop "
        f"{WINDOW['crop']}, {WINDOW['sample_rate']} Hz; mean of {args.seeds} window(s) per source"
    )
    model = (
        f"avbert_base at this window: {flops / 1e12:.2f} TFLOP per sample (forward + backward, the trainer's "
        f"counter); an H100 SXM at {MFU:.0%} of {H100_BF16_TFLOPS:g} TFLOP/s trains {per_gpu:.0f} samples/s, "
        "so cores per GPU = that rate x core-seconds per sample."
    )
    table = "\n".join(lines)
    text = f"# Video decode per sample\n\n{setting}\n\n{table}\n\n{model}\n" + (f"\n{note}\n" if note else "")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "video_decode.md").write_text(text)
    _plot(rows, methods, args, args.out / "video_decode.png")


def _plot(rows: list[dict], methods: list[str], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.heights), figsize=(4.5 * len(args.heights), 3.6), squeeze=False)
    for ax, height in zip(axes[0], args.heights):
        for method in methods:
            points = [
                (r["seconds"] / 60, r["core_s"])
                for r in rows
                if r["height"] == height and r["method"] == method and "core_s" in r
            ]
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set(
            title=f"{height}p source",
            xlabel="video length (min)",
            ylabel="core-seconds per sample",
            xscale="log",
            yscale="log",
        )
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
