"""Servers the remote-shard tests and benchmarks start on loopback: a file server that honours
byte ranges (as nginx or an object store does), an S3-compatible server (moto), and a TCP proxy
in front of either that goes down, comes back, or cuts connections short."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import weakref
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class _RangeHandler(SimpleHTTPRequestHandler):
    """Python's file server plus `Range: bytes=a-b` (206) and PUT into the served folder."""

    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    disable_nagle_algorithm = True  # or headers and body wait on delayed ACKs: 40 ms a request
    counts: dict[str, int]

    def log_message(self, *args: Any) -> None:
        pass

    def send_head(self) -> Any:
        if self.counts.get("deny"):
            self.send_error(403)
            return None
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return None
        size = os.path.getsize(path)
        handle = open(path, "rb")  # noqa: SIM115 - the base class closes it after copyfile
        start, end = 0, size - 1
        match = _RANGE.fullmatch(self.headers.get("Range", "").strip())
        if match:
            start = int(match[1])
            end = min(int(match[2]), size - 1) if match[2] else size - 1
            if start >= size:
                handle.close()
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        handle.seek(start)
        self._remaining = end - start + 1
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(self._remaining))
        self.end_headers()
        self.counts["requests"] += 1
        return handle

    def copyfile(self, source: Any, outputfile: Any) -> None:
        while self._remaining > 0:
            chunk = source.read(min(1 << 16, self._remaining))
            if not chunk:
                break
            outputfile.write(chunk)
            self._remaining -= len(chunk)
            self.counts["bytes"] += len(chunk)

    def do_PUT(self) -> None:  # noqa: N802 - the handler's naming
        path = Path(self.translate_path(self.path))
        path.parent.mkdir(parents=True, exist_ok=True)
        length = int(self.headers.get("Content-Length", 0))
        with open(path, "wb") as out:
            out.write(self.rfile.read(length))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()


class FileServer:
    """A folder over HTTP on 127.0.0.1:`port`, counting the requests and body bytes it serves
    (`deny`: every request is refused with 403, as with wrong credentials)."""

    def __init__(self, directory: Path, port: int, deny: bool = False) -> None:
        self.counts = {"requests": 0, "bytes": 0, "deny": int(deny)}
        handler = type("Handler", (_RangeHandler,), {"counts": self.counts})
        self._server = ThreadingHTTPServer(("127.0.0.1", port), partial(handler, directory=str(directory)))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class S3Server:
    """moto's S3-compatible server on 127.0.0.1:`port`, in a process of its own (as a real store
    would not share the client's interpreter); AWS_* variables point boto3 at it."""

    def __init__(self, port: int) -> None:
        import subprocess
        import sys
        import time

        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{port}"
        weakref.finalize(self, self.process.kill)  # not left running by a script that crashes
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on port {port}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def s3_environment(endpoint: str) -> dict[str, str]:
    """What a process needs to reach the test S3 server (and nothing of the user's own AWS setup)."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


class FaultProxy:
    """A TCP proxy on 127.0.0.1:`port` to `upstream_port`. `down()` refuses connections until
    `up()`; `cut(n, after)` ends the next `n` connections after `after` bytes to the client;
    `stall(n, seconds)` answers nothing on the next `n` connections for that long (clients time out);
    `latency_s` holds each request that long before it goes on (a store's first-byte latency)."""

    def __init__(self, port: int, upstream_port: int) -> None:
        self.port, self.upstream_port = port, upstream_port
        self._cuts_left, self._cut_after = 0, 0
        self._stalls_left, self._stall_s = 0, 0.0
        self.cuts_made = 0  # connections ended early so far
        self.bytes_to_clients = 0
        self.latency_s = 0.0
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """New connections are refused and open ones end, as when the server stops."""
        if self._listener is not None:
            # shutdown first: close alone leaves a listener that a thread waits in accept() on
            # still taking connections
            _close(self._listener)
            self._listener.close()
            self._listener = None
        with self._lock:
            live, self._open = list(self._open), set()
        for sock in live:
            _close(sock)

    def cut(self, connections: int, after: int) -> None:
        """Close the open connections (clients must reconnect), then end the next `connections`
        connections that send the client more than `after` bytes, at that byte."""
        with self._lock:
            self._cuts_left, self._cut_after = connections, after
            live, self._open = list(self._open), set()
        for sock in live:
            _close(sock)

    def stall(self, connections: int, seconds: float) -> None:
        with self._lock:
            self._stalls_left, self._stall_s = connections, seconds
            live, self._open = list(self._open), set()
        for sock in live:
            _close(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._open.add(client)
                stall = self._stall_s if self._stalls_left else 0.0
                if stall:
                    self._stalls_left -= 1
                    self.cuts_made += 1
            threading.Thread(target=_pump, args=(client, upstream, None, 0.0, self._latency), daemon=True).start()
            threading.Thread(target=_pump, args=(upstream, client, self._take_cut, stall), daemon=True).start()

    def _latency(self) -> float:
        return self.latency_s

    def _take_cut(self, sent: int, passing: int) -> int | None:
        """Where a connection that has sent `sent` bytes (`passing` of them now) is to be cut, if it is."""
        with self._lock:
            self.bytes_to_clients += passing
            if self._cuts_left and sent > self._cut_after:
                self._cuts_left -= 1
                self.cuts_made += 1
                return self._cut_after
        return None


def _pump(
    source: socket.socket, target: socket.socket, take_cut: Any = None, stall: float = 0.0, delay: Any = None
) -> None:
    """Copy `source` to `target` until either closes, or `take_cut` says where to stop; a stalled
    connection forwards nothing for `stall` seconds, then ends; `delay()` seconds pass before each
    chunk goes on."""
    sent = 0
    if stall:
        time.sleep(stall)
        _close(source)
        _close(target)
        return
    try:
        while True:
            data = source.recv(1 << 16)
            if not data:
                break
            if delay is not None and (wait := delay()):
                time.sleep(wait)
            cut_at = take_cut(sent + len(data), len(data)) if take_cut else None
            if cut_at is not None:
                target.sendall(data[: max(0, cut_at - sent)])
                break
            target.sendall(data)
            sent += len(data)
    except OSError:
        pass
    _close(source)
    _close(target)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
