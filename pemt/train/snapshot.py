"""A checkpoint's files as DeepSpeed hands them over, copied to host memory, and the writer that
puts them on disk.

DeepSpeed builds each file's state dict (model states, every rank's optimizer shard) and hands it
to its checkpoint engine. `CapturingEngine` takes that place: it keeps the state dicts instead of
writing them, copying every tensor to host memory first when the write is to happen later (the
training step that follows would change the live tensors). `write_files` then writes them:
torch.save around the page cache (`direct_file`), hashed on a second thread as it writes, fsync,
and a part file per rank (`.parts/rankNNNNN.json`) listing what the rank wrote, or why it could
not. Errors are recorded,
never raised inside DeepSpeed's save, so a rank whose disk is full does not leave the others
waiting in DeepSpeed's barrier. A background writer runs at a lower CPU priority than training.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine

from pemt.integrity import write_atomic
from pemt.train.direct_file import DirectFile, block_buffer

PARTS = ".parts"
# Writes at least this large are hashed on a helper thread while they go to the file (both release
# the GIL): the checksum then costs no time beside the write. Smaller ones are hashed in line.
HASH_ALONGSIDE_BYTES = 1 << 20
# How much less CPU priority (nice) the background writer takes than training: its work is copying
# into the page cache and waiting on the disk, which can wait; the steps (and data decoding) cannot.
WRITER_NICENESS = 10


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tensor_bytes(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


class HostCopy:
    """Copies of state dicts in host memory, into buffers kept across saves (pinned on GPUs): a
    checkpoint's shapes do not change, and filling memory already mapped (and pinned) is several
    times faster than allocating it at every save. At most one save is in flight, and the next
    copy waits for it, so a buffer is never refilled while it is being written."""

    def __init__(self) -> None:
        self._kept: dict[tuple[Any, ...], torch.Tensor] = {}

    @property
    def kept_bytes(self) -> int:
        return tensor_bytes(list(self._kept.values()))

    def __call__(self, tree: Any, key: tuple[Any, ...] = ()) -> Any:
        """A copy of `tree`; `key` names where it lies (a file, then the path within it), so no
        two tensors of one save share a buffer."""
        if isinstance(tree, torch.Tensor):
            slot = (*key, tuple(tree.shape), tree.dtype)
            buffer = self._kept.get(slot)
            if buffer is None:
                buffer = self._kept[slot] = torch.empty(tree.shape, dtype=tree.dtype, pin_memory=tree.is_cuda)
            return buffer.copy_(tree.detach(), non_blocking=tree.is_cuda)
        if isinstance(tree, dict):
            out = {k: self(v, (*key, k)) for k, v in tree.items()}
            copied = type(tree)(out) if type(tree) in (dict, OrderedDict) else out
            if hasattr(tree, "_metadata"):  # a module state dict's versions
                copied._metadata = tree._metadata  # type: ignore[attr-defined]
            return copied
        if isinstance(tree, list):
            return [self(v, (*key, i)) for i, v in enumerate(tree)]
        if isinstance(tree, tuple):
            return tuple(self(v, (*key, i)) for i, v in enumerate(tree))
        return tree

    @staticmethod
    def settle() -> None:
        """Wait for copies in flight from the GPU."""
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()


class CapturingEngine(CheckpointEngine):  # type: ignore[misc]  # DeepSpeed ships no types
    """DeepSpeed's checkpoint engine, keeping each file's state dict for pemt's writer."""

    def __init__(self) -> None:
        super().__init__(None)
        self.name = "pemt"
        self.files: list[tuple[Path, Any]] = []
        self.copy: HostCopy | None = None  # set while a save is captured for a later write

    def create(self, info: CheckpointCommitInfo) -> None:
        self.files = []

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        copied = self.copy(state_dict, (Path(path).name,)) if self.copy is not None else state_dict
        self.files.append((Path(path), copied))

    def load(self, path: str, map_location: Any = None) -> Any:
        return torch.load(path, map_location=map_location, weights_only=False)

    def commit(self, info: CheckpointCommitInfo) -> bool:
        return True

    def preserves_storage_sharing(self) -> bool:
        return False  # every tensor is copied (or written) on its own: no view drags a whole storage along

    def take(self) -> list[tuple[Path, Any]]:
        files, self.files = self.files, []
        return files


@dataclass
class WriteJob:
    """One rank's share of one checkpoint."""

    staging: Path
    rank: int
    files: list[tuple[Path, Any]] = field(default_factory=list)
    direct_io: bool = True  # around the page cache (`direct_file`)

    @property
    def part(self) -> Path:
        return self.staging / PARTS / f"rank{self.rank:05d}.json"


def yield_cpu_to_training() -> None:
    """Lower the calling thread's CPU priority by WRITER_NICENESS (Linux, where nice is per
    thread; threads it starts inherit it). Elsewhere, or where it is refused, nothing changes."""
    if sys.platform != "linux":
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + WRITER_NICENESS))
    except OSError:
        pass


class _HashingWriter:
    """A file that hashes what is written to it: no second pass over the file, and large writes are
    hashed on `helper` at the same time as they are written (the data is only valid during the call:
    torch hands over views of its own buffers, so each hash is finished before `write` returns)."""

    def __init__(self, handle: Any, helper: ThreadPoolExecutor) -> None:
        self.handle = handle
        self.helper = helper
        self.digest = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> int:
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if size < HASH_ALONGSIDE_BYTES:
            self.digest.update(data)
            return int(self.handle.write(data))
        hashed = self.helper.submit(self.digest.update, data)
        try:
            return int(self.handle.write(data))
        finally:
            hashed.result()

    def flush(self) -> None:
        self.handle.flush()


def write_files(job: WriteJob) -> dict[str, Any]:
    """Write, fsync and hash the job's files; record the rank's part (file facts, or the error)."""
    from torch.utils.serialization import config

    written: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pemt-checkpoint-hash")
    buffer = block_buffer()
    try:
        for path, state in job.files:
            path.parent.mkdir(parents=True, exist_ok=True)
            # torch's zip format: DeepSpeed's consolidation (zero_to_fp32, export) memory-maps
            # optimizer shards, which only that format allows (the legacy one writes ~1.4x faster).
            # Without its per-record CRC32: the manifest's sha256 of the whole file checks it.
            no_crc = config.patch({"save.compute_crc32": False})  # type: ignore[attr-defined]  # added at import
            with DirectFile(path, buffer, job.direct_io) as handle, no_crc:
                writer = _HashingWriter(handle, helper)
                torch.save(state, cast(IO[bytes], writer))
                handle.finish()
            written[str(path.relative_to(job.staging))] = {
                "bytes": path.stat().st_size,
                "sha256": writer.digest.hexdigest(),
            }
        for folder in {path.parent for path, _ in job.files} | {job.staging}:
            fsync_dir(folder)
        part = {"rank": job.rank, "files": written, "write_s": time.perf_counter() - started}
    except (OSError, RuntimeError, ValueError) as err:  # a full disk, a vanished mount: this save fails
        part = {"rank": job.rank, "error": f"{type(err).__name__}: {err}"}
    finally:
        helper.shutdown()
        buffer.close()
    job.files = []  # on disk: nothing here holds the state any longer (the host copy keeps its buffers)
    try:
        job.part.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(job.part, json.dumps(part))
    except OSError as err:
        part = {"rank": job.rank, "error": f"cannot record the part: {err}"}
    return part
