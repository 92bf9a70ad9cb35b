"""The MLflow tracking store: made ready once, before any rank starts.

Two ranks creating one new SQLite database at once race on its migrations, and a server
that is down should stop a launch before it queues work, not fail on every rank later.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from pemt.secrets import redact


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI."""


def _check_server(uri: str, timeout_s: float = 5.0) -> None:
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            pass
    except (urllib.error.URLError, OSError) as err:
        raise TrackingError(
            f"MLflow tracking server {redact(uri)} is not reachable ({redact(str(err))}); start it, or set "
            "mlflow.tracking_uri to a local store such as sqlite:///path/mlflow.db"
        ) from err


def ensure_experiment(tracking_uri: str, experiment: str, artifact_root: str | Path | None = None) -> str:
    """Create the store (SQLite file or server check) and the experiment; return its id.

    A local store's experiment keeps its artifacts under `artifact_root` (default: beside the
    SQLite file), never in the working directory (MLflow's `./mlruns`); a tracking server keeps
    them where it was told to (`--artifacts-destination`)."""
    from mlflow.tracking import MlflowClient

    scheme = urlparse(tracking_uri).scheme
    location = None
    if scheme == "sqlite":
        store = Path(tracking_uri.removeprefix("sqlite:///"))
        store.parent.mkdir(parents=True, exist_ok=True)
        location = Path(artifact_root or store.parent / "mlartifacts").resolve().as_uri()
    elif scheme in ("http", "https"):
        _check_server(tracking_uri)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment {experiment!r} in {redact(tracking_uri)} is deleted; restore it "
                "or choose another mlflow.experiment"
            )
        return found.experiment_id
    return client.create_experiment(experiment, artifact_location=location)
