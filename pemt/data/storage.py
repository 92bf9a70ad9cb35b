"""Where shards lie: a local folder, an `http(s)://` prefix or an `s3://bucket/prefix`.

Remote objects are read by byte range (a tar's headers, one member, the part of a video a decode
seeks to), so a worker reads what it decodes and nothing else, exactly as from a local disk. Each
read is retried with exponential backoff on what passes (connection reset or refused, timeouts,
5xx, throttling, a body cut short) and fails at once on what does not (missing, denied, no range
support). S3 takes its endpoint, region and credentials where the AWS tools do (AWS_* environment
variables, ~/.aws/config; AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for an S3-compatible store);
HTTP takes a user and password from ~/.netrc. A location never carries credentials itself: it is
written to configs, params and run dirs.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REMOTE_SCHEMES = ("http", "https", "s3")


class StorageError(OSError):
    """A remote object that cannot be read or written; the message names its URL."""


class TransientError(StorageError):
    """A failure that may pass: the read is tried again."""


class NotFound(StorageError):
    """No object at the URL (the bucket or server exists)."""


class Unreachable(StorageError):
    """A failure that may pass, still there after every attempt."""


@dataclass(frozen=True)
class Retry:
    """How often and how patiently a remote read is tried before it fails."""

    attempts: int = 8
    backoff_s: float = 1.0  # the first wait; it doubles, up to max_backoff_s
    max_backoff_s: float = 60.0
    timeout_s: float = 60.0  # connect and read, per request

    def waits(self) -> list[float]:
        return [min(self.backoff_s * 2**i, self.max_backoff_s) for i in range(self.attempts - 1)]


def retry_from_config(data_cfg: Any) -> Retry:
    """The retries `data.remote` asks for (checked by pemt.data.loader.check_data)."""
    remote = data_cfg.get("remote")
    if not remote:
        return Retry()
    return Retry(int(remote.attempts), float(remote.backoff_s), timeout_s=float(remote.timeout_s))


def is_remote(location: str | Path) -> bool:
    return urlsplit(str(location)).scheme in REMOTE_SCHEMES


def join(location: str | Path, name: str) -> str:
    """The object `name` inside a folder or prefix."""
    if is_remote(location):
        return f"{str(location).rstrip('/')}/{name}"
    return str(Path(location) / name)


def check_location(location: str, key: str) -> None:
    """A remote location a config may hold: a known scheme, a host or bucket, no credentials."""
    parts = urlsplit(location)
    if parts.scheme not in REMOTE_SCHEMES:
        return
    if not parts.hostname:
        raise ValueError(f"{key}={location}: no host or bucket")
    if "@" in parts.netloc or parts.query:
        where = "~/.netrc" if parts.scheme != "s3" else "AWS_* variables or ~/.aws"
        raise ValueError(
            f"{key}: a shard location must not carry credentials or a query (it is written to configs, "
            f"MLflow and the run dir); put them in {where}"
        )


def _transient_status(status: int) -> bool:
    return status == 429 or status >= 500


_local = threading.local()


def _http_pool() -> Any:
    """One keep-alive connection pool per process and thread (range reads reuse connections).
    urllib3 directly: requests costs ~1 ms of CPU more per read (benchmarks/remote_clients.py)."""
    import urllib3

    pool = getattr(_local, "http", None)
    if pool is None or getattr(_local, "http_pid", None) != os.getpid():
        pool = urllib3.PoolManager(retries=False)
        _local.http, _local.http_pid = pool, os.getpid()
    return pool


@functools.lru_cache(maxsize=64)
def _netrc_auth(host: str) -> dict[str, str]:
    """The Authorization header ~/.netrc gives `host` (read once per process), or none."""
    import netrc

    import urllib3

    try:
        login = netrc.netrc().authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return {}
    return dict(urllib3.make_headers(basic_auth=f"{login[0]}:{login[2]}")) if login else {}


def _http_request(method: str, url: str, headers: dict[str, str], retry: Retry, body: Any = None) -> Any:
    """One request, with the user and password ~/.netrc holds for the host, if any."""
    import urllib3
    from urllib3.exceptions import HTTPError, LocationValueError, SSLError

    headers = {**headers, **_netrc_auth(urlsplit(url).hostname or "")}
    try:
        return _http_pool().request(
            method, url, headers=headers, body=body, timeout=urllib3.Timeout(retry.timeout_s), retries=False
        )
    except (LocationValueError, SSLError) as err:  # a bad URL, a certificate: trying again will not help
        raise StorageError(f"{url}: {type(err).__name__}: {err}") from None
    except HTTPError as err:  # refused, reset, timed out, a body cut short
        raise TransientError(f"{url}: {type(err).__name__}: {err}") from None


def _s3_client(timeout_s: float) -> Any:
    """One client per process, thread and timeout (a client's timeouts are fixed when it is made)."""
    if getattr(_local, "s3_pid", None) != os.getpid():
        _local.s3, _local.s3_pid = {}, os.getpid()
    client = _local.s3.get(timeout_s)
    if client is None:
        import boto3
        from botocore.config import Config

        # pemt retries (with the backoff it is configured with); botocore tries once
        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=timeout_s, read_timeout=timeout_s
        )
        client = _local.s3[timeout_s] = boto3.session.Session().client("s3", config=config)
    return client


def _bucket_key(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.netloc, parts.path.lstrip("/")


def _http_read(url: str, start: int, end: int | None, retry: Retry) -> tuple[bytes, int | None]:
    """Bytes [start, end) (to the end if None) and the object's size, if the server said it."""
    headers = {"Range": f"bytes={start}-{'' if end is None else end - 1}"}
    if start == 0 and end is None:
        headers = {}
    response = _http_request("GET", url, headers, retry)
    status = response.status
    if _transient_status(status):
        raise TransientError(f"{url}: HTTP {status}")
    if status == 416:  # nothing at or past `start`
        return b"", None
    if status == 404:
        raise NotFound(f"{url}: not found (HTTP 404)")
    if status in (401, 403):
        raise StorageError(f"{url}: access denied (HTTP {status}; credentials come from ~/.netrc)")
    if status not in (200, 206):
        raise StorageError(f"{url}: HTTP {status}")
    whole = start == 0 and (end is None or len(response.data) == end)  # a range that is the whole object
    if headers and status == 200 and not whole:
        raise StorageError(
            f"{url}: the server ignores byte ranges (HTTP Range), which pemt reads shard members by; "
            "serve the shards with one that honours them (nginx, Apache, any object store)"
        )
    size = None
    if "Content-Range" in response.headers:  # bytes a-b/size
        total = response.headers["Content-Range"].rpartition("/")[2]
        size = int(total) if total.isdigit() else None
    elif status == 200:
        size = len(response.data)
    return response.data, size


def _s3_read(url: str, start: int, end: int | None, retry: Retry) -> tuple[bytes, int | None]:
    bucket, key = _bucket_key(url)
    ranged = {"Range": f"bytes={start}-{'' if end is None else end - 1}"} if (start or end is not None) else {}
    try:
        response = _s3_client(retry.timeout_s).get_object(Bucket=bucket, Key=key, **ranged)
        data = response["Body"].read()
    except Exception as err:  # noqa: BLE001 - botocore's errors, sorted by _s3_failure
        if _s3_code(err) == "InvalidRange":  # nothing at or past `start`
            return b"", None
        raise _s3_failure(url, err) from None
    if len(data) != int(response.get("ContentLength", len(data))):
        raise TransientError(f"{url}: body cut short")
    size = None
    total = str(response.get("ContentRange", "")).rpartition("/")[2]
    if total.isdigit():
        size = int(total)
    elif not ranged:
        size = len(data)
    return data, size


def _s3_code(err: Exception) -> str:
    """A ClientError's code; "" for others (whose `response`, if any, is not S3's answer)."""
    response = getattr(err, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _s3_failure(url: str, err: Exception) -> StorageError:
    """What a botocore error means: connection refused or reset, timeouts, bodies cut short, 5xx
    and throttling pass; missing, denied, no credentials or region, bad parameters do not."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        IncompleteReadError,
        NoCredentialsError,
        NoRegionError,
    )

    if isinstance(err, NoCredentialsError):
        return StorageError(f"{url}: no AWS credentials (AWS_ACCESS_KEY_ID / ~/.aws/credentials)")
    if isinstance(err, NoRegionError):
        return StorageError(f"{url}: no AWS region (AWS_DEFAULT_REGION / ~/.aws/config)")
    if isinstance(err, ClientError):
        code = _s3_code(err)
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = f"{url}: {code or status}: {err.response.get('Error', {}).get('Message', '')}"
        passes = _transient_status(status) or code in ("SlowDown", "Throttling", "RequestTimeout", "InternalError")
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFound(message)
        return TransientError(message) if passes else StorageError(message)
    if isinstance(err, (ConnectionError, HTTPClientError, IncompleteReadError)):
        return TransientError(f"{url}: {type(err).__name__}: {err}")
    return StorageError(f"{url}: {type(err).__name__}: {err}")


def _read_once(url: str, start: int, end: int | None, retry: Retry) -> tuple[bytes, int | None]:
    reader = _s3_read if url.startswith("s3://") else _http_read
    return reader(url, start, end, retry)


def read_range(url: str, start: int = 0, end: int | None = None, retry: Retry | None = None) -> bytes:
    """Bytes [start, end) of an object (to its end if None), tried again on failures that pass."""
    return _read(url, start, end, retry or Retry())[0]


_retried = [0]  # reads of this process tried again


def retries_so_far() -> int:
    """How many remote reads this process has tried again (each failure that passed counts)."""
    return _retried[0]


def _read(url: str, start: int, end: int | None, retry: Retry) -> tuple[bytes, int | None]:
    if not is_remote(url):
        with open(url, "rb") as handle:
            handle.seek(start)
            data = handle.read() if end is None else handle.read(max(0, end - start))
        return data, os.path.getsize(url)
    for wait in [*retry.waits(), None]:
        try:
            data, size = _read_once(url, start, end, retry)
        except TransientError as err:
            if wait is None:
                raise Unreachable(f"{err} (after {retry.attempts} attempts)") from None
            _retried[0] += 1
            time.sleep(wait)
            continue
        if end is not None and len(data) < end - start and (size is None or start + len(data) < size):
            if wait is None:
                raise Unreachable(f"{url}: short read at byte {start} (after {retry.attempts} attempts)")
            _retried[0] += 1
            time.sleep(wait)
            continue
        return data, size
    raise AssertionError("unreachable")


def read_bytes(url: str, retry: Retry | None = None) -> bytes:
    """A whole object (a manifest), local or remote."""
    return read_range(url, 0, None, retry)


def object_size(url: str, retry: Retry | None = None) -> int:
    """An object's size in bytes; for a remote one, also proof that it serves byte ranges."""
    if not is_remote(url):
        return os.path.getsize(url)
    _, size = _read(url, 0, 1, retry or Retry())
    if size is None:
        raise StorageError(f"{url}: the server does not say the object's size (Content-Range)")
    return size


def upload(path: Path, url: str, retry: Retry | None = None) -> None:
    """Put a local file at `url` (S3, or HTTP PUT), tried again on failures that pass."""
    retry = retry or Retry()
    for wait in [*retry.waits(), None]:
        try:
            _upload_once(path, url, retry)
            return
        except TransientError as err:
            if wait is None:
                raise StorageError(f"{err} (after {retry.attempts} attempts)") from None
            time.sleep(wait)


def _upload_once(path: Path, url: str, retry: Retry) -> None:
    if url.startswith("s3://"):
        bucket, key = _bucket_key(url)
        with open(path, "rb") as handle:
            try:  # one request: a shard is far below S3's 5 GB limit for it
                _s3_client(retry.timeout_s).put_object(Bucket=bucket, Key=key, Body=handle)
            except Exception as err:  # noqa: BLE001 - botocore's errors, sorted by _s3_failure
                raise _s3_failure(url, err) from None
        return
    with open(path, "rb") as handle:
        headers = {"Content-Length": str(os.fstat(handle.fileno()).st_size)}
        response = _http_request("PUT", url, headers, retry, body=handle)
    if _transient_status(response.status):
        raise TransientError(f"{url}: HTTP {response.status}")
    if response.status >= 300:
        raise StorageError(f"{url}: HTTP {response.status} on upload")
