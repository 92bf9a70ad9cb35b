"""Does packing a corpus as a Slurm job array cost what the one-machine pool costs? Videos per second
of `tools/make_shards.py` both ways, on the same inputs and the same cores.

    python benchmarks/pack_throughput.py                  # ~3 min of 2 cores, the local Slurm cluster
    python benchmarks/pack_throughput.py --videos 6       # a smoke run

Generated videos (`--seconds` long, `--size` px square, 16 fps, with sound) are transcoded to 128 px
at 16 fps and packed (a) by the process pool on this machine (`--processes` = the cores) and (b) as a
job array of `--tasks` tasks on the one-machine Slurm cluster (`slurm/cluster.sh start --nodes
--tasks`, started if it is not running), one CPU each. Here the nodes share the same cores, so the
array can at best match the pool: the row says what Slurm's scheduling and each task's start cost.
On a real cluster each node brings its own cores, so the array's rate grows with the nodes and the
core-seconds per video measured here set the bill. Writes benchmarks/results/pack_throughput.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, machine_line

HERE = Path(__file__).resolve().parent
CLUSTER = REPO / "slurm" / "cluster.sh"
TRANSCODE = ["--short-side", "128", "--fps", "16"]


def make_videos(folder: Path, count: int, seconds: float, size: int) -> None:
    from tqdm import tqdm

    from pemt.data.synthetic import SyntheticSpec, encode_mp4, render

    folder.mkdir(parents=True, exist_ok=True)
    spec = SyntheticSpec(videos=count, seconds=seconds, size=size)
    for index in tqdm(range(count), desc="source videos"):
        path = folder / f"v{index:03d}.mp4"
        if not path.exists():
            frames, audio, _ = render(spec, index)
            path.write_bytes(encode_mp4(frames, audio, spec.source_fps, spec.sample_rate))


def slurm_env(nodes: int) -> dict[str, str]:
    """The local cluster's environment (SLURM_CONF ...), the cluster started with `nodes` nodes if needed."""
    started = subprocess.run([str(CLUSTER), "start", "--nodes", str(nodes)], capture_output=True, text=True)
    if started.returncode:
        raise SystemExit(f"{CLUSTER} start --nodes {nodes} failed:\n{started.stderr[-2000:]}")
    exports = subprocess.run([str(CLUSTER), "env"], capture_output=True, text=True, check=True).stdout
    env = dict(os.environ)
    for line in exports.splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, value = line[len("export ") :].partition("=")
            env[key] = value.strip("'\"")
    return env


def timed_pack(command: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO / "outputs" / "pack_throughput")
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each source video")
    parser.add_argument("--size", type=int, default=360, help="side of the source frames in pixels")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="the pool's processes")
    parser.add_argument("--tasks", type=int, default=3, help="array tasks (and local Slurm nodes), one CPU each")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    source = root / f"videos-{args.videos}-{args.seconds:g}s-{args.size}px"
    make_videos(source, args.videos, args.seconds, args.size)
    samples = ["--samples", str(max(1, args.videos // (2 * args.tasks)))]  # 2 shards per task
    base = [sys.executable, "tools/make_shards.py", str(source)]
    for name in ("pool", "array"):
        shutil.rmtree(root / name, ignore_errors=True)
    print("packing with the pool ...", flush=True)
    pool_s = timed_pack([*base, str(root / "pool"), *samples, *TRANSCODE, "--processes", str(args.processes)])
    env = slurm_env(args.tasks)
    print(f"packing as a job array of {args.tasks} tasks ...", flush=True)
    array = ["--slurm", str(args.tasks), "--cpus-per-task", "1", "--time-min", "60"]
    array_s = timed_pack([*base, str(root / "array"), *samples, *TRANSCODE, *array], env)
    cores = args.processes
    command = " ".join(["python benchmarks/pack_throughput.py", *(sys.argv[1:] if argv is None else argv)])
    rows = [
        (f"process pool, {args.processes} processes", pool_s),
        (f"Slurm job array, {args.tasks} tasks x 1 CPU on {args.tasks} local nodes", array_s),
    ]
    lines = [
        "# Packing a corpus: the one-machine pool against a Slurm job array",
        "",
        f"{datetime.date.today()}, {machine_line()}. {args.videos} generated videos of {args.seconds:g} s at "
        f"{args.size} x {args.size} px, 16 fps, with sound, transcoded to 128 px at 16 fps (libx264 veryfast, "
        f"AAC). The local Slurm nodes share this machine's {os.cpu_count()} cores. "
        f"Generated by `{command}`.",
        "",
        "| how | wall s | videos/s | machine core-s per video | vs pool |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, seconds in rows:
        lines.append(
            f"| {label} | {seconds:.1f} | {args.videos / seconds:.2f} | {seconds * cores / args.videos:.2f} | "
            f"{pool_s / seconds:.2f}x |"
        )
    per_video = pool_s * cores / args.videos
    lines += [
        "",
        f"At the pool's {per_video:.2f} core-seconds per video (process start-up included), 650k videos "
        f"of these are {650_000 * per_video / 3600:,.0f} core-hours: {650_000 * per_video / 3600 / 32:,.1f} h "
        f"of one 32-core node, {650_000 * per_video / 3600 / 32 / 32 * 60:,.0f} min of 32 such nodes as a job array.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pack_throughput.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
