"""A parent MLflow run per multirun, so the UI shows a sweep's points side by side under it."""

from __future__ import annotations

from collections.abc import Sequence


def sweep_name(job_overrides: Sequence[Sequence[str]]) -> str:
    """`sweep a=1|2 b=x|y`: the keys whose values differ between points."""
    values: dict[str, list[str]] = {}
    for overrides in job_overrides:
        for override in overrides:
            key, _, value = override.partition("=")
            values.setdefault(key, [])
            if value not in values[key]:
                values[key].append(value)
    varying = [f"{key}={'|'.join(vals)}" for key, vals in values.items() if len(vals) > 1]
    return "sweep " + " ".join(varying or ["(no varying keys)"])


def start_sweep_run(tracking_uri: str, experiment: str, job_overrides: Sequence[Sequence[str]]) -> str:
    """Create the parent run (status RUNNING) and return its id."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=sweep_name(job_overrides), tags={"pemt.sweep": "true"})
    points = [Param(f"point.{i}", " ".join(o)[:6000]) for i, o in enumerate(job_overrides)]
    for start in range(0, len(points), 100):  # MLflow takes at most 100 params per call
        client.log_batch(run.info.run_id, params=points[start : start + 100])
    return str(run.info.run_id)


def end_sweep_run(tracking_uri: str, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).set_terminated(run_id, status=status)
