"""Shard members read where they lie, not loaded: a tar's index from its headers, and each
member opened as a window onto the tar file.

WebDataset streams a tar by reading every byte of every member into memory. A data worker
decodes only every N-th step and a decode reads only the part of a video its window needs, so
for local shards the stream reads the tar's headers (seeking past the data: 512 bytes a member),
keeps where each member lies, and a decode opens just its own members. What a worker holds
for a shard is its index, never its videos. Members are grouped into samples by WebDataset's
own rule (`group_by_keys`), so keys and suffixes are the same as in a streamed read. A remote
tar (pemt.data.storage) is read the same way, each read a ranged request; where pemt uploaded it,
its index lies beside it (`shard_index`), and one request replaces the walk over its headers.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from pemt.data.remote_file import ByteRange, open_remote, read_ahead
from pemt.data.storage import Retry, StorageError, Unreachable, is_remote, object_size, read_bytes

# Bytes a ranged request of a remote tar's index reads: a header and the small members after it
# (metadata, sound), without pulling in the start of the video that follows
INDEX_READ = 1 << 13
# Members of a remote tar up to this size are kept as bytes while indexing, not read again later
INLINE_MEMBER = 1 << 12
# A remote tar's index beside it (`shard-000001.tar.index.json`, written by pemt's upload): one
# request instead of one per member header
INDEX_SUFFIX = ".index.json"
# Bytes of whole members read ahead for one batch: two batches' worth stay within the block cache
READ_AHEAD_BYTES = 12 << 20


def _samples(members: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Members grouped into samples by webdataset's own rule (imported here: it imports torch,
    which the commands that only pack or look at shards do not need)."""
    from webdataset.tariterators import group_by_keys

    yield from group_by_keys(iter(members))


@dataclass(frozen=True)
class Member:
    """One file inside a tar shard: where its bytes lie."""

    path: str
    offset: int
    size: int
    retry: Retry | None = None  # how a remote shard's reads are retried

    def open(self) -> BinaryIO:
        """A seekable, read-only file of the member's bytes (nothing is read until asked)."""
        if is_remote(self.path):
            return open_remote(self.path, self.retry or Retry(), self.offset, self.size)
        return io.BufferedReader(_Window(self.path, self.offset, self.size), buffer_size=1 << 16)

    def read(self) -> bytes:
        with self.open() as handle:
            return handle.read()

    def read_ahead(self, whole: bool) -> None:
        """A remote member: start fetching it (or its ends, where a container keeps its index)."""
        if is_remote(self.path):
            read_ahead(self.path, self.retry or Retry(), self.offset, self.size, whole)


class _Window(ByteRange):
    """Bytes [offset, offset + size) of a local file, as a file of their own."""

    def __init__(self, path: str, offset: int, size: int) -> None:
        super().__init__(offset, size)
        self._fd = os.open(path, os.O_RDONLY)

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), self._size - self._position)
        if wanted <= 0:
            return 0
        data = os.pread(self._fd, wanted, self._offset + self._position)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def read_ahead_samples(samples: list[dict[str, Any]], budget: int = READ_AHEAD_BYTES) -> None:
    """Start fetching the remote members of `samples` in the background, whole while `budget`
    bytes last (the process keeps 32 MiB of blocks: what is read ahead must still be there when
    its decode comes), then only their ends."""
    for sample in samples:
        for value in sample.values():
            if isinstance(value, Member):
                whole = value.size <= budget
                budget -= value.size if whole else 0
                value.read_ahead(whole)


def member_size(value: bytes | Member) -> int:
    return value.size if isinstance(value, Member) else len(value)


def member_bytes(value: bytes | Member) -> bytes:
    return value.read() if isinstance(value, Member) else value


def member_source(value: bytes | Member) -> BinaryIO:
    """A file of the member's bytes for a decoder to open: the member's window onto the shard,
    or the bytes already in memory."""
    return value.open() if isinstance(value, Member) else io.BytesIO(value)


def can_index(url: str) -> bool:
    """An uncompressed tar, local or remote: its members can be read where they lie."""
    if is_remote(url):
        return url.endswith(".tar")
    if not os.path.isfile(url):
        return False
    try:
        with open(url, "rb") as handle:
            header = handle.read(tarfile.BLOCKSIZE)
        tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
    except (OSError, tarfile.HeaderError):
        return False
    return True


def shard_index(path: str | os.PathLike[str]) -> bytes:
    """A local tar's index, to keep beside its remote copy: where each member lies, and the bytes
    of the small ones (metadata), as the header walk of a remote tar would have kept them."""
    members = []
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isreg():
                continue
            entry: dict[str, Any] = {"name": info.name, "offset": info.offset_data, "size": info.size}
            handle = tar.extractfile(info) if info.size <= INLINE_MEMBER else None
            if handle is not None:
                entry["data"] = base64.b64encode(handle.read()).decode()
            members.append(entry)
    return json.dumps({"bytes": os.path.getsize(path), "members": members}).encode()


def _indexed_remotely(url: str, size: int, retry: Retry | None) -> list[dict[str, Any]] | None:
    """A remote tar's members from the index beside it; None where there is none, or one that does
    not describe this tar (another size: the tar was replaced), so its headers are read instead."""
    try:
        index = json.loads(read_bytes(url + INDEX_SUFFIX, retry))
        if index["bytes"] != size:
            return None
        return [
            {
                "fname": entry["name"],
                "data": base64.b64decode(entry["data"])
                if "data" in entry
                else Member(url, int(entry["offset"]), int(entry["size"]), retry),
                "__url__": url,
            }
            for entry in index["members"]
        ]
    except Unreachable:  # every attempt spent: the tar cannot be read now either
        raise
    except StorageError:  # none (S3 says "denied" for a missing key to those who may not list the bucket)
        return None
    except (ValueError, KeyError, TypeError):  # not an index pemt wrote: the headers say it
        return None


def indexed_samples(url: str, retry: Retry | None = None, size: int | None = None) -> Iterator[dict[str, Any]]:
    """The samples of a tar in order, each a dict of suffix -> Member plus `__key__` and
    `__url__`. A tar that ends early (cut mid-member, a header whose size runs past the end of
    the file) raises tarfile.ReadError after its last complete sample; a remote one that cannot
    be read raises pemt.data.storage.StorageError. `size`: a remote tar's bytes as its manifest
    says: with the tar's index beside it, one request reads the shard's index."""
    if not is_remote(url):
        size = object_size(url, retry)
    else:
        measured = size is None
        size = object_size(url, retry) if size is None else size
        listed = _indexed_remotely(url, size, retry)
        if listed is not None:
            yield from _samples(listed)
            return
        if not measured:  # the manifest's word; the header walk ends where the tar really does
            size = object_size(url, retry)
    members: list[dict[str, Any]] = []
    failure: Exception | None = None
    info = None
    source = open_remote(url, retry or Retry(), size=size, block=INDEX_READ) if is_remote(url) else None
    with contextlib.closing(source or io.BytesIO()), tarfile.open(url if source is None else None, "r:", source) as tar:
        try:
            while (info := tar.next()) is not None:
                if not info.isreg():
                    continue
                data: bytes | Member = Member(url, info.offset_data, info.size, retry)
                handle = tar.extractfile(info) if source is not None and info.size <= INLINE_MEMBER else None
                if handle is not None:  # a remote tar's metadata: its bytes are in the index read already
                    data = handle.read()
                members.append({"fname": info.name, "data": data, "__url__": url})
        except (tarfile.TarError, MemoryError, OverflowError, ValueError, OSError) as err:
            # a header that lies (a size past the end, a terabyte of extended header), or a remote
            # tar that stayed unreachable: the tar ends here
            failure = tarfile.ReadError(f"{type(err).__name__} after {info.name if info else 'the start'}: {err}")
    last = members[-1]["data"] if members else None
    if failure is None and isinstance(last, Member) and last.offset + last.size > size:
        failure = tarfile.ReadError(f"unexpected end of data in {members[-1]['fname']}")
    samples = list(_samples(members))
    if failure is not None:
        # the last sample holds the member the tar was cut in: it is not whole
        samples = samples[:-1]
    yield from samples
    if failure is not None:
        raise failure
