"""Metrics on their way to MLflow: written locally first, delivered in the background.

Every `put` appends one line to `<run_dir>/mlflow_outbox.jsonl` and returns; a thread sends the
lines to the tracking store in batches. When the store does not answer (a tracking server down or
restarting), the thread keeps the lines and retries with backoff while training goes on. The
number of lines delivered is kept in `mlflow_outbox.sent`, so what a job could not deliver before
it ended (killed, server still down) is sent by the run's next job or by `tools/mlflow_sync.py`.
Nothing is dropped; after a crash between a send and its record a batch may be sent twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

OUTBOX = "mlflow_outbox.jsonl"
SENT = "mlflow_outbox.sent"
MLFLOW_BATCH = 1000  # MLflow takes at most this many metrics per log_batch call


def read_records(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """Every record in the run's outbox, and how many of them were delivered."""
    path, sent = Path(run_dir) / OUTBOX, Path(run_dir) / SENT
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # the last line of a job killed mid-write
                continue
    delivered = int(sent.read_text() or 0) if sent.exists() else 0
    return records, min(delivered, len(records))


def deliver(client: Any, run_id: str, records: list[dict[str, Any]]) -> None:
    """Send metric records (and a final status, if one is among them) to MLflow."""
    from mlflow.entities import Metric

    metrics = [Metric(key, float(value), int(r["time"] * 1000), int(r["step"]))
               for r in records if "metrics" in r for key, value in r["metrics"].items()]
    for start in range(0, len(metrics), MLFLOW_BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + MLFLOW_BATCH])
    for record in records:
        if "status" in record:
            client.set_terminated(run_id, status=record["status"], end_time=int(record["time"] * 1000))


class Outbox:
    def __init__(self, run_dir: Path, send: Callable[[list[dict[str, Any]]], None],
                 flush_s: float = 2.0, max_backoff_s: float = 30.0) -> None:
        self.path = Path(run_dir) / OUTBOX
        self.sent_path = Path(run_dir) / SENT
        self.send = send
        self.flush_s, self.max_backoff_s = flush_s, max_backoff_s
        records, self.delivered = read_records(run_dir)
        self.pending: list[dict[str, Any]] = records[self.delivered:]
        self.total = len(records)
        self.max_step = max((int(r["step"]) for r in records if "step" in r), default=0)
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
        line = json.dumps(record)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            self.pending.append(record)
            self.total += 1
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
                log.warning("MLflow does not answer (%s); training goes on, metrics are kept in %s and "
                            "sent when it is back", err, self.path)
            return False
        with self._lock:
            del self.pending[:len(batch)]
            self.delivered += len(batch)
            self.sent_path.write_text(str(self.delivered))
        if self._outage_since is not None:
            log.warning("MLflow answers again after %.0f s; %d buffered records sent",
                        time.time() - self._outage_since, len(batch))
            self._outage_since = None
        return True

    def _run(self) -> None:
        backoff = self.flush_s
        while not self._closing.is_set():
            self._wake.wait(backoff)
            self._wake.clear()
            backoff = self.flush_s if self._send_pending() else min(2 * backoff, self.max_backoff_s)

    def close(self, timeout_s: float = 30.0) -> int:
        """Deliver what is pending (trying for up to `timeout_s`); returns what stays undelivered."""
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        deadline = time.time() + timeout_s
        while not self._send_pending() and time.time() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.time())))
        self._file.close()
        if self.pending:
            log.warning("%d metric records not delivered to MLflow; they stay in %s and are sent by the "
                        "run's next job or by: python tools/mlflow_sync.py %s", len(self.pending), self.path,
                        self.path.parent)
        return len(self.pending)
