"""Runs side by side: a summary table and one plot per metric against step.

Runs come from an MLflow experiment or from a sweep dir (each run dir's `mlflow_run_id`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

from pemt.rundir import find_runs

DEFAULT_METRICS = ("loss", "samples_per_s", "mfu_pct", "step_time_s", "host_rss_gib_max", "lr")


@dataclass
class RunSeries:
    name: str
    run_id: str
    status: str
    series: dict[str, list[tuple[int, float]]]  # metric -> [(step, value)] sorted by step


def collect(
    client: MlflowClient,
    experiment: str | None = None,
    sweep_dir: Path | None = None,
    metrics: tuple[str, ...] = DEFAULT_METRICS,
) -> list[RunSeries]:
    if sweep_dir is not None:
        ids = [
            (d / "mlflow_run_id").read_text().strip() for d in find_runs(sweep_dir) if (d / "mlflow_run_id").exists()
        ]
        runs = [client.get_run(run_id) for run_id in ids]
    else:
        found = client.get_experiment_by_name(experiment or "")
        if found is None:
            raise LookupError(f"no MLflow experiment {experiment!r} in {client.tracking_uri}")
        runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])
    if not runs:
        raise LookupError("no runs to compare")
    collected = []
    for run in runs:
        series = {}
        for metric in metrics:
            history = client.get_metric_history(run.info.run_id, metric)
            series[metric] = sorted((m.step, m.value) for m in history)
        collected.append(RunSeries(run.info.run_name or run.info.run_id[:8], run.info.run_id, run.info.status, series))
    return collected


def summary(runs: list[RunSeries]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for run in runs:
        loss = run.series.get("loss", [])
        speed = [v for _, v in run.series.get("samples_per_s", [])]
        mfu = [v for _, v in run.series.get("mfu_pct", [])]
        rss = [v for _, v in run.series.get("host_rss_gib_max", [])]
        rows.append(
            {
                "run": run.name,
                "status": run.status,
                "last step": loss[-1][0] if loss else None,
                "last loss": loss[-1][1] if loss else None,
                "mean samples/s": sum(speed) / len(speed) if speed else None,
                "mean MFU %": sum(mfu) / len(mfu) if mfu else None,
                "peak host RSS (GiB)": max(rss) if rss else None,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else ("-" if value is None else str(value))

    headers = list(rows[0])
    cells = [[cell(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def plot(runs: list[RunSeries], out_dir: Path) -> list[Path]:
    """One PNG per metric, a line per run; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in runs[0].series:
        if not any(run.series.get(metric) for run in runs):
            continue
        figure, axes = plt.subplots(figsize=(7, 4))
        for run in runs:
            points = run.series.get(metric, [])
            if points:
                axes.plot([s for s, _ in points], [v for _, v in points], marker=".", label=run.name)
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(metric)
        axes.set_title(f"{metric} by step")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        figure.tight_layout()
        path = out_dir / f"{metric}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written
