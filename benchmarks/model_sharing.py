"""Cost of each sharing mode at paper size (model=avbert_base), on this machine.

    python benchmarks/model_sharing.py [--clips 4 --frames 8 --crop 64 --batch 2 --repeats 3]
    python benchmarks/model_sharing.py --device cuda --precision bf16 --clips 30 --frames 16 --crop 112

For each mode: parameters (all, transformers), AdamW optimizer-state bytes, forward+backward
time (median) and peak memory (CPU: the process's peak RSS; CUDA: max allocated). Each mode
runs in its own process so peaks do not mix. Ratios are against `none` measured in the same run.
Writes a Markdown table to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = {
    "none": "[]",
    "layer": "[layer]",
    "layer+cross": "[layer,cross]",
    "layer+cross+factorized": "[layer,cross,factorized]",
}
HERE = Path(__file__).resolve().parent


def measure(args: argparse.Namespace) -> dict:
    import torch

    from pemt.config import compose_config
    from pemt.model.factory import build_pretraining_model
    from pemt.model.params import count_parameters

    overrides = [
        "model=avbert_base",
        f"model.sharing={args.sharing}",
        f"data.clips={args.clips}",
        f"data.frames_per_clip={args.frames}",
        f"data.fps={args.frames}",
        f"data.crop={args.crop}",
    ]
    cfg = compose_config("pretrain", overrides=overrides)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    model = build_pretraining_model(cfg).to(device)
    counts = count_parameters(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    d = cfg.data
    mel_frames = 1 + int(d.frames_per_clip / d.fps * 1000 / d.mel_hop_ms)
    video = torch.rand(args.batch, d.clips, 3, d.frames_per_clip, d.crop, d.crop, device=device)
    audio = torch.randn(args.batch, d.clips, 1, d.mel_bins, mel_frames, device=device)
    times = []
    for i in range(args.repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(video, audio)["loss"]
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first pass warms up allocators and kernels
            times.append(time.perf_counter() - start)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state_bytes = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "params": counts["total"],
        "transformer_params": counts["transformers"],
        "optimizer_state_bytes": state_bytes,
        "fwd_bwd_s": statistics.median(times),
        "peak_bytes": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--sharing", help=argparse.SUPPRESS)  # set in the per-mode worker
    args = parser.parse_args()
    if args.sharing is not None:
        print(json.dumps(measure(args)))
        return

    from tqdm import tqdm

    passthrough = [a for a in sys.argv[1:]]
    results = {}
    for name, sharing in tqdm(MODES.items(), desc="sharing modes"):
        out = subprocess.run(
            [sys.executable, __file__, *passthrough, "--sharing", sharing], capture_output=True, text=True, check=True
        )
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["none"]
    header = (
        "| mode | params (M) | transformer params (M) | optimizer state (MiB) | fwd+bwd (s) "
        "| peak memory (MiB) | fwd+bwd vs none | peak vs none |"
    )
    lines = [header, "|" + "---|" * 8]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['params'] / 1e6:.2f} | {r['transformer_params'] / 1e6:.2f} "
            f"| {r['optimizer_state_bytes'] / 2**20:.1f} | {r['fwd_bwd_s']:.3f} | {r['peak_bytes'] / 2**20:.0f} "
            f"| {r['fwd_bwd_s'] / base['fwd_bwd_s']:.2f}x | {r['peak_bytes'] / base['peak_bytes']:.2f}x |"
        )
    setting = (
        f"{datetime.date.today()}, {args.device} ({platform.processor() or platform.machine()}), "
        f"{args.precision}, batch {args.batch}, {args.clips} clips x {args.frames} frames at "
        f"{args.crop}px, median of {args.repeats}"
    )
    table = "\n".join(lines)
    print(f"{setting}\n\n{table}")
    out = HERE / "results" / f"model_sharing_{args.device}_{args.precision}.md"
    out.write_text(f"# Sharing modes at avbert_base\n\n{setting}\n\n{table}\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
