"""Checkpoint files written around the page cache: the same bytes as a plain write, whatever the
sizes of the pieces, and a filesystem that refuses O_DIRECT still gets the file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pemt.train import direct_file
from pemt.train.direct_file import BLOCK_BYTES, DirectFile, block_buffer

# pieces below, at and across the block size and the alignment, ending off any alignment
PIECES = [1, 4095, 4096, 5000, BLOCK_BYTES - 3, BLOCK_BYTES, 2 * BLOCK_BYTES + 17, 12, 3]


def write_pieces(path: Path, buffer: object = None, direct: bool = True) -> tuple[bytes, DirectFile]:
    expected = bytearray()
    with DirectFile(path, buffer, direct) as handle:  # type: ignore[arg-type]
        for i, size in enumerate(PIECES):
            piece = bytes([i + 1]) * size
            assert handle.write(memoryview(piece)) == size
            expected += piece
        handle.finish()
    return bytes(expected), handle


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "train.checkpoint_direct_io=false"])
def test_the_file_holds_exactly_what_was_written(tmp_path: Path, direct: bool) -> None:
    buffer = block_buffer()
    expected, handle = write_pieces(tmp_path / "a.pt", buffer, direct)
    assert handle.direct == direct, "this machine's disk takes O_DIRECT"
    assert (tmp_path / "a.pt").read_bytes() == expected  # padding of the last block cut off
    # the buffer is reused for the next file, which starts clean
    again, _ = write_pieces(tmp_path / "b.pt", buffer, direct)
    assert (tmp_path / "b.pt").read_bytes() == again
    buffer.close()  # no view of it is left behind


def test_a_filesystem_refusing_direct_io_at_open_gets_a_buffered_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def refusing_open(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_file.os, "open", refusing_open)
    expected, handle = write_pieces(tmp_path / "a.pt")
    assert not handle.direct
    assert (tmp_path / "a.pt").read_bytes() == expected


def test_a_filesystem_refusing_direct_writes_goes_on_buffered_at_the_same_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    calls = []

    def refusing_second_direct_write(fd: int, data: memoryview) -> int:
        calls.append(len(data))
        if len(calls) == 2 and direct_file.fcntl.fcntl(fd, direct_file.fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(direct_file.os, "write", refusing_second_direct_write)
    expected, handle = write_pieces(tmp_path / "a.pt")
    assert not handle.direct and len(calls) > 2
    assert (tmp_path / "a.pt").read_bytes() == expected


def test_a_full_disk_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_file.os, "write", full)
    with pytest.raises(OSError, match="No space"):
        write_pieces(tmp_path / "a.pt")
