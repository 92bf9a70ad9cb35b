"""Continue a training run after a preemption, a failure or a time limit, or say where it stands.

    python tools/resume.py RUN_DIR|SWEEP_DIR|MLFLOW_RUN_ID [overrides...]   # resubmit
    python tools/resume.py TARGET --status [--json]                         # where it stands
    python tools/resume.py TARGET --dry-run [overrides...]                  # the command, not run
    python tools/resume.py --list DIR [--json]                              # resumable runs under DIR

Resubmitting launches the run's own overrides again from the directory it was launched in, so
it continues from its newest complete checkpoint and in the same MLflow run. Overrides given
here replace the run's own, e.g. `nodes=4` or `train.max_steps=2000` to train further.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from pemt.rundir import find_runs
from pemt.runs import RunNotFound, resume_command, run_dir_of_mlflow_run, run_status


def _targets(target: str, tracking_uri: str) -> list[Path]:
    if re.fullmatch(r"[0-9a-f]{32}", target) and not Path(target).exists():
        return [run_dir_of_mlflow_run(target, tracking_uri)]
    runs = find_runs(Path(target))
    if not runs:
        raise RunNotFound(f"{target}: no run dirs found (folders with .hydra/overrides.yaml)")
    return runs


def _print_table(statuses: list[Any]) -> None:
    print(f"{'state':<12} {'step':>11}  {'last job':<20} run dir")
    for s in statuses:
        job = s.last_job or {}
        reason = f"  ({job['reason']})" if job.get("reason") else ""
        print(f"{s.state:<12} {s.step:>5}/{s.max_steps:<5}  {str(job.get('job_id', '-')):<20} {s.run_dir}{reason}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="?", help="run dir, sweep dir or MLflow run id")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides replacing the run's own")
    parser.add_argument("--status", action="store_true", help="show where the run stands")
    parser.add_argument("--list", metavar="DIR", type=Path, help="list the runs under DIR")
    parser.add_argument("--json", action="store_true", help="with --status or --list: JSON for scripts")
    parser.add_argument("--dry-run", action="store_true", help="print what would be submitted")
    parser.add_argument(
        "--tracking-uri",
        default=f"sqlite:///{Path('outputs').resolve()}/mlflow.db",
        help="MLflow store to look an MLflow run id up in",
    )
    args = parser.parse_args(argv)
    try:
        if args.list is not None:
            statuses = [run_status(r) for r in find_runs(args.list)]
        elif args.target is None:
            parser.error("give a run dir, a sweep dir or an MLflow run id (or --list DIR)")
        else:
            statuses = [run_status(r) for r in _targets(args.target, args.tracking_uri)]
    except RunNotFound as err:
        print(f"resume: {err}", file=sys.stderr)
        return 2
    if args.list is not None or args.status:
        if args.json:
            print(json.dumps([s.as_dict() for s in statuses], indent=1))
        else:
            _print_table(statuses)
        return 0

    wants_more = any(o.startswith("train.max_steps=") for o in args.overrides)
    for status in statuses:
        if status.state == "running":
            print(f"resume: {status.run_dir} is left alone: in use by {status.owner}", file=sys.stderr)
    todo = [s for s in statuses if s.state != "running" and (s.resumable or wants_more)]
    if not todo:
        _print_table(statuses)
        if all(s.state != "running" for s in statuses):
            print(
                "resume: nothing to resume: every run finished at its train.max_steps; pass "
                "train.max_steps=N to train further",
                file=sys.stderr,
            )
        return 2
    failed = 0
    for status in todo:
        try:
            command, cwd = resume_command(Path(status.run_dir), args.overrides)
        except RunNotFound as err:
            print(f"resume: {err}", file=sys.stderr)
            failed += 1
            continue
        print(
            f"resuming {status.run_dir} from step {status.step} ({status.state}):\n  cd {shlex.quote(str(cwd))} && "
            + " ".join(shlex.quote(c) for c in command)
        )
        if not args.dry_run:
            failed += subprocess.run(command, cwd=cwd).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
