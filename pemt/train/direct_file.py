"""A new file written around the page cache (O_DIRECT), for checkpoint files.

A buffered write first copies the bytes into the page cache, and a checkpoint's files are new
and kept (retention deletes the old ones only after the new one is durable), so every save makes
the kernel find fresh pages for all of them: measured on a VM disk, buffered writes of files that
are kept ran at ~0.37 GB/s (dd included) where O_DIRECT writes of 4 MiB ran at 2-3 GB/s. It also
leaves the page cache to the data loader. Bytes go through one page-aligned buffer in blocks of
`BLOCK_BYTES`; the last block is padded to the alignment and the file truncated to its true
size. Where a filesystem refuses O_DIRECT (EINVAL at open or at a write), the file is written
buffered instead: the same bytes, only slower.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from pathlib import Path
from types import TracebackType

# Alignment O_DIRECT asks of offsets, lengths and buffers on common filesystems (4 KiB sectors).
ALIGNMENT = 4096
# One write to the disk: large enough to reach its sequential speed (of 4, 16 and 64 MiB, 4 was
# the fastest measured here: 2.6-3.0 GB/s against 1.4-2.2 for 64).
BLOCK_BYTES = 4 << 20
_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere every file is written buffered


class DirectFile:
    """Write-only file of `path`: `write` any bytes, then `finish` (fsynced); closing without
    `finish` (an error mid-write) leaves a partial file behind that nothing has vouched for.
    `direct=False` writes through the page cache (for filesystems where O_DIRECT is slow)."""

    def __init__(self, path: Path, buffer: mmap.mmap | None = None, direct: bool = True) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = direct and bool(_DIRECT)
        try:
            self._fd = os.open(path, flags | (_DIRECT if self.direct else 0))
        except OSError as err:
            if err.errno != errno.EINVAL or not self.direct:
                raise
            self._fd = os.open(path, flags)
            self.direct = False
        self._buffer = buffer if buffer is not None else block_buffer()
        self._view = memoryview(self._buffer)
        self._filled = 0
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        source = memoryview(data).cast("B")
        taken = 0
        while taken < len(source):
            room = min(BLOCK_BYTES - self._filled, len(source) - taken)
            self._view[self._filled : self._filled + room] = source[taken : taken + room]
            self._filled += room
            taken += room
            if self._filled == BLOCK_BYTES:
                self._drain(BLOCK_BYTES)
        self.size += taken
        return taken

    def flush(self) -> None:
        """Nothing: bytes short of a block wait in the buffer for `finish`."""

    def finish(self) -> None:
        """Write what is left, cut the padding off, fsync."""
        if self._filled:
            self._drain(self._filled + (-self._filled % ALIGNMENT) if self.direct else self._filled)
        os.ftruncate(self._fd, self.size)
        os.fsync(self._fd)

    def _drain(self, length: int) -> None:
        done = 0
        while done < length:
            try:
                done += os.write(self._fd, self._view[done:length])
            except OSError as err:
                if err.errno != errno.EINVAL or not self.direct:
                    raise
                # this filesystem takes O_DIRECT at open but not these writes: go on buffered,
                # at the same offset (a direct write that fails writes nothing)
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_DIRECT)
                self.direct = False
                length = self._filled
        self._filled = 0

    def close(self) -> None:
        self._view.release()  # the buffer outlives this file; a view left on it would pin it
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def block_buffer() -> mmap.mmap:
    """A page-aligned buffer of one block (anonymous maps start on a page), to reuse across files."""
    return mmap.mmap(-1, BLOCK_BYTES)
