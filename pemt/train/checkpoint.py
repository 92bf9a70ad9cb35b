"""Atomic, verified checkpoints of the DeepSpeed engine and everything a resume needs.

A save writes into `checkpoints/.staging/<tag>`: DeepSpeed's files (model, optimizer, ZeRO
partitions, lr schedule), each rank's RNG state, then a manifest of every file with its size
and sha256 (ranks hash their share of the files in parallel). Only after every rank is done
does rank 0 rename the folder to `checkpoints/<tag>` and point `latest` at it, so a
checkpoint is visible only once complete. Loading checks the manifest and falls back to the
previous complete checkpoint when a file is missing, truncated or altered; folders of an
unfinished save are set aside under `.incomplete/` at start. Retention keeps the last K and
every M-th step.

A checkpoint written at another world size is converted to DeepSpeed's universal format
(once, cached under `.universal/`) and loaded from there.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from pemt.distributed import world
from pemt.integrity import sha256, write_atomic

log = logging.getLogger(__name__)

MANIFEST = "pemt_manifest.json"
LATEST = "latest"
STAGING = ".staging"
INCOMPLETE = ".incomplete"
UNIVERSAL = ".universal"


class CheckpointError(RuntimeError):
    pass


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _gather(obj: Any) -> list[Any]:
    rank, size = world()
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass(frozen=True)
class Committed:
    tag: str
    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def verify(folder: Path, manifest: dict[str, Any], names: list[str] | None = None) -> str | None:
    """Why `folder` does not match its manifest (for `names`, default all files), or None."""
    for name in names if names is not None else sorted(manifest["files"]):
        expected = manifest["files"][name]
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, manifest says {expected['bytes']}"
        if sha256(path) != expected["sha256"]:
            return f"{path} does not match its sha256"
    return None


class Checkpointer:
    def __init__(self, directory: Path, keep_last: int = 3, keep_every: int = 0) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_every = keep_every

    # -- finding -------------------------------------------------------------------------
    def committed(self) -> list[Committed]:
        """Complete checkpoints (those with a manifest), oldest first."""
        found = []
        for manifest in self.directory.glob(f"step_*/{MANIFEST}"):
            try:
                data = json.loads(manifest.read_text())
            except ValueError:
                continue
            found.append(Committed(manifest.parent.name, manifest.parent, data))
        return sorted(found, key=lambda c: c.step)

    def set_aside_leftovers(self) -> list[Path]:
        """Rank 0, at start: move folders of unfinished saves out of the way (kept, not deleted)."""
        moved = []
        leftovers = [p for p in (self.directory / STAGING).glob("*") if p.is_dir()] + [
            p for p in self.directory.glob("step_*") if p.is_dir() and not (p / MANIFEST).exists()]
        for path in leftovers:
            target = self.directory / INCOMPLETE / f"{path.name}-{int(time.time())}"
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
            log.warning("set aside the unfinished checkpoint %s as %s", path, target)
            moved.append(target)
        return moved

    def select(self) -> Committed | None:
        """Collective: the newest checkpoint that verifies on every rank (files split among ranks)."""
        rank, size = world()
        if rank == 0:
            self.set_aside_leftovers()
        _barrier()
        for candidate in reversed(self.committed()):
            names = sorted(candidate.manifest["files"])[rank::size]
            problems = [p for p in _gather(verify(candidate.path, candidate.manifest, names)) if p]
            if not problems:
                return candidate
            log.warning("checkpoint %s is damaged (%s); falling back to the previous one",
                        candidate.path, "; ".join(problems))
        return None

    # -- saving --------------------------------------------------------------------------
    def save(self, engine: Any, step: int, state: dict[str, Any]) -> float:
        """Collective. Commit a checkpoint of `engine` at `step`; returns the seconds it took."""
        started = time.perf_counter()
        rank, size = world()
        tag = step_tag(step)
        staging = self.directory / STAGING / tag
        engine.save_checkpoint(str(self.directory / STAGING), tag=tag, save_latest=False)
        (staging / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), staging / "rng" / f"rank{rank:05d}.pt")
        _barrier()
        names = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        mine = {n: {"bytes": (staging / n).stat().st_size, "sha256": sha256(staging / n)} for n in names[rank::size]}
        files = {k: v for part in _gather(mine) for k, v in part.items()}
        if rank == 0:
            manifest = {"step": step, "world_size": size, "saved_at": time.time(), "state": state,
                        "files": files}
            write_atomic(staging / MANIFEST, json.dumps(manifest, indent=1))
            final = self.directory / tag
            if final.exists():  # a step saved before a rollback: the new one replaces it
                shutil.rmtree(final)
            staging.rename(final)
            write_atomic(self.directory / LATEST, tag)
            _fsync_dir(self.directory)
            self._prune()
        _barrier()
        return time.perf_counter() - started

    def _prune(self) -> None:
        checkpoints = self.committed()
        keep = {c.tag for c in checkpoints[-self.keep_last:]} if self.keep_last else {c.tag for c in checkpoints}
        if self.keep_every:
            keep |= {c.tag for c in checkpoints if c.step % self.keep_every == 0}
        for checkpoint in checkpoints:
            if checkpoint.tag not in keep:
                shutil.rmtree(checkpoint.path, ignore_errors=True)
                shutil.rmtree(self.directory / UNIVERSAL / checkpoint.tag, ignore_errors=True)

    # -- loading -------------------------------------------------------------------------
    def universal(self, checkpoint: Committed) -> Path:
        """Collective: the checkpoint in DeepSpeed's universal format, converted once by rank 0."""
        rank, _ = world()
        out = self.directory / UNIVERSAL / checkpoint.tag
        done = out / ".complete"
        if rank == 0 and not done.exists():
            log.info("converting %s to the universal format for a new world size", checkpoint.path)
            shutil.rmtree(out, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            with glob_safe(checkpoint.path) as source:
                result = subprocess.run(
                    [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                     str(source), "--output_folder", str(out), "--inject_missing_state"],
                    capture_output=True, text=True)
            if result.returncode:
                raise CheckpointError(f"converting {checkpoint.path} to universal format failed:\n{result.stderr[-3000:]}")
            done.touch()
        _barrier()
        return out

    def load(self, engine: Any, checkpoint: Committed, universal: bool) -> dict[str, Any]:
        """Restore `checkpoint` into `engine` (and this rank's RNG); return the saved trainer state."""
        rank, size = world()
        if universal:
            folder = self.universal(checkpoint)
            with glob_safe(folder.parent) as directory:
                path, _ = engine.load_checkpoint(str(directory), tag=folder.name)
        else:
            with glob_safe(self.directory) as directory:
                path, _ = engine.load_checkpoint(str(directory), tag=checkpoint.tag)
        if path is None:
            raise CheckpointError(f"{checkpoint.path}: DeepSpeed could not load it")
        rng_file = checkpoint.path / "rng" / f"rank{rank:05d}.pt"
        if size == checkpoint.manifest["world_size"] and rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=True))
        log.info("resumed from %s (step %d)", checkpoint.path, checkpoint.step)
        return checkpoint.manifest["state"]


@contextmanager
def glob_safe(path: Path) -> Iterator[Path]:
    """`path`, or a link to it whose name has no glob characters: DeepSpeed's checkpoint loading
    and converters find files with glob, and run dirs are named by overrides such as
    `model.sharing=[layer,cross]`, whose brackets glob reads as a pattern."""
    if not any(c in str(path) for c in "[]*?"):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="pemt-") as folder:
        link = Path(folder) / path.name.translate(str.maketrans("[]*?", "____"))
        link.symlink_to(Path(path).resolve(), target_is_directory=True)
        yield link
