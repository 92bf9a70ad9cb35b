"""The CNNs' global-batch BatchNorm: the explicit ops against torch's fused kernels, on this machine.

    python benchmarks/batchnorm.py [--device cuda|cpu] [--precision bf16|fp32] [--clips 120] [--crop 112]
                                   [--ranks 2]

`model.batchnorm=fused` runs torch's kernels where they exist (native batch norm on one GPU or one
CPU process, SyncBatchNorm's across GPUs); `explicit` runs pemt's own ops (an fp32 copy of the
activation, sums over ranks, E[x^2] - E[x]^2). This times one training forward + backward of each
at the activation shapes of avbert_base's visual CNN at the paper's window (`--clips` clips of 16
frames at `--crop`: the stem, the first stage's output and the last stage's), on one process (world
size 1; the kernels for several ranks add one all-gather of 2C + 1 numbers, the explicit ops one
all-reduce of 2C + 1), and reports the largest difference between the two (output and input
gradient, relative to the output's RMS) and the peak memory (CUDA). On CPU the fused column is
torch's native CPU batch norm, which pemt uses on one CPU process. `--ranks N` also runs each path
over N processes on the device (gloo), each with its slice of the batch, and compares every result
with one process holding the whole batch: the check that the statistics and gradients really are
the global batch's (on CPU the explicit path only). Writes a Markdown table.
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

    x, grad, norm = _inputs(shape, args)
    x.requires_grad_()
    cuda = x.is_cuda
    paths = {"explicit": norm.forward, "fused": norm.fused_forward}
    norm.fused = False  # forward(): the explicit ops on every device
    result: dict[str, float] = {}
    outputs = {}
    for name, run in paths.items():
        times = []
        for _ in range(args.repeats + 1):  # the first is a warm-up
            x.grad = None
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            out = run(x)
            out.backward(grad)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        outputs[name] = (out.detach(), x.grad)
        result[f"{name}_ms"] = statistics.median(times[1:]) * 1000
        if cuda:
            result[f"{name}_mib"] = torch.cuda.max_memory_allocated() / 2**20
    result["out_diff"] = _relative(outputs["fused"][0], outputs["explicit"][0])
    result["grad_diff"] = _relative(outputs["fused"][1], outputs["explicit"][1])
    return result


def _relative(a, b) -> float:
    """Largest difference of a from b, relative to b's RMS."""
    return float((a.float() - b.float()).abs().max() / b.float().square().mean().sqrt())


def _inputs(shape: tuple[int, ...], args: argparse.Namespace):
    """The same input, output gradient and BatchNorm in every process (fixed seed)."""
    import torch

    from pemt.model.cnn import BatchNorm

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    x = (torch.randn(shape, device=device) * 2.0 + 1.0).to(dtype)
    grad = torch.randn(shape, device=device).to(dtype)
    norm = BatchNorm(shape[1]).to(device)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return x, grad, norm


def _step(norm, run, x, grad) -> dict:
    """One training forward + backward: output, input gradient, parameter gradients, running var."""
    x = x.clone().requires_grad_()
    out = run(x)
    out.backward(grad)
    return {
        "output": out.detach(),
        "input grad": x.grad,
        "weight grad": norm.weight.grad,
        "bias grad": norm.bias.grad,
        "running var": norm.running_var.clone(),
    }


def _rank_process(rank: int, ranks: int, args: argparse.Namespace, rendezvous: str, results: str) -> None:
    """One of `ranks` processes on the same device (gloo): its slice of the batch through each path."""
    import copy

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=ranks)
    x, grad, norm = _inputs(rank_shape(args), args)
    mine = slice(rank * len(x) // ranks, (rank + 1) * len(x) // ranks)
    found = {}
    for path in rank_paths(args):
        local = copy.deepcopy(norm)
        local.fused = False
        step = _step(local, local.fused_forward if path == "fused" else local.forward, x[mine], grad[mine])
        for key in ("output", "input grad"):  # rows of the whole batch, in rank order
            parts = [torch.empty_like(step[key]) for _ in range(ranks)]
            dist.all_gather(parts, step[key].contiguous())
            step[key] = torch.cat(parts)
        for key in ("weight grad", "bias grad"):  # each rank's part of the whole batch's gradient
            dist.all_reduce(step[key])
        found[path] = {k: v.cpu() for k, v in step.items()}
    if rank == 0:
        torch.save(found, results)
    dist.destroy_process_group()


def rank_shape(args: argparse.Namespace) -> tuple[int, ...]:
    return shapes(args.clips, args.crop)["visual res5 output"]


def rank_paths(args: argparse.Namespace) -> list[str]:
    """SyncBatchNorm's kernels exist on CUDA only."""
    return ["explicit", "fused"] if args.device.startswith("cuda") else ["explicit"]


def check_ranks(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Each path over `--ranks` processes against one process holding the whole batch (explicit ops):
    the largest difference of each result, relative to its RMS."""
    import tempfile

    import torch
    import torch.multiprocessing as mp

    x, grad, norm = _inputs(rank_shape(args), args)
    norm.fused = False
    reference = {k: v.cpu() for k, v in _step(norm, norm.forward, x, grad).items()}
    with tempfile.TemporaryDirectory() as folder:
        results = f"{folder}/results.pt"
        mp.spawn(_rank_process, args=(args.ranks, args, f"{folder}/rendezvous", results), nprocs=args.ranks)
        found = torch.load(results)
    return {path: {k: _relative(v, reference[k]) for k, v in found[path].items()} for path in rank_paths(args)}


def render_ranks(diffs: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    keys = list(next(iter(diffs.values())))
    lines = [
        "",
        f"Across {args.ranks} processes (gloo, one device, the batch split between them), against one process "
        f"holding the whole batch with the explicit ops, at {'x'.join(map(str, rank_shape(args)))}: the largest "
        "difference of each result relative to its RMS (the gradients of the parameters summed over the processes).",
        "",
        "| path | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    lines += [f"| {path} | " + " | ".join(f"{d[k]:.1e}" for k in keys) + " |" for path, d in diffs.items()]
    return "\n".join(lines) + "\n"


def render(rows: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    memory = args.device.startswith("cuda")
    ranks = f" --ranks {args.ranks}" if args.ranks > 1 else ""
    lines = [
        f"# Global-batch BatchNorm: explicit ops vs torch's fused kernels ({args.device}, {args.precision})",
        "",
        f"{datetime.date.today()}; `python benchmarks/batchnorm.py --device {args.device} --precision {args.precision} "
        f"--clips {args.clips} --crop {args.crop}{ranks}`. One process; forward + backward in training mode, "
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
    parser.add_argument("--ranks", type=int, default=0, help="also check each path over this many processes")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "batchnorm.md")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    rows = {name: measure(shape, args) for name, shape in tqdm(shapes(args.clips, args.crop).items(), desc="shapes")}
    table = render(rows, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)  # kept if the check across processes fails
    if args.ranks > 1:
        table += render_ranks(check_ranks(args), args)
        args.out.write_text(table)
    print(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
