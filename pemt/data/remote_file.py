"""Remote objects as files: byte ranges read in blocks, kept per process, and read ahead.

A decoder reads a member through a seekable file (`open_remote`); each read at a new place is a
ranged request (pemt.data.storage) of a whole block, and the blocks a process read last are kept
(`_Blocks`), because PyAV seeks to a video's index, back to its start, and opens it again for the
sound. `read_ahead` asks for blocks in background threads before the decoder needs them, so the
requests of a batch's samples overlap each other and the decoding before them: a store's latency
(tens of ms a request for S3) is paid once a batch, not once a request.
"""

from __future__ import annotations

import io
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, BinaryIO

from pemt.data.storage import Retry, object_size, read_range

BLOCK = 1 << 20
# Requests a process keeps in flight ahead of its decoder
READ_AHEAD_THREADS = 4
Key = tuple[str, int, int, int]  # url, the range's offset, block size, block index


class _Blocks:
    """The blocks this process read last, and those being read ahead. Bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._blocks: OrderedDict[Key, bytes] = OrderedDict()
        self._pending: dict[Key, Future[bytes]] = {}
        self._lock = threading.Lock()

    def get(self, key: Key) -> bytes | None:
        """The block if it is here; if it is being read ahead, once that read ends (its error if it
        failed: its retries are spent, and a second round would double the wait)."""
        with self._lock:
            data = self._blocks.get(key)
            if data is not None:
                self._blocks.move_to_end(key)
                return data
            pending = self._pending.get(key)
        return None if pending is None else pending.result()

    def claim(self, key: Key) -> Future[bytes] | None:
        """A future for a block to read ahead, or None if it is here or on its way already."""
        with self._lock:
            if key in self._blocks or key in self._pending:
                return None
            pending: Future[bytes] = Future()
            self._pending[key] = pending
            return pending

    def put(self, key: Key, data: bytes) -> None:
        with self._lock:
            self._pending.pop(key, None)
            if key in self._blocks:
                return
            self._blocks[key] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes and len(self._blocks) > 1:
                _, dropped = self._blocks.popitem(last=False)
                self.bytes -= len(dropped)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def forget_pending(self) -> None:
        """In a forked child: reads in flight in the parent never finish here."""
        self._pending, self._lock = {}, threading.Lock()

    def drop_pending(self, key: Key) -> None:
        with self._lock:
            self._pending.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self.bytes = 0


_BLOCKS = _Blocks(max_bytes=32 << 20)


def forget_reads() -> None:
    """Drop the blocks this process keeps: the next reads go to the server."""
    _BLOCKS.clear()


def reads_in_flight() -> int:
    """Blocks being read ahead now."""
    return _BLOCKS.pending()


def _read_block(url: str, retry: Retry, offset: int, size: int, block: int, index: int) -> bytes:
    start = offset + index * block
    return read_range(url, start, min(start + block, offset + size), retry)


class _Readers:
    """Daemon threads that read blocks ahead: a worker that exits never waits on a slow store."""

    def __init__(self, threads: int) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._threads = threads
        self._started = False
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if not self._started:
                for _ in range(self._threads):
                    threading.Thread(target=self._run, daemon=True, name="pemt-read-ahead").start()
                self._started = True
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            self._jobs.get()()

    def forget(self) -> None:
        """In a forked child: the parent's threads and queued reads are not there."""
        self._jobs, self._started, self._lock = queue.SimpleQueue(), False, threading.Lock()


_READERS = _Readers(READ_AHEAD_THREADS)


def _after_fork() -> None:
    _READERS.forget()
    _BLOCKS.forget_pending()


os.register_at_fork(after_in_child=_after_fork)


def read_ahead(url: str, retry: Retry, offset: int, size: int, whole: bool, block: int = BLOCK) -> None:
    """Start reading bytes [offset, offset + size) of `url` in the background, in the blocks a
    `RemoteFile` of that range will ask for: all of them, or (`whole=False`) the first and the last,
    where a container keeps its index. Returns at once; failures are left to the reader."""
    last = max(0, size - 1) // block
    for index in range(last + 1) if whole else sorted({0, last}):
        key = (url, offset, block, index)
        pending = _BLOCKS.claim(key)
        if pending is None:
            continue

        def job(key: Key = key, pending: Future[bytes] = pending, index: int = index) -> None:
            try:
                data = _read_block(url, retry, offset, size, block, index)
            except Exception as err:  # noqa: BLE001 - the reader that waits on it gets it, as its own read would
                _BLOCKS.drop_pending(key)
                pending.set_exception(err)
                return
            _BLOCKS.put(key, data)
            pending.set_result(data)

        _READERS.submit(job)


class ByteRange(io.RawIOBase):
    """Bytes [offset, offset + size) of something, as a seekable, read-only file; subclasses say
    how a read at the current position is served (`readinto`)."""

    def __init__(self, offset: int, size: int) -> None:
        super().__init__()
        self._offset, self._size, self._position = offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position


class RemoteFile(ByteRange):
    """Bytes [offset, offset + size) of a remote object, read in `block`-byte ranged requests that
    are kept for a while (see _Blocks)."""

    def __init__(self, url: str, retry: Retry, offset: int = 0, size: int | None = None, block: int = BLOCK) -> None:
        super().__init__(offset, size if size is not None else object_size(url, retry) - offset)
        self.url, self.retry, self._block = url, retry, block

    def readinto(self, buffer: Any) -> int:
        if self._position >= self._size:
            return 0
        index, within = divmod(self._position, self._block)
        key = (self.url, self._offset, self._block, index)
        data = _BLOCKS.get(key)
        if data is None:
            data = _read_block(self.url, self.retry, self._offset, self._size, self._block, index)
            _BLOCKS.put(key, data)
        count = min(len(buffer), len(data) - within)
        if count <= 0:
            return 0
        buffer[:count] = data[within : within + count]
        self._position += count
        return count


def open_remote(url: str, retry: Retry, offset: int = 0, size: int | None = None, block: int = BLOCK) -> BinaryIO:
    """Bytes [offset, offset + size) of a remote object as a buffered file, read `block` bytes a request."""
    return io.BufferedReader(RemoteFile(url, retry, offset, size, block), buffer_size=min(block, 1 << 16))
