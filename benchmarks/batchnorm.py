"""The CNNs' global-batch BatchNorm: the explicit ops against torch's fused kernels, on this machine.

    python benchmarks/batchnorm.py [--device cuda|cpu] [--precision bf16|fp32] [--clips 120] [--crop 112]

`model.batchnorm=fused` runs torch's kernels on CUDA (native batch norm on one GPU, SyncBatchNorm's
across GPUs); `explicit` runs pemt's own ops (an fp32 copy of the activation, sums over ranks,
E[x^2] - E[x]^2). This times one training forward + backward of each at the activation shapes of
avbert_base's visual CNN at the paper's window (`--clips` clips of 16 frames at `--crop`: the
stem, the first stage's output and the last stage's), on one process (world size 1; the kernels
for several ranks add one all-gather of 2C + 1 numbers, the explicit ops one all-reduce of
2C + 1), and reports the largest difference between the two (output and input gradient, relative
to the output's RMS) and the peak memory (CUDA). On CPU the fused column is torch's native CPU
batch norm, which pemt uses on CUDA only. Writes a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def shapes(clips: int, crop: int) -> dict[str, tuple[int, ...]]:
    """avbert_base's visual CNN at 16 frames: the stem halves time and space, the max-pool space,
    each later stage space."""
    stem, res2, res5 = crop // 2, crop // 4, -(-crop // 32)  # strided convolutions round up
    return {
        "visual stem": (clips, 64, 8, stem, stem),
        "visual res2 output": (clips, 256, 8, res2, res2),
        "visual res5 output": (clips, 2048, 8, res5, res5),
    }


def measure(shape: tuple[int, ...], args: argparse.Namespace) -> dict[str, float]:
    import torch

    from pemt.model.cnn import BatchNorm

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    norm = BatchNorm(shape[1]).to(device)
    x = (torch.randn(shape, device=device) * 2.0 + 1.0).to(dtype).requires_grad_()
    grad = torch.randn(shape, device=device).to(dtype)
    paths = {"explicit": norm.forward, "fused": norm.fused_forward}
    norm.fused = False  # forward(): the explicit ops on every device
    result: dict[str, float] = {}
    outputs = {}
    for name, run in paths.items():
        times = []
        for _ in range(args.repeats + 1):  # the first is a warm-up
            x.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            out = run(x)
            out.backward(grad)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        assert x.grad is not None
        outputs[name] = (out.detach().float(), x.grad.float())
        result[f"{name}_ms"] = statistics.median(times[1:]) * 1000
        if device.type == "cuda":
            result[f"{name}_mib"] = torch.cuda.max_memory_allocated() / 2**20
    scale = outputs["explicit"][0].square().mean().sqrt()
    result["out_diff"] = float((outputs["fused"][0] - outputs["explicit"][0]).abs().max() / scale)
    grad_scale = outputs["explicit"][1].square().mean().sqrt()
    result["grad_diff"] = float((outputs["fused"][1] - outputs["explicit"][1]).abs().max() / grad_scale)
    return result


def render(rows: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    memory = args.device.startswith("cuda")
    lines = [
        f"# Global-batch BatchNorm: explicit ops vs torch's fused kernels ({args.device}, {args.precision})",
        "",
        f"{datetime.date.today()}; `python benchmarks/batchnorm.py --device {args.device} --precision {args.precision} "
        f"--clips {args.clips} --crop {args.crop}`. One process; forward + backward in training mode, "
        f"median of {args.repeats}. Differences: the largest, relative to the RMS of the explicit output "
        "(or of its input gradient).",
        "",
        "| activation | shape | explicit ms | fused ms | fused / explicit | output diff | grad diff "
        + ("| explicit peak MiB | fused peak MiB |" if memory else "|"),
        "|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if memory else ""),
    ]
    for name, r in rows.items():
        line = (
            f"| {name} | {'x'.join(map(str, shapes(args.clips, args.crop)[name]))} | {r['explicit_ms']:.2f} "
            f"| {r['fused_ms']:.2f} | {r['fused_ms'] / r['explicit_ms']:.2f} | {r['out_diff']:.1e} "
            f"| {r['grad_diff']:.1e} |"
        )
        if memory:
            line += f" {r['explicit_mib']:.0f} | {r['fused_mib']:.0f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--clips", type=int, default=120, help="clips per GPU: 4 videos x 30 clips")
    parser.add_argument("--crop", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "batchnorm.md")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    rows = {name: measure(shape, args) for name, shape in tqdm(shapes(args.clips, args.crop).items(), desc="shapes")}
    table = render(rows, args)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
