"""One MLflow run per training run, logged from rank 0.

The run id is kept in `<run_dir>/mlflow_run_id` (and in every checkpoint), so a restarted
job re-attaches to its run instead of starting another.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
TRACKING_URI_FILE = "mlflow_tracking_uri"  # so tools find the store from the run dir alone
_MLFLOW_BATCH = 100  # MLflow takes at most this many params or metrics per log_batch call


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
        self.run_id: str | None = None
        self._client = None

    def start(self, cfg: DictConfig, run_id: str | None = None) -> str | None:
        """Create the run, or re-attach to `run_id` (else the one recorded in the run dir)."""
        if not self.enabled:
            return None
        from mlflow.tracking import MlflowClient

        self._client = client = MlflowClient(self.tracking_uri)
        id_file = self.run_dir / RUN_ID_FILE
        run_id = run_id or (id_file.read_text().strip() if id_file.exists() else None)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if run_id:
            client.update_run(run_id, status="RUNNING")
            log.info("re-attached to MLflow run %s", run_id)
        else:
            experiment = client.get_experiment_by_name(self.experiment)
            if experiment is None:
                raise RuntimeError(f"MLflow experiment {self.experiment!r} missing in {self.tracking_uri}")
            run = client.create_run(experiment.experiment_id, run_name=self.run_dir.name,
                                    tags={"pemt.run_dir": str(self.run_dir)})
            run_id = run.info.run_id
            id_file.write_text(run_id)
            from mlflow.entities import Param

            params = [Param(k, v[:6000]) for k, v in flatten(resolved).items()]
            for i in range(0, len(params), _MLFLOW_BATCH):
                client.log_batch(run_id, params=params[i:i + _MLFLOW_BATCH])
        self.run_id = run_id
        (self.run_dir / TRACKING_URI_FILE).write_text(self.tracking_uri)
        client.log_text(run_id, OmegaConf.to_yaml(resolved), "config/resolved.yaml")
        return run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or self._client is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for i in range(0, len(entries), _MLFLOW_BATCH):
            self._client.log_batch(self.run_id, metrics=entries[i:i + _MLFLOW_BATCH])

    def finish(self, status: str) -> None:
        if self.enabled and self._client is not None and self.run_id:
            self._client.set_terminated(self.run_id, status=status)
