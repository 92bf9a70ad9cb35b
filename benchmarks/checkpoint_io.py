"""Checkpoint cost: save and load speed against the disk, and preemption timings of a real job.

    python benchmarks/checkpoint_io.py [--model avbert_base] [--dd-mb 512]

1. The disk's sequential write speed with dd (conv=fdatasync), in the same run.
2. Save and load (with verification) of the DeepSpeed engine of `--model` (1 process, ZeRO-2,
   AdamW): seconds and MB/s, and the ratio against dd.
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from hydra import compose, initialize_config_dir

import pemt.config  # noqa: F401
from pemt.model.pretraining import build_pretraining_model
from pemt.train.checkpoint import Checkpointer

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def dd_write_mb_s(folder: Path, megabytes: int) -> float:
    target = folder / "dd.bin"
    out = subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={megabytes}", "conv=fdatasync"],
                         capture_output=True, text=True, check=True).stderr
    target.unlink()
    seconds = float(re.search(r"copied, ([\d.]+) s", out).group(1))
    return megabytes * 2**20 / seconds / 1e6


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


def engine_io(model_name: str, folder: Path) -> dict[str, float]:
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("pretrain", overrides=[f"model={model_name}", "data.clips=2", "data.frames_per_clip=2",
                                             "data.crop=32"])
    model = build_pretraining_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    config = {"train_batch_size": 2, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    d = cfg.data  # one small step, so the optimizer holds its full state
    loss = engine(torch.rand(2, d.clips, 3, d.frames_per_clip, d.crop, d.crop),
                  torch.randn(2, d.clips, 1, d.mel_bins, 1 + int(d.frames_per_clip / d.fps * 100)))["loss"]
    engine.backward(loss)
    engine.step()
    checkpointer = Checkpointer(folder / "ckpt")
    seconds_save = checkpointer.save(engine, 1, {"step": 1})
    written = sum(f["bytes"] for f in checkpointer.committed()[-1].manifest["files"].values())
    start = time.perf_counter()
    chosen = checkpointer.select()
    checkpointer.load(engine, chosen, universal=False)
    seconds_load = time.perf_counter() - start
    return {"bytes": written, "save_s": seconds_save, "load_s": seconds_load}


def _first_steps(db: Path) -> int:
    """Job segments that reached their first step, from the run's MLflow metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("pemt-pretrain").experiment_id])
    return len(client.get_metric_history(runs[0].info.run_id, "time_to_first_step_s")) if runs else 0


def preemption_timings(folder: Path) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    cmd = [sys.executable, str(REPO / "launch" / "pretrain.py"), f"paths.root={folder / 'job'}",
           "train.max_steps=400", "train.log_every=10", "train.checkpoint_every=1000"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
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
                if "submitit.core._submit" in " ".join(proc.info["cmdline"] or []) and str(folder) in " ".join(proc.info["cmdline"]):
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
    return {"signal_to_commit_s": run.data.metrics["signal_to_commit_s"],
            "fresh_start_to_first_step_s": first[0].value, "requeue_to_first_resumed_step_s": first[-1].value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="avbert_base")
    parser.add_argument("--dd-mb", type=int, default=512)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="pemt-ckpt-", dir=REPO / ".cache" if (REPO / ".cache").exists() else None))
    disk = dd_write_mb_s(folder, args.dd_mb)
    io = engine_io(args.model, folder)
    plain = torch_save_mb_s(folder, io["bytes"])
    timings = preemption_timings(folder)
    save_rate, load_rate = io["bytes"] / io["save_s"] / 1e6, io["bytes"] / io["load_s"] / 1e6
    lines = ["| measurement | value | vs dd write |", "|---|---|---|",
             f"| dd sequential write (fdatasync) | {disk:.0f} MB/s | 1.00x |",
             f"| plain torch.save + fsync of as many bytes | {plain:.0f} MB/s | {plain / disk:.2f}x |",
             f"| save {args.model} (ZeRO-2, {io['bytes'] / 1e6:.0f} MB, with sha256 manifest) | {io['save_s']:.2f} s, {save_rate:.0f} MB/s | {save_rate / disk:.2f}x |",
             f"| load {args.model} (verify + load) | {io['load_s']:.2f} s, {load_rate:.0f} MB/s | {load_rate / disk:.2f}x |",
             f"| SIGUSR2 -> committed checkpoint (tiny, 2 ranks) | {timings['signal_to_commit_s']:.2f} s | |",
             f"| fresh job start -> first step (tiny, 2 ranks) | {timings['fresh_start_to_first_step_s']:.1f} s | |",
             f"| requeued job start -> first resumed step | {timings['requeue_to_first_resumed_step_s']:.1f} s | |"]
    setting = f"{datetime.date.today()}, CPU, {os.cpu_count()} cores, checkpoints under {folder}"
    table = "\n".join(lines)
    print(f"{setting}\n\n{table}")
    (HERE / "results" / "checkpoint_io.md").write_text(f"# Checkpoint I/O\n\n{setting}\n\n{table}\n")
    subprocess.run(["rm", "-rf", str(folder)])


if __name__ == "__main__":
    main()
