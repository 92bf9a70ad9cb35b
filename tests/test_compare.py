"""tools/compare.py: a table and one plot per metric across runs of a real MLflow store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from conftest import REPO


def _compare(*args: str) -> subprocess.CompletedProcess:
    """`python tools/compare.py ARGS` as a user runs it."""
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "compare.py"), *args], capture_output=True, text=True, cwd=REPO
    )


def test_table_and_plots_for_an_experiment(tmp_path: Path) -> None:
    from pemt.track.store import ensure_experiment

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = ensure_experiment(uri, "cmp")
    assert client.get_experiment(experiment).artifact_location.startswith(tmp_path.as_uri()), (
        "artifacts beside the store, not in the working directory"
    )
    for name, speed in (("deepspeed=zero1", 30.0), ("deepspeed=zero3", 20.0)):
        run = client.create_run(experiment, run_name=name)
        metrics = [Metric("loss", 2.0 / step, 0, step) for step in (1, 2, 3)]
        metrics += [Metric("samples_per_s", speed, 0, step) for step in (1, 2, 3)]
        client.log_batch(run.info.run_id, metrics=metrics)
        client.set_terminated(run.info.run_id)
    out = tmp_path / "plots"
    result = _compare(
        "--experiment", "cmp", "--tracking-uri", uri, "--metrics", "loss", "samples_per_s", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    header, *rows = [line.split("  ") for line in result.stdout.splitlines() if line.strip()]
    table = {
        cells[0]: dict(zip([h.strip() for h in header if h.strip()], [c.strip() for c in cells if c.strip()]))
        for cells in rows
    }
    assert set(table) >= {"deepspeed=zero1", "deepspeed=zero3"}
    zero1, zero3 = table["deepspeed=zero1"], table["deepspeed=zero3"]
    assert zero1["status"] == "FINISHED" and zero1["last step"] == "3"
    assert float(zero1["last loss"]) == pytest.approx(2.0 / 3, rel=1e-3)
    assert float(zero1["mean samples/s"]) == 30.0 and float(zero3["mean samples/s"]) == 20.0
    for metric in ("loss", "samples_per_s"):
        assert (out / f"{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_experiment_is_a_clear_error(tmp_path: Path) -> None:
    result = _compare("--experiment", "nope", "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert result.returncode == 2 and "no MLflow experiment 'nope'" in result.stderr
