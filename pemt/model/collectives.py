"""Differentiable collectives, so a step over W ranks computes what one process would.

Gradients flow through gathered rows back to the rank that owns them (one process holding the
whole batch would send them there too). Only all_gather and all_reduce are used: gloo has no
reduce_scatter. Ranks may hold different numbers of rows (a dropped bad sample): gathers pad.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist

from pemt.distributed import world


def _row_counts(rows: int, device: torch.device) -> list[int]:
    _, size = world()
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([rows], device=device))
    return [int(c.item()) for c in counts]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, counts: list[int]) -> torch.Tensor:
        rank, size = world()
        padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded.contiguous())
        ctx.counts, ctx.rank = counts, rank
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's contribution to every row
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None


def gather_rows(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's rows in rank order, differentiable; and where this rank's rows start."""
    rank, size = world()
    if size == 1:
        return local, 0
    counts = _row_counts(len(local), local.device)
    gathered = _GatherRows.apply(local, counts)  # type: ignore[no-untyped-call]
    return cast(torch.Tensor, gathered), sum(counts[:rank])


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all ranks, differentiable."""
    return tensor if world()[1] == 1 else cast(torch.Tensor, _SumOverRanks.apply(tensor))  # type: ignore[no-untyped-call]


def global_rows(rows: int, device: torch.device) -> tuple[int, int]:
    """This rank's first global row and the global row count, for `rows` local rows."""
    if world()[1] == 1:
        return 0, rows
    counts = _row_counts(rows, device)
    return sum(counts[: world()[0]]), sum(counts)
