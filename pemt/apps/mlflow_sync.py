"""Send the metrics a run could not deliver to MLflow (tracking server down when its job ended).

    python tools/mlflow_sync.py RUN_DIR|SWEEP_DIR [--tracking-uri URI]

Each run dir keeps the metrics it logged in `mlflow_outbox.jsonl` and the last one delivered in
`mlflow_outbox.sent`; this sends the rest to the run's MLflow run (the id in `mlflow_run_id`, the
store in `mlflow_tracking_uri` unless given) and records them as sent. The run's next job does the
same by itself; this is for runs that will not have one. A run whose job is alive delivers its own
metrics: it is left alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pemt.ownership import RunLock
from pemt.rundir import find_runs
from pemt.track.outbox import deliver, mark_delivered, read_records
from pemt.track.tracker import RUN_ID_FILE, TRACKING_URI_FILE


def sync(run_dir: Path, tracking_uri: str | None) -> int:
    """Deliver the run's undelivered records; returns how many were sent."""
    from mlflow.tracking import MlflowClient

    with RunLock(run_dir).held("tools/mlflow_sync.py"):  # never beside a live job delivering the same records
        records, delivered = read_records(run_dir)
        pending = [r for r in records if r["seq"] > delivered]
        if not pending:
            return 0
        if not (run_dir / RUN_ID_FILE).exists():
            raise FileNotFoundError(f"{run_dir / RUN_ID_FILE} is missing: no MLflow run to send to")
        uri = tracking_uri or (run_dir / TRACKING_URI_FILE).read_text().strip()
        deliver(MlflowClient(uri), (run_dir / RUN_ID_FILE).read_text().strip(), pending)
        mark_delivered(run_dir, pending[-1]["seq"])
        return len(pending)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", type=Path, help="a run dir, or a folder above run dirs")
    parser.add_argument("--tracking-uri", help="the MLflow store (default: the one the run recorded)")
    args = parser.parse_args(argv)
    runs = find_runs(args.target)
    if not runs:
        print(f"mlflow_sync: no run dirs under {args.target}", file=sys.stderr)
        return 2
    failed = 0
    for run_dir in runs:
        try:
            print(f"{run_dir}: {sync(run_dir, args.tracking_uri)} records sent")
        except Exception as err:  # noqa: BLE001 - report each run, go on with the others
            print(f"{run_dir}: not sent: {err}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
