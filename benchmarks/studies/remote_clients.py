"""Which client reads remote shards: ranged reads through each candidate, side by side.

    python benchmarks/remote_clients.py [--requests 300 --kib 64]

A shard folder is served on loopback (HTTP with byte ranges, and moto's S3-compatible server), and
each client reads `--requests` ranges of `--kib` KiB at random offsets of one shard, as a decode's
reads are: wall time and client CPU time per request, against pemt's own reader measured in the
same run. Candidates: pemt.data.storage (urllib3 / boto3, what the loader uses), requests, urllib3 alone,
fsspec's HTTP filesystem (aiohttp), `curl` per request (what WebDataset's pipe: URLs do), and for
S3 boto3 through pemt against boto3's get_object alone.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the loopback servers the tests use

from servers import S3Server, s3_environment  # noqa: E402

SERVE = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from servers import FileServer
FileServer(Path(sys.argv[2]), int(sys.argv[3]))
while True:
    time.sleep(3600)
"""


def _wait_for(port: int) -> None:
    import socket

    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"no server on port {port}")


from conftest import free_port  # noqa: E402


def _measure(read: Callable[[int, int], bytes], offsets: list[int], size: int) -> tuple[float, float]:
    """(wall ms, client CPU ms) per ranged read."""
    read(0, size)  # connection made, imports done
    wall, cpu = time.perf_counter(), time.process_time()
    for offset in offsets:
        got = len(read(offset, offset + size))
        assert got == size, (got, size)
    n = len(offsets)
    return (time.perf_counter() - wall) / n * 1e3, (time.process_time() - cpu) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--kib", type=int, default=64)
    args = parser.parse_args()
    port = free_port(2)
    os.environ.update(s3_environment(f"http://127.0.0.1:{port + 1}"))

    from pemt.data.storage import Retry, read_range, upload

    work = Path(tempfile.mkdtemp(prefix="pemt-clients-"))
    blob = work / "shard.tar"
    blob.write_bytes(os.urandom(32 << 20))
    size = args.kib << 10
    draw = random.Random(0)
    offsets = [draw.randrange(0, (32 << 20) - size) for _ in range(args.requests)]
    # the file server in a process of its own, so that process_time() here is the client's alone
    http = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(REPO / "tests"), str(work), str(port)],
        stdout=subprocess.DEVNULL,
    )
    _wait_for(port)
    s3 = S3Server(port + 1)
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    upload(blob, "s3://bench/shard.tar")
    url, retry = f"http://127.0.0.1:{port}/shard.tar", Retry()

    import fsspec
    import requests
    import urllib3

    pool = urllib3.PoolManager()
    session = requests.Session()
    fs = fsspec.filesystem("http")

    def curl(start: int, end: int) -> bytes:
        return subprocess.run(["curl", "-s", "-r", f"{start}-{end - 1}", url], capture_output=True, check=True).stdout

    client = boto3.client("s3")
    candidates: list[tuple[str, Callable[[int, int], bytes]]] = [
        ("pemt HTTP (urllib3 pool, keep-alive)", lambda a, b: read_range(url, a, b, retry)),
        (
            "requests Session",
            lambda a, b: session.get(url, headers={"Range": f"bytes={a}-{b - 1}"}).content,
        ),
        (
            "urllib3 alone",
            lambda a, b: pool.request("GET", url, headers={"Range": f"bytes={a}-{b - 1}"}).data,
        ),
        ("fsspec http (aiohttp)", lambda a, b: fs.cat_file(url, start=a, end=b)),
        ("curl per request (WebDataset pipe:)", curl),
        ("pemt S3 (boto3, signed)", lambda a, b: read_range("s3://bench/shard.tar", a, b, retry)),
        (
            "boto3 get_object alone",
            lambda a, b: client.get_object(Bucket="bench", Key="shard.tar", Range=f"bytes={a}-{b - 1}")["Body"].read(),
        ),
    ]
    rows = []
    for name, read in candidates:
        reads = offsets if "curl" not in name else offsets[: max(20, len(offsets) // 10)]
        rows.append((name, *_measure(read, reads, size)))
    http.terminate()
    http.wait()
    s3.stop()

    first_s3 = next(i for i, row in enumerate(rows) if "S3" in row[0])
    base = {"HTTP": rows[0], "S3": rows[first_s3]}
    lines = [
        "| client | server | wall ms per read | client CPU ms per read | wall vs pemt |",
        "|---|---|---|---|---|",
    ]
    for i, (name, wall, cpu) in enumerate(rows):
        server = "S3 (moto)" if i >= first_s3 else "HTTP"
        ref = base["S3" if i >= first_s3 else "HTTP"]
        lines.append(f"| {name} | {server} | {wall:.2f} | {cpu:.2f} | {wall / ref[1]:.2f}x |")
    setting = (
        f"{datetime.date.today()}, CPU, loopback, {args.requests} reads of {args.kib} KiB at random offsets "
        "of a 32 MiB object (curl: a tenth of them)"
    )
    table = "\n".join(lines)
    print(f"{setting}\n\n{table}")
    (RESULTS / "remote_clients.md").write_text(f"# Remote shard clients\n\n{setting}\n\n{table}\n")


if __name__ == "__main__":
    main()
