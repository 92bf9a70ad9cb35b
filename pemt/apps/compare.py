"""Compare runs: a table and PNG plots of loss, throughput and memory against step.

    python tools/compare.py outputs/pemt-pretrain                # the runs of a sweep dir
    python tools/compare.py --experiment pemt-pretrain           # every run of an experiment
        [--tracking-uri sqlite:///outputs/mlflow.db] [--metrics loss samples_per_s ...] [--out DIR]

Plots go to --out (default: outputs/compare), one PNG per metric with a line per run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pemt.track.compare import DEFAULT_METRICS, collect, format_table, plot, summary
from pemt.track.tracker import TRACKING_URI_FILE


def _store_of(sweep_dir: Path | None) -> str | None:
    """The tracking URI the sweep's runs recorded in their run dirs."""
    if sweep_dir is None:
        return None
    recorded = sorted(sweep_dir.rglob(TRACKING_URI_FILE))
    return recorded[0].read_text().strip() if recorded else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="a sweep dir (or any folder of run dirs)")
    parser.add_argument("--experiment", help="an MLflow experiment name instead of a sweep dir")
    parser.add_argument("--tracking-uri", help="MLflow store (default: the sweep's own, else outputs/mlflow.db)")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    parser.add_argument("--out", type=Path, default=Path("outputs/compare"))
    args = parser.parse_args(argv)
    if (args.sweep_dir is None) == (args.experiment is None):
        parser.error("give a sweep dir or --experiment, not both")
    uri = args.tracking_uri or _store_of(args.sweep_dir) or f"sqlite:///{Path('outputs').resolve()}/mlflow.db"
    try:
        from mlflow.tracking import MlflowClient

        runs = collect(MlflowClient(uri), args.experiment, args.sweep_dir, tuple(args.metrics))
    except LookupError as err:
        print(f"compare: {err}", file=sys.stderr)
        return 2
    print(format_table(summary(runs)))
    for path in plot(runs, args.out):
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
