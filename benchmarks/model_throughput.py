"""Samples/s, MFU and peak memory of the training step, per ZeRO stage, sharing mode and
activation checkpointing, on one device.

    python benchmarks/model_throughput.py [--device cuda|cpu] [--batch 8] [--steps 8]

On CUDA: avbert_base in bf16 at the paper's window (30 clips x 16 frames at 16 fps, crop 112,
16 kHz audio). On CPU (`--device cpu`, a smoke run of the same code): the tiny model in fp32 at
4 clips x 4 frames, crop 32. Inputs are random tensors of the loader's shapes (decoding is
measured by benchmarks/video_decode.py). Each ZeRO stage runs in its own process; FLOPs per
sample are counted by torch's counter on the first step, the peak is the device's data-sheet
bf16 peak (else measured, and the table says so). Writes benchmarks/results/<device>_throughput.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SHARING = {
    "none": "[]",
    "layer": "[layer]",
    "layer+cross": "[layer,cross]",
    "layer+cross+factorized": "[layer,cross,factorized]",
}
PAPER_WINDOW = ["model=avbert_base", "data.clips=30", "data.frames_per_clip=16", "data.fps=16", "data.crop=112"]
SMOKE_WINDOW = ["model=tiny", "data.clips=4", "data.frames_per_clip=4", "data.crop=32"]


def _config(device: str, stage: int, sharing: str, checkpointing: bool, batch: int) -> Any:
    from pemt.config import compose_config

    return compose_config(
        "pretrain",
        overrides=[
            *(PAPER_WINDOW if device == "cuda" else SMOKE_WINDOW),
            f"precision={'bf16' if device == 'cuda' else 'fp32'}",
            f"deepspeed=zero{stage}",
            f"model.sharing={SHARING[sharing]}",
            f"model.activation_checkpointing.cnns={checkpointing}",
            f"model.activation_checkpointing.transformers={checkpointing}",
            "gpus_per_node=1",
            f"train.global_batch_size={batch}",
            f"data.streams={batch}",
            "run_dir=unused",
        ],
    )


def _train_step(engine: Any, video: Any, audio: Any, seed: int) -> None:
    engine.backward(engine(video, audio, step_seed=seed)["loss"])
    engine.step()


def _measure_stage(device_name: str, stage: int, batch: int, steps: int, points: list[tuple[str, bool]]) -> list[dict]:
    """In this process: every (sharing, checkpointing) point under ZeRO `stage`."""
    import deepspeed
    import torch

    from pemt.model.factory import build_pretraining_model, describe_counts
    from pemt.track.metrics import counting_flops, peak_tflops
    from pemt.train.engine_config import deepspeed_config
    from pemt.train.optimizer import build_optimizer

    device = torch.device(device_name)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29611")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)
    rows = []
    for sharing, checkpointing in points:
        cfg = _config(device.type, stage, sharing, checkpointing, batch)
        dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        peak, source = peak_tflops(None, device, torch.bfloat16 if device.type == "cuda" else dtype)
        torch.manual_seed(0)
        model = build_pretraining_model(cfg)
        transformer_params = describe_counts(cfg)["transformers"]
        optimizer, scheduler = build_optimizer(model, cfg.train)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg)
        )
        d = cfg.data
        frames = 1 + int(d.frames_per_clip / d.fps * 1000 / d.mel_hop_ms)
        video = torch.rand(batch, d.clips, 3, d.frames_per_clip, d.crop, d.crop, device=device, dtype=dtype)
        audio = torch.randn(batch, d.clips, 1, d.mel_bins, frames, device=device, dtype=dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

        with counting_flops() as counted:
            _train_step(engine, video, audio, 0)
        times = []
        for i in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            _train_step(engine, video, audio, i + 1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        seconds = sorted(times)[len(times) // 2]
        samples_per_s = batch / seconds
        flops = counted["flops"] / batch
        if device.type == "cuda":
            memory = torch.cuda.max_memory_allocated() / 2**30
        else:
            memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process's, so far
        rows.append(
            {
                "stage": stage,
                "sharing": sharing,
                "checkpointing": checkpointing,
                "transformer_params_m": transformer_params / 1e6,
                "step_s": seconds,
                "samples_per_s": samples_per_s,
                "tflop_per_sample": flops / 1e12,
                "mfu_pct": 100 * flops * samples_per_s / 1e12 / peak,
                "peak_tflops": peak,
                "peak_source": source,
                "memory_gib": memory,
            }
        )
        del engine, model, optimizer, scheduler
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, default=8, help="samples per step")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per point (after one warm-up)")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)  # one stage, in its own process
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    # Every sharing mode without checkpointing; the default mode also with it (memory it saves).
    points = [(s, False) for s in SHARING] + [("layer+cross+factorized", True)]
    if args.stage is not None:
        print(json.dumps(_measure_stage(args.device, args.stage, args.batch, args.steps, points)))
        return 0
    from tqdm import tqdm

    rows: list[dict] = []
    for stage in tqdm(args.stages, desc="ZeRO stages"):
        command = [sys.executable, __file__, "--device", args.device, "--batch", str(args.batch)]
        command += ["--steps", str(args.steps), "--stage", str(stage)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr[-4000:])
            raise SystemExit(f"ZeRO-{stage} failed (above)")
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    report = render(rows, args)
    print(report)
    out = args.out or HERE / "results" / f"{args.device}_throughput.md"
    out.write_text(report)
    print(f"wrote {out}")
    return 0


def render(rows: list[dict], args: argparse.Namespace) -> str:
    window = PAPER_WINDOW if args.device == "cuda" else SMOKE_WINDOW
    lines = [
        f"# Training-step throughput ({args.device}, batch {args.batch})",
        "",
        f"{datetime.date.today()}; `python benchmarks/model_throughput.py --device {args.device} "
        f"--batch {args.batch}` ({' '.join(window)}). MFU against {rows[0]['peak_tflops']:.3g} TFLOP/s "
        f"({rows[0]['peak_source']}). Step time: the median of {args.steps}.",
        "",
        "| ZeRO | sharing | activation ckpt | transformer params (M) | samples/s | GFLOP/sample | MFU % "
        "| peak memory GiB |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['sharing']} | {'on' if r['checkpointing'] else 'off'} "
            f"| {r['transformer_params_m']:.3g} | {r['samples_per_s']:.3g} | {1000 * r['tflop_per_sample']:.4g} "
            f"| {r['mfu_pct']:.1f} | {r['memory_gib']:.2f} |"
        )
    if args.device == "cpu":
        lines += ["", "CPU memory is the process's peak RSS so far (it only grows from row to row)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
