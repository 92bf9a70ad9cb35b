"""`profile.steps=[FIRST,LAST]`: a torch.profiler trace of those training steps on every rank
(and on CUDA a memory snapshot), written to `<run_dir>/profile/` and logged to MLflow.

Off (the default) it is two integer comparisons per step. The trace is Chrome/Perfetto JSON
with input shapes and memory events: open it at https://ui.perfetto.dev or chrome://tracing;
the CUDA snapshot (`*.pickle`) at https://pytorch.org/memory_viz."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pemt.config import ConfigError

log = logging.getLogger(__name__)

# CUDA allocation events kept for the memory snapshot: bounded (torch keeps every one by default).
SNAPSHOT_ENTRIES = 100_000


def profile_window(cfg: DictConfig) -> tuple[int, int] | None:
    """The steps to profile (1-based, both included), or None; ConfigError names a bad value."""
    steps = OmegaConf.select(cfg, "profile.steps")
    if steps is None:
        return None
    values = list(steps) if OmegaConf.is_list(steps) else [steps]
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"profile.steps={values}: give two steps [FIRST,LAST], e.g. profile.steps=[10,12]")
    first, last = values
    if not 1 <= first <= last:
        raise ConfigError(f"profile.steps={values}: need 1 <= FIRST <= LAST")
    return first, last


def check_profile(cfg: DictConfig) -> None:
    profile_window(cfg)


class StepProfiler:
    """Wraps the steps of one window; `before(step)` and `after(step)` around each step."""

    def __init__(self, window: tuple[int, int] | None, out_dir: Path, rank: int, device: torch.device) -> None:
        self.first, self.last = window or (0, -1)
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.cuda = device.type == "cuda"
        self._profiler: Any = None
        self.started = self.ended = 0  # the window being (or last) profiled

    def before(self, step: int) -> None:
        """`step` (1-based) is about to run."""
        if self._profiler is None and self.first <= step <= self.last:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            if self.cuda:
                torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_ENTRIES)
            self._profiler = profile(activities=activities, record_shapes=True, profile_memory=True)
            self._profiler.__enter__()
            self.started = step

    def after(self, step: int, stopping: bool = False) -> list[Path]:
        """`step` ran; at the window's end (or when the job stops inside it) the files are
        written and returned."""
        if self._profiler is None or (step < self.last and not stopping):
            return []
        self._profiler.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.ended = max(step, self.started)
        stem = f"rank{self.rank:05d}-{self._window_name()}"
        trace = self.out_dir / f"{stem}.trace.json"
        self._profiler.export_chrome_trace(str(trace))
        written = [trace]
        if self.cuda:
            snapshot = self.out_dir / f"{stem}.memory.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))  # type: ignore[no-untyped-call]
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(snapshot)
        self._profiler = None
        self.first = step + 1  # one window per job
        log.info("profiled steps %d-%d: %s", self.started, step, ", ".join(p.name for p in written))
        return written

    def finish(self, step: int) -> list[Path]:
        """The job ends (inside the window or not): write what was recorded. Never raises: the
        error that ended the job, if any, is the one to report."""
        try:
            return self.after(step, stopping=True)
        except Exception as err:  # noqa: BLE001
            log.warning("the profile from step %d could not be written: %s", self.started, err)
            return []

    def _window_name(self) -> str:
        return f"steps{self.started}-{self.ended}"

    def every_rank_files(self) -> list[Path]:
        """The last window's files of all ranks (once every rank has written them)."""
        return sorted(self.out_dir.glob(f"rank*-{self._window_name()}.*"))
