"""One MLflow run per training run, logged from rank 0.

The run id is kept in `<run_dir>/mlflow_run_id` (and in every checkpoint), so a restarted
job re-attaches to its run instead of starting another. Metrics go through an outbox (local
file first, delivered in the background), so a slow or absent tracking server never holds
up training and nothing is lost. Steps a resumed job replays after rolling back to its
checkpoint were logged by the job before it and are not logged again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pemt.config import plain
from pemt.secrets import redact, redact_config
from pemt.track.context import context_tags
from pemt.track.outbox import Outbox, deliver

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
TRACKING_URI_FILE = "mlflow_tracking_uri"  # so tools find the store from the run dir alone
_PARAM_BATCH = 100  # MLflow takes at most this many params per log_batch call


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: str(tree)}


class MlflowTracker:
    def __init__(self, cfg: DictConfig, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.tracking_uri = str(cfg.mlflow.tracking_uri)
        self.experiment = str(cfg.mlflow.experiment)
        self.system_metrics = bool(OmegaConf.select(cfg, "mlflow.system_metrics", default=False))
        self.parent_run_id = OmegaConf.select(cfg, "mlflow.parent_run_id")
        self.run_id: str | None = None
        self.logged_until = 0  # the last step logged before this job: replayed steps stay unlogged
        self._client: Any = None
        self._outbox: Outbox | None = None
        self._monitor: Any = None
        self._opening: tuple[Any, ...] | None = None  # what creating/opening the run needs, until the store answers
        self._started_at = time.time()

    def start(
        self,
        cfg: DictConfig,
        run_id: str | None = None,
        segment: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
    ) -> str | None:
        """Create the run (with `tags`), or re-attach to `run_id` (else the one recorded in the run
        dir). A tracking store that does not answer does not stop the job: it trains, its metrics
        wait in the outbox, and the run is created (or updated) once the store answers."""
        if not self.enabled:
            return None
        # MLflow's HTTP client retries a dead server for minutes inside one call; the outbox
        # retries by itself, so fail fast and say so.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(self.tracking_uri)
        id_file = self.run_dir / RUN_ID_FILE
        run_id = run_id or (id_file.read_text().strip() if id_file.exists() else None)
        (self.run_dir / TRACKING_URI_FILE).write_text(redact(self.tracking_uri))
        self._opening = (redact_config(plain(cfg)), tags or {}, segment)
        self._outbox = Outbox(self.run_dir, self._send)
        self.logged_until = self._outbox.max_step
        try:
            self._open(run_id)
        except Exception as err:  # noqa: BLE001 - a tracking outage must not stop the job
            self.run_id = run_id
            log.warning(
                "MLflow at %s does not answer (%s); training goes on and the run is %s when it does",
                redact(self.tracking_uri),
                err,
                "updated" if run_id else "created",
            )
        self._outbox.start()
        if self.logged_until:
            log.info("re-attached to MLflow run %s (steps up to %d already logged)", self.run_id, self.logged_until)
        return self.run_id

    def _open(self, run_id: str | None) -> None:
        """Create or re-attach the run and mark it running (raises while the store is down)."""
        assert self._opening is not None, "the run is already open"
        resolved, tags, segment = self._opening
        client = self._client
        if run_id is None:
            run_id = self._create(client, resolved, tags)
            (self.run_dir / RUN_ID_FILE).write_text(run_id)
        self.run_id = run_id
        client.update_run(run_id, status="RUNNING")
        client.log_text(run_id, OmegaConf.to_yaml(resolved), "config/resolved.yaml")
        if segment is not None:
            client.set_tag(run_id, f"pemt.segment.{segment['segment']:03d}", json.dumps(segment))
        self._opening = None
        if self.system_metrics:
            self._monitor = _start_system_metrics(run_id, self.tracking_uri)

    def _create(self, client: Any, resolved: dict[str, Any], extra_tags: dict[str, str]) -> str:
        from mlflow.entities import Param

        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            raise RuntimeError(f"MLflow experiment {self.experiment!r} missing in {redact(self.tracking_uri)}")
        tags = {**context_tags(), "pemt.run_dir": str(self.run_dir), **extra_tags}
        if self.parent_run_id:  # a point of a sweep: shown under the sweep's run in the UI
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = client.create_run(experiment.experiment_id, run_name=self.run_dir.name, tags=tags)
        params = [Param(k, v[:6000]) for k, v in flatten(resolved).items()]
        for i in range(0, len(params), _PARAM_BATCH):
            client.log_batch(run.info.run_id, params=params[i : i + _PARAM_BATCH])
        return str(run.info.run_id)

    def _send(self, records: list[dict[str, Any]]) -> None:
        if self._opening is not None:  # the store was down when the job started
            self._open(self.run_id)
            log.info("MLflow answers: run %s is open, buffered metrics follow", self.run_id)
        # A status left undelivered by an earlier job is stale: this job is running.
        current = [r for r in records if "status" not in r or r["time"] >= self._started_at]
        assert self.run_id is not None  # _open set it
        deliver(self._client, self.run_id, current)

    def log_metrics(self, metrics: dict[str, float], step: int, replayed: bool = False) -> None:
        """Queue metrics at `step`. Steps up to `logged_until` were logged by an earlier job and
        are skipped, unless `replayed` says these values belong to this job (per-job timings)."""
        if self._outbox is None or (step <= self.logged_until and not replayed):
            return
        self._outbox.put({"step": int(step), "time": time.time(), "metrics": {k: float(v) for k, v in metrics.items()}})

    def set_tags(self, tags: dict[str, str]) -> None:
        """Queue tags for the run (delivered in order with its metrics)."""
        if self._outbox is None or not tags:
            return
        self._outbox.put({"time": time.time(), "tags": {k: str(v)[:5000] for k, v in tags.items()}})

    def log_artifacts(self, paths: list[Path], artifact_path: str) -> None:
        """Queue files to be copied into the run's artifacts under `artifact_path`."""
        if self._outbox is None or not paths:
            return
        self._outbox.put({"time": time.time(), "artifacts": [str(p) for p in paths], "artifact_path": artifact_path})

    def finish(self, status: str, timeout_s: float = 30.0) -> None:
        """Queue the final status and deliver what is pending for up to `timeout_s` (what is left
        stays in the outbox for the next job or tools/mlflow_sync.py)."""
        deadline = time.time() + timeout_s
        if self._monitor is not None:
            # MLflow's sampler flushes to the store on finishing: bounded like everything else here
            stopping = threading.Thread(target=self._monitor.finish, daemon=True, name="pemt-system-metrics-stop")
            stopping.start()
            stopping.join(timeout_s)
        if self._outbox is not None:
            self._outbox.put({"status": status, "time": time.time()})
            self._outbox.close(max(0.0, deadline - time.time()))


def _start_system_metrics(run_id: str, tracking_uri: str) -> Any:
    """MLflow's CPU, memory, disk, network (and GPU) sampler, limited to this job's GPUs."""
    import torch

    if torch.cuda.is_available():
        try:
            import pynvml  # noqa: F401 - what MLflow's GPU sampler needs
        except ImportError:
            log.warning(
                "GPU system metrics (system/gpu_*) are off: nvidia-ml-py is not installed "
                "(pip install 'pemt[gpu]', or make setup on a machine with nvidia-smi)"
            )
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=tracking_uri)
    except Exception as err:  # noqa: BLE001 - optional: never stop training for it
        log.warning("MLflow system metrics not started: %s", err)
        return None
    # The GPUs Slurm gave the job on this node (submitit narrows CUDA_VISIBLE_DEVICES to rank 0's).
    given = (
        os.environ.get("SLURM_STEP_GPUS")
        or os.environ.get("SLURM_JOB_GPUS")
        or os.environ.get("CUDA_VISIBLE_DEVICES", "")
    )
    visible = [int(i) for i in given.split(",") if i.strip().isdigit()]
    for gpus in monitor.monitors:
        # NVML numbers every GPU of the node; keep the ones this job was given.
        if visible and hasattr(gpus, "gpu_handles"):
            gpus.gpu_handles = [h for i, h in enumerate(gpus.gpu_handles) if i in visible]
    monitor.start()
    return monitor
