"""Checkpoints of the DeepSpeed engine (model, optimizer, ZeRO partitions, lr schedule) plus
the trainer's own counters, one folder per step under `<run_dir>/checkpoints`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LATEST = "latest"  # DeepSpeed's pointer file to the newest tag


class CheckpointError(RuntimeError):
    pass


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


class Checkpointer:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def latest_tag(self) -> str | None:
        pointer = self.directory / LATEST
        return pointer.read_text().strip() if pointer.exists() else None

    def save(self, engine: Any, step: int, state: dict[str, Any]) -> Path:
        """Collective: every rank calls it at the same step."""
        tag = step_tag(step)
        engine.save_checkpoint(str(self.directory), tag=tag, client_state={"step": step, **state})
        return self.directory / tag

    def load(self, engine: Any) -> dict[str, Any] | None:
        """Restore the newest checkpoint into `engine`; its client state, or None if there is none."""
        tag = self.latest_tag()
        if tag is None:
            return None
        path, client_state = engine.load_checkpoint(str(self.directory), tag=tag)
        if path is None:
            raise CheckpointError(f"{self.directory / tag}: checkpoint named in {self.directory / LATEST} could not be loaded")
        log.info("resumed from %s (step %s)", path, client_state.get("step"))
        return client_state
