"""Atomic, durable, verified checkpoints of the DeepSpeed engine and everything a resume needs,
written in the background.

A save has DeepSpeed build its files (model states, every rank's optimizer shard, lr schedule)
into `checkpoints/.staging/<tag>`, through pemt's own checkpoint engine (pemt.train.snapshot):
asynchronously, every tensor is first copied to host memory (pinned on GPUs) and training goes
on while a background thread (at a lower CPU priority) writes, fsyncs and hashes the files;
synchronously (the first save, the last, a save on a signal, or `train.async_checkpoint=false`)
the same writes happen before the save returns. Each rank records what it wrote (or why it could
not) in a part file. Rank 0 commits once every rank's part is in: it writes the manifest (every
expected file with its size and sha256, every rank's list), fsyncs the folder, renames it to
`checkpoints/<tag>`, fsyncs the parent, points `latest` at it, and only then lets retention delete
older checkpoints. A checkpoint is therefore complete, durable and verified, or invisible; at most
one save is in flight; a rank that cannot write (a full disk) fails that save without the others
waiting in a barrier, and the previous checkpoint stays.

Loading checks the manifest and falls back to the previous complete checkpoint when a file is
missing, truncated or altered, or when DeepSpeed cannot load it (it is then set aside under
`.incomplete/`, like folders of unfinished saves). Retention keeps the last K and every M-th step
and prunes leftovers. A checkpoint written at another world size is converted to DeepSpeed's
universal format (pemt.train.universal) and loaded from there.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist

from pemt.distributed import world
from pemt.integrity import sha256, write_atomic
from pemt.train import universal
from pemt.train.checkpoint_files import INCOMPLETE, LATEST, MANIFEST, STAGING, Committed, committed_checkpoints
from pemt.train.rng import rng_state, set_rng_state
from pemt.train.snapshot import (
    PARTS,
    CapturingEngine,
    HostCopy,
    WriteJob,
    fsync_dir,
    tensor_bytes,
    write_files,
    yield_cpu_to_training,
)
from pemt.train.universal import glob_safe

log = logging.getLogger(__name__)

UNIVERSAL = universal.UNIVERSAL
# Host memory an asynchronous save may take: its copy must fit in this share of what is free.
HOST_COPY_SHARE = 0.5
# How long rank 0 waits for the other ranks' parts of one checkpoint before giving it up.
COMMIT_TIMEOUT_S = 1800.0


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


def _all(flag: bool) -> bool:
    """Collective: whether `flag` holds on every rank."""
    return all(_gather(bool(flag)))


@dataclass
class SaveReport:
    """What one save cost the training loop, and what it holds."""

    stall_s: float  # seconds the training loop waited
    asynchronous: bool
    host_copy_bytes: int = 0  # host memory of the copy (asynchronous saves)
    committed: bool = True  # synchronous saves: committed; asynchronous: known later


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
    def __init__(
        self,
        directory: Path,
        keep_last: int = 3,
        keep_every: int = 0,
        asynchronous: bool = False,
        direct_io: bool = True,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"train.keep_last={keep_last}: at least 1 (the checkpoint a resume needs)")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.asynchronous = asynchronous
        self.direct_io = direct_io
        self.capture: CapturingEngine | None = None
        self.copy = HostCopy()
        self._writer: threading.Thread | None = None
        self._abandon = threading.Event()
        self._last_bytes: int | None = None
        self._warned_memory = False
        self.failures = 0  # saves not committed (rank 0 knows the asynchronous ones)

    # -- finding -------------------------------------------------------------------------
    def committed(self) -> list[Committed]:
        """Complete checkpoints (those with a manifest), oldest first."""
        return committed_checkpoints(self.directory)

    def _set_aside(self, path: Path, why: str) -> Path:
        # one name per move: the same step can be set aside twice in a second (a job that dies
        # while saving step N, restarts, and dies saving step N again)
        stamp = int(time.time())
        for attempt in itertools.count():
            target = self.directory / INCOMPLETE / f"{path.name}-{why}-{stamp}{f'.{attempt}' if attempt else ''}"
            if not target.exists():
                break
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
        return target

    def set_aside_leftovers(self) -> list[Path]:
        """Rank 0, at start: move folders of unfinished saves out of the way (kept until retention)."""
        moved = []
        leftovers = [p for p in (self.directory / STAGING).glob("*") if p.is_dir()] + [
            p for p in self.directory.glob("step_*") if p.is_dir() and not (p / MANIFEST).exists()
        ]
        for path in leftovers:
            target = self._set_aside(path, "unfinished")
            log.warning("set aside the unfinished checkpoint %s as %s", path, target)
            moved.append(target)
        return moved

    def select(self, newest: int | None = None) -> Committed | None:
        """Collective: the newest checkpoint (at or below step `newest`) that verifies on every
        rank (files split among ranks)."""
        rank, size = world()
        if rank == 0:
            self.set_aside_leftovers()
        _barrier()
        for candidate in reversed(self.committed()):
            if newest is not None and candidate.step > newest:
                continue
            names = sorted(candidate.manifest["files"])[rank::size]
            problems = [p for p in _gather(verify(candidate.path, candidate.manifest, names)) if p]
            if not problems:
                return candidate
            log.warning(
                "checkpoint %s is damaged (%s); falling back to the previous one", candidate.path, "; ".join(problems)
            )
        return None

    # -- saving --------------------------------------------------------------------------
    def attach(self, engine: Any) -> None:
        """Give DeepSpeed pemt's checkpoint engine (every save goes through pemt's writer)."""
        self.capture = CapturingEngine()
        engine.checkpoint_engine = self.capture
        copy_script = engine._copy_recovery_script  # noqa: SLF001 - rank 0 copies zero_to_fp32.py

        def tolerant_copy(save_path: str) -> None:
            # inside DeepSpeed's save, before its barrier: a full disk must not raise there alone
            try:
                copy_script(save_path)
            except OSError as err:
                log.warning("zero_to_fp32.py not copied into the checkpoint: %s", err)

        engine._copy_recovery_script = tolerant_copy  # noqa: SLF001

    def _room_for_copy(self) -> bool:
        if self._last_bytes is None:
            return False  # the first save is synchronous: it measures what a copy takes
        more = self._last_bytes - self.copy.kept_bytes  # the buffers kept from the last copy are reused
        if more <= HOST_COPY_SHARE * psutil.virtual_memory().available:
            return True
        if not self._warned_memory:
            log.warning(
                "an asynchronous checkpoint needs %.2f GiB of host memory, more than half of what is "
                "free: saving synchronously",
                self._last_bytes / 2**30,
            )
            self._warned_memory = True
        return False

    def save(self, engine: Any, step: int, state: dict[str, Any], final: bool = False) -> SaveReport:
        """Collective. Save `engine` at `step`. Asynchronous unless `final` (the last save, or one
        on a signal) or there is no room for the host copy; returns what the training loop paid."""
        if self.capture is None:
            self.attach(engine)
        assert self.capture is not None
        started = time.perf_counter()
        self.settle()  # at most one save in flight
        rank, size = world()
        tag = step_tag(step)
        staging = self.directory / STAGING / tag
        asynchronous = self.asynchronous and not final and _all(self._room_for_copy())
        self.capture.copy = self.copy if asynchronous else None
        engine.save_checkpoint(str(self.directory / STAGING), tag=tag, save_latest=False)
        rng = rng_state()
        job = WriteJob(
            staging, rank, [*self.capture.take(), (staging / "rng" / f"rank{rank:05d}.pt", rng)], self.direct_io
        )
        self._last_bytes = sum(tensor_bytes(s) for _, s in job.files)
        if asynchronous:
            HostCopy.settle()
            self._abandon.clear()
            self._writer = threading.Thread(
                target=self._write_and_commit, args=(job, step, state, size), daemon=True, name="pemt-checkpoint-writer"
            )
            self._writer.start()
            return SaveReport(time.perf_counter() - started, True, self._last_bytes)
        part = write_files(job)
        if "error" in part:
            log.error("rank %d could not write its part of the checkpoint at step %d: %s", rank, step, part["error"])
        written = _all("error" not in part)
        if not written and rank == 0:
            log.error("checkpoint at step %d not committed (the previous one stays)", step)
        committed = rank == 0 and written and self._commit(staging, step, state, size)
        committed = _gather(committed)[0]
        if not committed:
            self.failures += 1
        _barrier()
        return SaveReport(time.perf_counter() - started, False, committed=committed)

    def _write_and_commit(self, job: WriteJob, step: int, state: dict[str, Any], size: int) -> None:
        yield_cpu_to_training()
        write_files(job)
        if job.rank == 0 and not self._commit(job.staging, step, state, size):
            self.failures += 1

    def settle(self, timeout_s: float | None = None) -> bool:
        """Wait for this rank's save in flight; past `timeout_s` give it up (it is never
        committed). Returns whether nothing is left in flight."""
        if self._writer is None:
            return True
        self._writer.join(timeout_s)
        if self._writer.is_alive():
            self._abandon.set()
            log.warning("gave up the checkpoint being written in the background (not committed)")
            return False
        self._writer = None
        return True

    def _parts(self, staging: Path, size: int) -> list[dict[str, Any]] | None:
        """Every rank's part of the checkpoint, waiting for them; None if given up."""
        deadline = time.time() + COMMIT_TIMEOUT_S
        while True:
            parts = []
            for rank in range(size):
                try:
                    parts.append(json.loads((staging / PARTS / f"rank{rank:05d}.json").read_text()))
                except (OSError, ValueError):
                    break
            if len(parts) == size:
                return parts
            if self._abandon.is_set() or time.time() > deadline:
                return None
            time.sleep(0.05)

    def _commit(self, staging: Path, step: int, state: dict[str, Any], size: int) -> bool:
        """Rank 0: manifest, fsync, rename, fsync, `latest`, retention - once every part is in."""
        parts = self._parts(staging, size)
        if parts is None:
            log.error("checkpoint at step %d not committed: not every rank's files arrived", step)
            return False
        failed = [f"rank {p['rank']}: {p['error']}" for p in parts if "error" in p]
        if failed:
            log.error("checkpoint at step %d not committed (the previous one stays): %s", step, "; ".join(failed))
            return False
        files = {name: facts for part in parts for name, facts in part["files"].items()}
        manifest = {
            "step": step,
            "world_size": size,
            "saved_at": time.time(),
            "state": state,
            "files": files,
            "ranks": {str(p["rank"]): sorted(p["files"]) for p in parts},
        }
        try:
            write_atomic(staging / MANIFEST, json.dumps(manifest, indent=1))
            fsync_dir(staging)
            if self._abandon.is_set():
                return False
            final = self.directory / staging.name
            if final.exists():  # a step saved before a rollback: the new one replaces it
                shutil.rmtree(final)
            universal.forget(self.directory, staging.name)
            staging.rename(final)
            fsync_dir(staging.parent)
            write_atomic(self.directory / LATEST, staging.name)
            fsync_dir(self.directory)
        except OSError as err:
            log.error("checkpoint at step %d not committed (the previous one stays): %s", step, err)
            return False
        self._prune()  # only now, with the new checkpoint durable
        written = sum(f["bytes"] for f in files.values())
        slowest = max(p.get("write_s", 0.0) for p in parts)
        log.info(
            "checkpoint at step %d committed: %.2f GB, the slowest rank wrote its part in %.2f s (%.0f MB/s in all)",
            step,
            written / 1e9,
            slowest,
            written / 1e6 / max(slowest, 1e-9),
        )
        return True

    def _prune(self) -> None:
        checkpoints = self.committed()
        keep = {c.tag for c in checkpoints[-self.keep_last :]}
        if self.keep_every:
            keep |= {c.tag for c in checkpoints if c.step % self.keep_every == 0}
        for checkpoint in checkpoints:
            if checkpoint.tag not in keep:
                shutil.rmtree(checkpoint.path, ignore_errors=True)
        for cached in (self.directory / UNIVERSAL).glob("*"):
            if cached.name not in keep:
                universal.forget(self.directory, cached.name)
        # leftovers of saves that never committed, once a newer checkpoint is durable
        newest = checkpoints[-1].step if checkpoints else -1
        for leftover in (self.directory / INCOMPLETE).glob("step_*"):
            step = int(leftover.name.split("-")[0].removeprefix("step_") or -1)
            if step <= newest:
                shutil.rmtree(leftover, ignore_errors=True)

    def leftover_bytes(self) -> int:
        """Disk held by unfinished saves and conversion caches (retention deletes them)."""
        folders = [self.directory / INCOMPLETE, self.directory / STAGING, self.directory / UNIVERSAL]
        return sum(f.stat().st_size for folder in folders if folder.is_dir() for f in folder.rglob("*") if f.is_file())

    # -- loading -------------------------------------------------------------------------
    def _universal(self, checkpoint: Committed) -> Path:
        """Collective: the checkpoint in DeepSpeed's universal format, converted once by rank 0."""
        rank, _ = world()
        if rank == 0 and universal.cached(self.directory, checkpoint.path, MANIFEST) is None:
            universal.convert(self.directory, checkpoint.path, MANIFEST)
        _barrier()
        return self.directory / UNIVERSAL / checkpoint.tag

    def _load_one(self, engine: Any, checkpoint: Committed, universal_load: bool) -> str | None:
        """Load `checkpoint` into `engine` on this rank; why it failed, or None."""
        try:
            if universal_load:
                folder = self._universal(checkpoint)
                with glob_safe(folder.parent) as directory:
                    path, _ = engine.load_checkpoint(str(directory), tag=folder.name)
                if path is not None and universal.complete_amsgrad_state(engine.optimizer):
                    log.warning(
                        "train.amsgrad: the universal checkpoint does not keep AMSGrad's running maximum of "
                        "the second moment; it restarts from the second moment at step %d",
                        checkpoint.step,
                    )
            else:
                with glob_safe(self.directory) as directory:
                    path, _ = engine.load_checkpoint(str(directory), tag=checkpoint.tag)
        except Exception as err:  # noqa: BLE001 - any way DeepSpeed fails makes this checkpoint unusable
            return f"{type(err).__name__}: {str(err)[:300]}"
        return None if path is not None else "DeepSpeed found nothing to load"

    def load(self, engine: Any, checkpoint: Committed, universal: bool) -> tuple[Committed, dict[str, Any]]:
        """Collective. Restore `checkpoint` into `engine` (and this rank's RNG); if DeepSpeed
        cannot load it on some rank, set it aside and fall back to the previous intact one.
        Returns the checkpoint loaded and its trainer state."""
        rank, size = world()
        while True:
            problems = [p for p in _gather(self._load_one(engine, checkpoint, universal)) if p]
            if not problems:
                break
            log.warning(
                "checkpoint %s verifies but does not load (%s): set aside, falling back to the previous one",
                checkpoint.path,
                problems[0],
            )
            _barrier()
            if rank == 0:
                self._set_aside(checkpoint.path, "unloadable")
            _barrier()
            previous = self.select(newest=checkpoint.step - 1)
            if previous is None:
                raise CheckpointError(
                    f"{checkpoint.path} cannot be loaded ({problems[0]}) and no earlier checkpoint can be either"
                )
            if (previous.manifest["world_size"] != size) != universal:
                raise CheckpointError(
                    f"{checkpoint.path} cannot be loaded ({problems[0]}); the previous one, "
                    f"{previous.path}, was written at another world size: start again from it"
                )
            checkpoint = previous
        rng_file = checkpoint.path / "rng" / f"rank{rank:05d}.pt"
        if size == checkpoint.manifest["world_size"] and rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=True))
        log.info("resumed from %s (step %d)", checkpoint.path, checkpoint.step)
        return checkpoint, checkpoint.manifest["state"]
