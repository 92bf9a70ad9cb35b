"""Checkpoint cost: save and load speed against the disk, and preemption timings of a real job.

    python benchmarks/checkpoint_io.py [--model avbert_base] [--dd-mb 720]

1. The disk's sequential write speed with dd (conv=fdatasync), in the same run: to a file deleted
   after it, to new files kept (as checkpoints are), and with O_DIRECT. "x of dd" is against the
   fastest of the three.
2. The DeepSpeed engine of `--model` on 2 ranks (ZeRO-2, AdamW): a synchronous save (what the
   training loop waits), a background save (what the loop waits: the host copy; and the time from
   the copy to the committed checkpoint, as write bandwidth; medians of 3), a synchronous save
   through the page cache (as before O_DIRECT), the host memory of the copy, a load,
   and the steps/s of a run saving every `--every` steps against the same run without saves
   (alternating rounds).
3. A real 2-rank local job on the tiny model, sent SIGUSR2: time from the signal to the
   committed checkpoint, and from the requeued job's start to its first resumed step.
Writes a Markdown table to benchmarks/results/checkpoint_io.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from pemt.config import compose_config
from pemt.distributed import leave_distributed
from pemt.model.factory import build_pretraining_model
from pemt.train.checkpoint import Checkpointer

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def dd_write_mb_s(folder: Path, megabytes: int, kept: bool, direct: bool = False) -> float:
    """dd of `megabytes` with fdatasync: to a file deleted after it (its pages are free for the next
    write), or, with `kept`, the median of 3 new files kept as a checkpoint's are (fresh pages for
    every one), buffered or with `direct` (O_DIRECT, 4 MiB blocks, as pemt's writer)."""
    rates = []
    for i in range(3 if kept else 1):
        target = folder / f"dd{i}.bin"
        flags = ["bs=4M", f"count={megabytes // 4}", "oflag=direct"] if direct else ["bs=1M", f"count={megabytes}"]
        out = subprocess.run(
            ["dd", "if=/dev/zero", f"of={target}", *flags, "conv=fdatasync"], capture_output=True, text=True, check=True
        ).stderr
        if not kept:
            target.unlink()
        copied, seconds = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out).groups()
        rates.append(int(copied) / float(seconds) / 1e6)
    for leftover in folder.glob("dd*.bin"):
        leftover.unlink()
    return statistics.median(rates)


def torch_save_mb_s(folder: Path, nbytes: int) -> float:
    """torch.save of one tensor of `nbytes`, fsynced: what DeepSpeed's writer can reach at best."""
    tensor = torch.randn(nbytes // 4)
    start = time.perf_counter()
    with (folder / "plain.pt").open("wb") as handle:
        torch.save(tensor, handle)
        handle.flush()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    (folder / "plain.pt").unlink()
    return nbytes / seconds / 1e6


def file_writer_mb_s(folder: Path, nbytes: int) -> tuple[float, float]:
    """One rank's share written the way pemt's writer did (torch.save with its per-record CRC32,
    fsync, then sha256 read back) and the way it does (no CRC32, hashed while written, fsync)."""
    from pemt.integrity import sha256
    from pemt.train.snapshot import WriteJob, write_files

    state = {f"tensor{i}": torch.randn(nbytes // 4 // 16) for i in range(16)}
    path = folder / "share" / "states.pt"
    path.parent.mkdir(exist_ok=True)
    start = time.perf_counter()
    with path.open("wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    sha256(path)
    before = time.perf_counter() - start
    path.unlink()
    start = time.perf_counter()
    part = write_files(WriteJob(path.parent, rank=0, files=[(path, state)]))
    now = time.perf_counter() - start
    assert "error" not in part, part
    path.unlink()
    return nbytes / before / 1e6, nbytes / now / 1e6


def _rank_main(rank: int, model_name: str, folder: str, port: int, steps: int, every: int, rounds: int) -> None:
    """One of 2 ranks: avbert_base under ZeRO-2, checkpointed synchronously and in the background."""
    import json

    import deepspeed

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = compose_config(
        "pretrain",
        overrides=[
            f"model={model_name}",
            "data.clips=2",
            "data.frames_per_clip=2",
            "data.crop=32",
            "gpus_per_node=2",
            "train.global_batch_size=2",
            "data.streams=2",
        ],
    )
    torch.manual_seed(0)
    model = build_pretraining_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    config = {"train_batch_size": 2, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    d = cfg.data
    video = torch.rand(1, d.clips, 3, d.frames_per_clip, d.crop, d.crop)
    audio = torch.randn(1, d.clips, 1, d.mel_bins, 1 + int(d.frames_per_clip / d.fps * 100))

    def step() -> None:
        engine.backward(engine(video, audio, step_seed=0)["loss"])
        engine.step()

    step()  # the optimizer holds its full state from here on
    results: dict = {}
    for name, direct_io in (("sync", True), ("buffered_sync", False)):
        sync = Checkpointer(Path(folder) / name, keep_last=2, direct_io=direct_io)
        stalls = [sync.save(engine, i, {"step": i}).stall_s for i in range(1, 4)]
        results[f"{name}_stall_s"] = statistics.median(stalls)
    results["bytes"] = sum(f["bytes"] for f in sync.committed()[-1].manifest["files"].values()) if rank == 0 else 0
    background = Checkpointer(Path(folder) / "async", keep_last=2, asynchronous=True)
    background.save(engine, 1, {"step": 1})  # the first save is synchronous: it measures the copy
    background.save(engine, 2, {"step": 2})  # the first background one makes the host buffers
    background.settle()
    stalls, writes, copies = [], [], []
    for i in range(3, 6):
        torch.distributed.barrier()  # no rank's timer runs while another still writes the last save
        report = background.save(engine, i, {"step": i})
        began = time.perf_counter()
        background.settle()  # the background write (and rank 0's commit), nothing else running
        stalls.append(report.stall_s)
        writes.append(report.stall_s + time.perf_counter() - began)
        copies.append(report.host_copy_bytes)
    results.update(
        async_stall_s=statistics.median(stalls), async_total_s=statistics.median(writes), host_copy_bytes=max(copies)
    )
    began = time.perf_counter()
    chosen = background.select()
    background.load(engine, chosen, universal=False)
    results["load_s"] = time.perf_counter() - began
    # Steps/s with and without background saves as in a long run: the checkpointer has made its
    # first (synchronous) save and its host buffers beforehand, and each save's write overlaps the
    # `every` - 1 steps that follow it. Alternating rounds, since the machine's speed drifts.
    run = Checkpointer(Path(folder) / "checkpointed", keep_last=2, asynchronous=True)
    for warm in (1, 2):
        run.save(engine, warm, {"step": warm})
        run.settle()
    seconds = {"plain": [], "checkpointed": []}
    for round_ in range(rounds):
        for name in seconds:
            began = time.perf_counter()
            for i in range(steps):
                step()
                if name == "checkpointed" and i % every == 0:
                    tag = 10 + round_ * steps + i
                    run.save(engine, tag, {"step": tag})
            run.settle()
            seconds[name].append(time.perf_counter() - began)
    results.update({f"{name}_steps_per_s": [steps / s for s in times] for name, times in seconds.items()})
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, results)
    if rank == 0:
        merged = {
            **gathered[0],
            "host_copy_bytes": sum(g["host_copy_bytes"] for g in gathered),
            "async_total_s": gathered[0]["async_total_s"],  # rank 0 commits once every rank's part is in
        }
        (Path(folder) / "results.json").write_text(json.dumps(merged))
    leave_distributed()


def engine_io(model_name: str, folder: Path, steps: int, every: int, rounds: int) -> dict[str, Any]:
    import json

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rank_args = (model_name, str(folder), port, steps, every, rounds)
    mp.start_processes(_rank_main, args=rank_args, nprocs=2, start_method="spawn")
    return json.loads((folder / "results.json").read_text())


def _first_steps(db: Path) -> int:
    """Job segments that reached their first step, from the run's MLflow metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("pemt-pretrain").experiment_id])
    return len(client.get_metric_history(runs[0].info.run_id, "time_to_first_step_s")) if runs else 0


def preemption_timings(folder: Path) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    cmd = [
        sys.executable,
        str(REPO / "launch" / "pretrain.py"),
        f"paths.root={folder / 'job'}",
        "train.max_steps=400",
        "train.log_every=10",
        "train.checkpoint_every=1000",
    ]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    output = (folder / "job.log").open("w")
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
    db = folder / "job" / "mlflow.db"
    deadline = time.time() + 300
    signalled = False
    while job.poll() is None and time.time() < deadline:
        logs = list((folder / "job").rglob("pretrain.log"))
        if not signalled and logs and "first step" in logs[0].read_text():
            time.sleep(2)
            for proc in psutil.process_iter(["cmdline"]):
                if "submitit.core._submit" in " ".join(proc.info["cmdline"] or []) and str(folder) in " ".join(
                    proc.info["cmdline"]
                ):
                    proc.send_signal(signal.SIGUSR2)
            signalled = True
        if signalled and logs and "resumed from" in logs[0].read_text() and _first_steps(db) >= 2:
            break
        time.sleep(0.2)
    for proc in psutil.process_iter(["cmdline"]):
        if str(folder) in " ".join(proc.info["cmdline"] or []):
            for child in proc.children(recursive=True) + [proc]:  # data workers too
                child.kill()
    job.kill()
    client = MlflowClient(f"sqlite:///{db}")
    if not db.exists():
        raise RuntimeError(f"the job did not start:\n{(folder / 'job.log').read_text()[-3000:]}")
    [run] = client.search_runs([client.get_experiment_by_name("pemt-pretrain").experiment_id])
    first = client.get_metric_history(run.info.run_id, "time_to_first_step_s")
    return {
        "signal_to_commit_s": run.data.metrics["signal_to_commit_s"],
        "fresh_start_to_first_step_s": first[0].value,
        "requeue_to_first_resumed_step_s": first[-1].value,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="avbert_base")
    parser.add_argument("--dd-mb", type=int, default=720)
    parser.add_argument("--steps", type=int, default=40, help="steps of each timed round, with and without checkpoints")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds with and without checkpoints")
    parser.add_argument("--every", type=int, default=20, help="checkpoint interval of that run")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="pemt-ckpt-", dir=REPO / ".cache" if (REPO / ".cache").exists() else None))
    dd_rates = {
        "buffered, to a file deleted after it": dd_write_mb_s(folder, args.dd_mb, kept=False),
        "buffered, to 3 new files kept as checkpoints are (median)": dd_write_mb_s(folder, args.dd_mb, kept=True),
        "O_DIRECT 4 MiB blocks, to 3 new files kept (median)": dd_write_mb_s(
            folder, args.dd_mb, kept=True, direct=True
        ),
    }
    disk = max(dd_rates.values())  # the ratios are taken against the fastest way dd wrote
    plain_dd = dd_rates["buffered, to a file deleted after it"]
    io = engine_io(args.model, folder, args.steps, args.every, args.rounds)
    plain = torch_save_mb_s(folder, io["bytes"])
    crc_then_hash, hashed_on_write = file_writer_mb_s(folder, io["bytes"] // 2)
    timings = preemption_timings(folder)
    mb = io["bytes"] / 1e6
    sync_rate, async_rate = mb / io["sync_stall_s"], mb / io["async_total_s"]
    buffered_rate = mb / io["buffered_sync_stall_s"]
    with_saves, without = io["checkpointed_steps_per_s"], io["plain_steps_per_s"]
    # over rounds of equal steps the harmonic mean of steps/s is total steps over total time
    rate_with, rate_without = statistics.harmonic_mean(with_saves), statistics.harmonic_mean(without)
    per_round = ", ".join(f"{a / b:.3f}x" for a, b in zip(with_saves, without))
    lines = [
        "| measurement | value | ratio | target |",
        "|---|---|---|---|",
        *(
            f"| dd sequential write (fdatasync), {how} | {rate:.0f} MB/s | {rate / disk:.2f}x of dd | |"
            for how, rate in dd_rates.items()
        ),
        f"| plain torch.save + fsync of as many bytes | {plain:.0f} MB/s | {plain / disk:.2f}x of dd | |",
        f"| one rank's share, torch.save with CRC32 + fsync + sha256 read back (the writer before) | "
        f"{crc_then_hash:.0f} MB/s | {crc_then_hash / disk:.2f}x of dd | |",
        "| one rank's share, pemt's writer (O_DIRECT 4 MiB blocks, sha256 on a second thread while written, "
        f"no CRC32, fsync) | "
        f"{hashed_on_write:.0f} MB/s | {hashed_on_write / disk:.2f}x of dd | |",
        f"| synchronous save through the page cache (`train.checkpoint_direct_io=false`), {args.model} ZeRO-2 "
        f"on 2 ranks ({mb:.0f} MB): training waits | {io['buffered_sync_stall_s']:.2f} s, {buffered_rate:.0f} MB/s "
        f"| {buffered_rate / disk:.2f}x of dd | |",
        f"| synchronous save: training waits | {io['sync_stall_s']:.2f} s, {sync_rate:.0f} MB/s | "
        f"{sync_rate / disk:.2f}x of dd | |",
        f"| background save: training waits (host copy) | {io['async_stall_s']:.3f} s | "
        f"{io['async_stall_s'] / io['buffered_sync_stall_s']:.2f}x of synchronous through the page cache, "
        f"{io['async_stall_s'] / io['sync_stall_s']:.2f}x of synchronous | <= 0.10x |",
        f"| background save: copy to committed (write, fsync, sha256, manifest) | {io['async_total_s']:.2f} s, "
        f"{async_rate:.0f} MB/s | {async_rate / disk:.2f}x of dd, {async_rate / plain_dd:.2f}x of plain dd "
        "(buffered, the first row) | >= 0.80x |",
        f"| host memory of the copy (both ranks) | {io['host_copy_bytes'] / 2**30:.2f} GiB | | |",
        "| load (verify + load; the files are read from the disk: O_DIRECT left them out of the page cache) | "
        f"{io['load_s']:.2f} s, {mb / io['load_s']:.0f} MB/s | "
        f"{mb / io['load_s'] / disk:.2f}x of dd | |",
        f"| steps/s, checkpoint every {args.every} steps vs none ({args.rounds} alternating rounds of "
        f"{args.steps} steps; per round {per_round}) | {rate_with:.3f} vs {rate_without:.3f} | "
        f"{rate_with / rate_without:.3f}x | >= 0.97x |",
        f"| SIGUSR2 -> committed checkpoint (tiny, 2 ranks) | {timings['signal_to_commit_s']:.2f} s | | |",
        f"| fresh job start -> first step (tiny, 2 ranks) | {timings['fresh_start_to_first_step_s']:.1f} s | | |",
        f"| requeued job start -> first resumed step | {timings['requeue_to_first_resumed_step_s']:.1f} s | | |",
    ]
    setting = f"{datetime.date.today()}, CPU, {os.cpu_count()} cores, checkpoints under {folder}"
    table = "\n".join(lines)
    print(f"{setting}\n\n{table}")
    (HERE / "results" / "checkpoint_io.md").write_text(f"# Checkpoint I/O\n\n{setting}\n\n{table}\n")
    subprocess.run(["rm", "-rf", str(folder)])


if __name__ == "__main__":
    main()
