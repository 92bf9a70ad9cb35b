"""Preemption and time limits: a signal becomes a collective save at the next step boundary.

Slurm (and submitit's local executor) send SIGUSR2 before preemption or the time limit, and
SIGTERM before killing. The handler only records the signal. At each step boundary the ranks
agree (one all-reduce) whether any of them got one; then all save together, and the job hands
over to submitit's own USR2 handler, which requeues it from rank 0 (submitit's checkpoint path
under hydra-submitit-launcher). After SIGTERM the job exits without requeueing itself: the
scheduler requeues or ends it.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from types import FrameType
from typing import Any, Callable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at: float | None = None
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._record)

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            log.warning("received %s: saving at the next step boundary", signal.Signals(signum).name)
            self.received_at = time.time()
        self.signum = self.signum or signum

    def agreed(self, device: torch.device) -> int | None:
        """Collective: the signal any rank received (USR2 over TERM), or None."""
        code = {None: 0, signal.SIGTERM: 1, signal.SIGUSR2: 2}[self.signum]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([code], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
            if code:  # every rank learns when the first signal arrived, for timing the save
                first = torch.tensor([self.received_at or float("inf")], dtype=torch.float64, device=device)
                dist.all_reduce(first, op=dist.ReduceOp.MIN)
                self.received_at = float(first.item())
        return {0: None, 1: signal.SIGTERM, 2: signal.SIGUSR2}[code]

    def hand_over(self, signum: int, requeue: bool = True) -> None:
        """After the save: requeue through submitit's handler (rank 0 exits inside it), then exit.

        Without `requeue` (jobs submitted --no-requeue) the job just ends; the run is continued
        with tools/resume.py."""
        previous: Callable | Any = self.previous.get(signum)
        self.uninstall()
        if requeue and signum == signal.SIGUSR2 and callable(previous):
            previous(signum, None)
        sys.exit(0)
