"""Steps that must not change the model, decided by every rank together.

- A step where some rank has a micro-batch with no usable sample is skipped by all ranks (one
  all-reduce before the forward): no rank raises alone while its peers wait in a collective.
  The bad samples are counted as usual and `data.max_error_rate` decides whether the run stops.
- A step whose gradients are not finite is skipped by DeepSpeed's overflow check (a collective
  of its own, so ranks agree; bf16 has it switched on in pemt.train.engine_config); the guard
  then puts back the BatchNorm running statistics the forward pass changed, counts the step in
  `skipped_steps`, and stops the run after `train.max_skipped_steps` in a row.
- Before a checkpoint is written the weights and buffers are checked on every rank: a
  checkpoint is never written from non-finite values, so `latest` stays the last good one.

A skipped step still advances the step counter and the data cursor (its samples are consumed),
so the sample order and exact resume are unchanged; the learning-rate schedule does not advance.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced non-finite values it cannot step past."""


def agree_any(flag: bool, device: torch.device) -> bool:
    """Collective: whether any rank's `flag` is set."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _local_tensors(model: nn.Module) -> list[torch.Tensor]:
    """This rank's part of every parameter (its ZeRO-3 partition where there is one) and buffer."""
    parts = [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in model.parameters()]
    return [t for t in parts + list(model.buffers()) if t.numel() and t.is_floating_point()]


class StepGuard:
    def __init__(self, model: nn.Module, max_skipped_in_a_row: int, device: torch.device) -> None:
        self.model, self.limit, self.device = model, max_skipped_in_a_row, device
        self.skipped = 0  # steps skipped in this job, for `skipped_steps`
        self.in_a_row = 0
        self._norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._saved: list[torch.Tensor] = []

    def any_empty(self, batches: list[dict[str, Any]]) -> bool:
        """Collective: whether some rank has a micro-batch of this step with no usable sample."""
        return agree_any(any("video" not in b for b in batches), self.device)

    def skip_empty(self, step: int, batches: list[dict[str, Any]]) -> None:
        self.skipped += 1
        mine = [e for b in batches if "video" not in b for e in b["errors"]]
        log.warning(
            "step %d skipped on every rank: a micro-batch had no usable sample%s",
            step,
            f" (here: {'; '.join(e['reason'] for e in mine[:3])})" if mine else " (on another rank)",
        )

    def before_forward(self) -> None:
        """Keep the BatchNorm running statistics a non-finite forward would poison."""
        self._saved = [
            t.detach().clone() for m in self._norms for t in (m.running_mean, m.running_var) if t is not None
        ]

    def after_step(self, applied: bool, step: int, loss_tensor: torch.Tensor) -> bool:
        """After the optimizer step: whether it counted. A step DeepSpeed skipped for non-finite
        gradients puts the statistics back; too many in a row stop the run."""
        if applied:
            self.in_a_row = 0
            return True
        loss = float(loss_tensor.detach())
        with torch.no_grad():
            live = [t for m in self._norms for t in (m.running_mean, m.running_var) if t is not None]
            for target, saved in zip(live, self._saved):
                target.copy_(saved)
        self.skipped += 1
        self.in_a_row += 1
        log.warning(
            "step %d skipped: non-finite gradients (loss %s); %d in a row (train.max_skipped_steps=%d)",
            step,
            f"{loss:.4g}",
            self.in_a_row,
            self.limit,
        )
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"{self.in_a_row} steps in a row up to step {step} had non-finite gradients (last loss {loss:.4g}); "
                "stopping: the last checkpoint written stays `latest`. Lower train.lr, check the data, or raise "
                "train.max_skipped_steps"
            )
        return False

    def check_finite(self, step: int) -> None:
        """Collective: raise NonFiniteError, on every rank, if any rank holds a non-finite weight."""
        tensors = _local_tensors(self.model)
        bad = bool(tensors) and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
        if agree_any(bad, self.device):
            raise NonFiniteError(
                f"weights or statistics are not finite at step {step}: no checkpoint is written "
                "from them; the last checkpoint stays `latest`"
            )
