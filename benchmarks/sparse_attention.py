"""Cost of dense vs block-sparse attention as the token sequence grows, on this machine.

    python benchmarks/sparse_attention.py [--device cpu|cuda] [--precision fp32|bf16] [--batch 2]

One multimodal transformer layer at paper size (hidden 768, 12 heads, FFN 3072) over
[v_BOS, 30 s x k visual tokens, a_BOS, 30 s x k audio tokens] for k = 1, 2, 4, 8, 16 tokens per
clip (62 ... 962 tokens). For each length and kind: attention FLOPs (torch's counter over the
attention alone, forward), forward + backward time of the layer (median of --repeats) and peak
memory (CUDA: max allocated; CPU: the process's peak RSS, each point in its own process).
Sparse: blocks of 16, one local block each side, one random block. Ratios are sparse / dense
at the same length. Writes a Markdown table and a plot to benchmarks/results/.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLIPS = 30
TOKENS_PER_CLIP = (1, 2, 4, 8, 16)


def measure(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from pemt.model.sparse_attention import BlockSparsity, block_sparse_attention
    from pemt.model.transformer import TransformerLayer
    from pemt.track.metrics import counting_flops

    spec = None if args.kind == "dense" else BlockSparsity(16, 1, 1)
    if args.kind == "flex":  # the attention alone: the layer runs the gathered kernel
        return measure_flex(args, spec)
    device, dtype, n, bos = _setting(args)
    torch.manual_seed(0)
    layer = TransformerLayer(768, 12, 3072, 0.0, 1, None, spec).to(device, dtype)
    x = torch.randn(args.batch, n, 768, device=device, dtype=dtype, requires_grad=True)
    q = torch.randn(args.batch, 12, n, 64, device=device, dtype=dtype)
    with counting_flops() as counted:
        if spec is None:
            F.scaled_dot_product_attention(q, q, q)
        else:
            block_sparse_attention(q, q, q, list(bos), spec)
    qkv = [torch.randn(args.batch, 12, n, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]

    def attention() -> None:
        if spec is None:
            out = F.scaled_dot_product_attention(*qkv)
        else:
            out = block_sparse_attention(*qkv, list(bos), spec)
        out.float().square().mean().backward()

    # Attention alone first: on CPU its memory is the rise of the process's peak RSS.
    before = _peak_mib(device)
    attention_ms = _median_ms(attention, args.repeats, device)
    attention_peak = _peak_mib(device) - before
    step_ms = _median_ms(lambda: layer(x, 0, bos)[0].float().square().mean().backward(), args.repeats, device)
    peak = _peak_mib(device)
    return {
        "kind": args.kind,
        "tokens_per_clip": args.tokens_per_clip,
        "tokens": n,
        "attention_gflop": counted["flops"] / 1e9,
        "step_ms": step_ms,
        "peak_mib": peak,
        "attention_ms": attention_ms,
        "attention_peak_mib": attention_peak,
    }


def measure_flex(args: argparse.Namespace, spec: Any) -> dict:
    """FlexAttention with the same pattern: forward + backward time and memory of the attention."""
    import torch

    from pemt.model.sparse_attention import flex_block_sparse_attention

    device, dtype, n, bos = _setting(args)
    torch.manual_seed(0)
    qkv = [torch.randn(args.batch, 12, n, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]

    def attention() -> None:
        flex_block_sparse_attention(*qkv, list(bos), spec).float().square().mean().backward()

    attention()  # compiles: the first call's time is not the kernel's
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**20
    attention_ms = _median_ms(attention, args.repeats, device)
    return {
        "kind": "flex",
        "tokens_per_clip": args.tokens_per_clip,
        "tokens": n,
        "attention_ms": attention_ms,
        "attention_peak_mib": _peak_mib(device) - before,
    }


def _setting(args: argparse.Namespace) -> tuple[Any, Any, int, tuple[int, int]]:
    """Device, dtype, sequence length and BOS positions of one point:
    [v_BOS, 30 clips x k visual tokens, a_BOS, 30 clips x k audio tokens]."""
    import torch

    length = CLIPS * args.tokens_per_clip
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    return torch.device(args.device), dtype, 2 * length + 2, (0, length + 1)


def _peak_mib(device: Any) -> float:
    """CUDA: the most allocated so far; CPU: the process's peak RSS so far."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median_ms(run: Callable[[], Any], repeats: int, device: Any) -> float:
    """Median wall time of `run` over `repeats`, after one warm-up."""
    import torch

    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(TOKENS_PER_CLIP), help="tokens per clip")
    parser.add_argument("--out", type=Path, default=None, help="table file (default benchmarks/results/...)")
    parser.add_argument(
        "--flex",
        action="store_true",
        help="also FlexAttention with the same pattern (CUDA: torch has no FlexAttention backward on CPU)",
    )
    parser.add_argument("--kind", choices=["dense", "sparse", "flex"], help=argparse.SUPPRESS)
    parser.add_argument("--tokens-per-clip", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.kind:  # one point, in its own process
        print(json.dumps(measure(args)))
        return 0
    from tqdm import tqdm

    if args.flex and args.device != "cuda":
        parser.error("--flex needs --device cuda: torch has no FlexAttention backward on CPU")
    rows = []
    kinds = ("dense", "sparse", "flex") if args.flex else ("dense", "sparse")
    points = [(k, kind) for k in args.lengths for kind in kinds]
    for k, kind in tqdm(points, desc="lengths"):
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--device",
                args.device,
                "--precision",
                args.precision,
                "--batch",
                str(args.batch),
                "--repeats",
                str(args.repeats),
                "--kind",
                kind,
                "--tokens-per-clip",
                str(k),
            ],
            capture_output=True,
            text=True,
            check=kind != "flex",  # a kernel that fails to compile is a row of the table, not the end of it
        )
        if done.returncode:
            error = (done.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"kind": kind, "tokens_per_clip": k, "error": error[:160]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = render(rows, args)
    print(table)
    out = args.out or HERE / "results" / f"sparse_attention_{args.device}_{args.precision}.md"
    out.write_text(table)
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and its .png")
    return 0


def render(rows: list[dict], args: argparse.Namespace) -> str:
    by = {(r["tokens_per_clip"], r["kind"]): r for r in rows}
    lines = [
        f"# Dense vs block-sparse attention ({args.device}, {args.precision})",
        "",
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, batch {args.batch}; one "
        "multimodal layer at paper size (hidden 768, 12 heads) over 30 clips x k tokens per modality + 2 BOS; "
        "sparse = blocks of 16, 1 local block each side, 1 random block, BOS global. "
        "Generated by `python benchmarks/sparse_attention.py`.",
        "",
        "| tokens/clip | tokens | attention GFLOP dense | sparse | ratio | attention fwd+bwd ms dense | sparse "
        "| ratio | attention peak MiB dense | sparse | layer fwd+bwd ms dense | sparse | ratio "
        "| layer peak MiB dense | sparse |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in args.lengths:
        d, s = by[(k, "dense")], by[(k, "sparse")]
        lines.append(
            f"| {k} | {d['tokens']} | {d['attention_gflop']:.3f} | {s['attention_gflop']:.3f} "
            f"| {s['attention_gflop'] / d['attention_gflop']:.2f} | {d['attention_ms']:.0f} | {s['attention_ms']:.0f} "
            f"| {s['attention_ms'] / d['attention_ms']:.2f} | {d['attention_peak_mib']:.0f} "
            f"| {s['attention_peak_mib']:.0f} | {d['step_ms']:.0f} | {s['step_ms']:.0f} "
            f"| {s['step_ms'] / d['step_ms']:.2f} | {d['peak_mib']:.0f} | {s['peak_mib']:.0f} |"
        )
    flex = [r for r in rows if r["kind"] == "flex"]
    if flex:
        lines += [
            "",
            "FlexAttention with the same pattern (a block mask of 16-token blocks, compiled): the attention alone.",
            "",
            "| tokens/clip | attention fwd+bwd ms dense | gathered | flex | flex / dense "
            "| attention peak MiB dense | gathered | flex |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in flex:
            d, s = by[(r["tokens_per_clip"], "dense")], by[(r["tokens_per_clip"], "sparse")]
            if "error" in r:
                flex_ms, ratio, flex_peak = "failed: " + r["error"].replace("|", "/"), "-", "-"
            else:
                flex_ms, ratio = f"{r['attention_ms']:.1f}", f"{r['attention_ms'] / d['attention_ms']:.2f}"
                flex_peak = f"{r['attention_peak_mib']:.0f}"
            lines.append(
                f"| {r['tokens_per_clip']} | {d['attention_ms']:.1f} | {s['attention_ms']:.1f} | {flex_ms} | {ratio} "
                f"| {d['attention_peak_mib']:.0f} | {s['attention_peak_mib']:.0f} | {flex_peak} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for kind, style in (("dense", "o-"), ("sparse", "s--")):
        mine = [r for r in rows if r["kind"] == kind]
        axes[0].plot([r["tokens"] for r in mine], [r["attention_gflop"] for r in mine], style, label=kind)
        axes[1].plot([r["tokens"] for r in mine], [r["step_ms"] for r in mine], style, label=kind)
    for axis, label in zip(axes, ("attention GFLOP (forward)", "layer forward + backward (ms)")):
        axis.set_xscale("log"), axis.set_yscale("log")
        axis.set_xlabel("tokens in the multimodal sequence"), axis.set_ylabel(label)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
