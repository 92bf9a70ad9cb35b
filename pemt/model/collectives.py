"""Differentiable collectives, so a step over W ranks computes what one process would.

Gradients flow through gathered rows back to the rank that owns them (one process holding the
whole batch would send them there too). Only all_gather and all_reduce are used: gloo has no
reduce_scatter. Ranks may hold different numbers of rows (a dropped bad sample): gathers pad.

With gradient accumulation, `micro_steps` makes the gathers span the optimizer step's global
batch (every micro-step of every rank), not one micro-step's: a forward pass without gradients
over each micro-batch records what each gather returns, and each micro-step then sees the other
micro-batches' rows as recorded, without gradients (the one part it cannot send back), and its own
live. BatchNorm (`sum_over_ranks`) still normalises over the micro-step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


def _gather_ranks(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    rank, size = world()
    if size == 1:
        return local, 0
    counts = _row_counts(len(local), local.device)
    gathered = _GatherRows.apply(local, counts)  # type: ignore[no-untyped-call]
    return cast(torch.Tensor, gathered), sum(counts[:rank])


class _MicroSteps:
    """What the gathers of each micro-step returned in the recording pass, in call order."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.records: list[list[torch.Tensor]] = [[] for _ in range(count)]
        self.micro = 0
        self.call = 0
        self.replaying = False


_ACCUMULATING: _MicroSteps | None = None


@contextlib.contextmanager
def micro_steps(count: int) -> Iterator[None]:
    """One optimizer step of `count` micro-steps whose gathers span all of them: run each
    micro-batch's forward once without gradients under `micro_step(j, replay=False)`, then each
    micro-step under `micro_step(j, replay=True)`."""
    global _ACCUMULATING
    _ACCUMULATING = _MicroSteps(count)
    try:
        yield
    finally:
        _ACCUMULATING = None


@contextlib.contextmanager
def micro_step(index: int, replay: bool) -> Iterator[None]:
    """Micro-step `index` of the step `micro_steps` opened: recording its gathers, or replaying the
    others' around its own."""
    state = _ACCUMULATING
    assert state is not None, "micro_step() outside micro_steps()"
    state.micro, state.call, state.replaying = index, 0, replay
    if not replay:
        state.records[index] = []
    yield


def reaching_every_micro_step(loss: torch.Tensor) -> torch.Tensor:
    """`loss` as it is, its gradient k times over inside `micro_steps` (k micro-steps replaying):
    for a loss each micro-step computes in full over the step's batch (the InfoNCE), whose gradient
    reaches only that micro-step's own rows; the k micro-steps' gradients are then averaged."""
    state = _ACCUMULATING
    if state is None or not state.replaying:
        return loss
    return loss + (state.count - 1) * (loss - loss.detach())


def gather_rows(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's rows in rank order, differentiable; and where this rank's rows start. Inside
    `micro_steps`: every micro-step's, in micro-step order (earlier ones as recorded)."""
    state = _ACCUMULATING
    live, offset = _gather_ranks(local)
    if state is None:
        return live, offset
    call, state.call = state.call, state.call + 1
    if not state.replaying:
        state.records[state.micro].append(live.detach())
    earlier = [state.records[j][call] for j in range(state.micro)]
    # recording: the later micro-steps are not there yet, and nothing gathered so far needs them
    later = [state.records[j][call] for j in range(state.micro + 1, state.count)] if state.replaying else []
    return torch.cat([*earlier, live, *later]), sum(len(r) for r in earlier) + offset


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
    """This rank's first global row and the global row count, for `rows` local rows (inside
    `micro_steps`: over the micro-steps recorded so far, or all of them when replaying)."""
    if _ACCUMULATING is not None:  # rows placed as gather_rows places them
        gathered, first = gather_rows(torch.zeros(rows, 1, device=device))
        return first, len(gathered)
    if world()[1] == 1:
        return 0, rows
    counts = _row_counts(rows, device)
    return sum(counts[: world()[0]]), sum(counts)
