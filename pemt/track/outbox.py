"""Metrics on their way to MLflow: written locally first, delivered in the background.

Every `put` appends one numbered line to `<run_dir>/mlflow_outbox.jsonl` and returns; a thread
sends the lines to the tracking store in batches. When the store does not answer (a tracking
server down or restarting), the thread keeps the lines and retries with backoff while training
goes on. `mlflow_outbox.sent` holds the number of the last line delivered and the last step
ever logged, replaced atomically, so what a job could not deliver before it ended (killed, server
still down) is sent by the run's next job or by `tools/mlflow_sync.py`, and a torn line (a kill
mid-write) never shifts what counts as sent. Once everything is delivered the outbox is
compacted (rewritten without the delivered lines, atomically).

A crash between a send and its record sends that batch again; MLflow's store ignores a metric
whose key, value, step and timestamp it already holds, so every record arrives exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pemt.integrity import write_atomic

log = logging.getLogger(__name__)

OUTBOX = "mlflow_outbox.jsonl"
SENT = "mlflow_outbox.sent"
MLFLOW_BATCH = 1000  # MLflow takes at most this many metrics per log_batch call
COMPACT_BYTES = 1 << 20  # rewrite the outbox once this much of it is delivered


def read_state(run_dir: Path) -> tuple[int, int]:
    """(number of the last record delivered, last step logged) from the sent file."""
    path = Path(run_dir) / SENT
    if not path.exists():
        return 0, 0
    text = path.read_text().strip()
    try:
        state = json.loads(text or "0")
    except ValueError:
        return 0, 0
    if isinstance(state, int):  # written by an older pemt: a count of the lines delivered
        return state, 0
    return int(state.get("seq", 0)), int(state.get("max_step", 0))


def read_records(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """Every whole record in the run's outbox (each with its `seq`), and the last seq delivered."""
    path = Path(run_dir) / OUTBOX
    records: list[dict[str, Any]] = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # the last line of a job killed mid-write
                continue
            record.setdefault("seq", len(records) + 1)  # lines of an older pemt are numbered by position
            records.append(record)
    return records, read_state(run_dir)[0]


def mark_delivered(run_dir: Path, seq: int) -> None:
    """Record records up to `seq` as delivered (keeping the last step logged)."""
    _, max_step = read_state(run_dir)
    records, _ = read_records(run_dir)
    max_step = max([max_step, *(int(r["step"]) for r in records if "step" in r)])
    write_atomic(Path(run_dir) / SENT, json.dumps({"seq": seq, "max_step": max_step}))


def deliver(client: Any, run_id: str, records: list[dict[str, Any]]) -> None:
    """Send metric records (and tags, files and a final status, if among them) to MLflow."""
    from mlflow.entities import Metric

    metrics = [
        Metric(key, float(value), int(r["time"] * 1000), int(r["step"]))
        for r in records
        if "metrics" in r
        for key, value in r["metrics"].items()
    ]
    for start in range(0, len(metrics), MLFLOW_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + MLFLOW_BATCH])
    for record in records:
        for key, value in record.get("tags", {}).items():
            client.set_tag(run_id, key, value)
        for path in record.get("artifacts", []):
            if Path(path).exists():
                client.log_artifact(run_id, path, record["artifact_path"])
            else:  # removed since it was queued: nothing to wait for
                log.warning("%s is gone; not logged to MLflow", path)
        if "status" in record:
            client.set_terminated(run_id, status=record["status"], end_time=int(record["time"] * 1000))


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a kill mid-write): the next line starts clean."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        data = handle.read()
        handle.truncate(data.rfind(b"\n") + 1)


class Outbox:
    def __init__(
        self,
        run_dir: Path,
        send: Callable[[list[dict[str, Any]]], None],
        flush_s: float = 2.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.path = Path(run_dir) / OUTBOX
        self.sent_path = Path(run_dir) / SENT
        self.send = send
        self.flush_s, self.max_backoff_s = flush_s, max_backoff_s
        _cut_torn_tail(self.path)
        records, self.delivered = read_records(run_dir)
        self.pending: list[dict[str, Any]] = [r for r in records if r["seq"] > self.delivered]
        self.seq = max([self.delivered, *(r["seq"] for r in records)])
        self.max_step = max([read_state(run_dir)[1], *(int(r["step"]) for r in records if "step" in r)])
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._outage_since: float | None = None
        self._file = self.path.open("a")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="pemt-mlflow-outbox")
        self._thread.start()

    def put(self, record: dict[str, Any]) -> None:
        """Record now, deliver later: never blocks on the tracking store."""
        with self._lock:
            self.seq += 1
            record = {**record, "seq": self.seq}
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            self.pending.append(record)
            if "step" in record:
                self.max_step = max(self.max_step, int(record["step"]))

    def _send_pending(self) -> bool:
        with self._lock:
            batch = list(self.pending)
        if not batch:
            return True
        try:
            self.send(batch)
        except Exception as err:  # noqa: BLE001 - any failure of the store: keep and retry
            if self._outage_since is None:
                self._outage_since = time.time()
                log.warning(
                    "MLflow does not answer (%s); training goes on, metrics are kept in %s and sent when it is back",
                    err,
                    self.path,
                )
            return False
        with self._lock:
            del self.pending[: len(batch)]
            self.delivered = batch[-1]["seq"]
            write_atomic(self.sent_path, json.dumps({"seq": self.delivered, "max_step": self.max_step}))
            if not self.pending and self.path.stat().st_size > COMPACT_BYTES:
                self._compact()
        if self._outage_since is not None:
            log.warning(
                "MLflow answers again after %.0f s; %d buffered records sent",
                time.time() - self._outage_since,
                len(batch),
            )
            self._outage_since = None
        return True

    def _compact(self) -> None:
        """Everything is delivered (the sent file says so, with the last step): start the file over."""
        self._file.close()
        write_atomic(self.path, "")
        self._file = self.path.open("a")

    def _run(self) -> None:
        backoff = self.flush_s
        while not self._closing.is_set():
            self._wake.wait(backoff)
            self._wake.clear()
            backoff = self.flush_s if self._send_pending() else min(2 * backoff, self.max_backoff_s)

    def close(self, timeout_s: float = 30.0) -> int:
        """Deliver what is pending, trying for at most `timeout_s`; returns what stays undelivered
        (on disk, for the next job or tools/mlflow_sync.py)."""
        deadline = time.time() + timeout_s
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)  # a send in flight to a dead server may outlast it
        if self._thread is None or not self._thread.is_alive():
            while not self._send_pending() and time.time() < deadline:
                time.sleep(min(2.0, max(0.0, deadline - time.time())))
        with self._lock:
            self._file.close()
            undelivered = len(self.pending)
        if undelivered:
            log.warning(
                "%d metric records not delivered to MLflow; they stay in %s and are sent by the "
                "run's next job or by: python tools/mlflow_sync.py %s",
                undelivered,
                self.path,
                self.path.parent,
            )
        return undelivered
