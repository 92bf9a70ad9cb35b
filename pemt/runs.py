"""Finding runs on disk, saying where each stands, and the command that continues one.

A run dir is a Hydra job output folder (`.hydra/` with the job's overrides) holding
`checkpoints/`, `jobs.jsonl` and `mlflow_run_id`. Continuing a run is launching the same
overrides from the same working directory: the run dir, the checkpoints and the MLflow run
follow from them.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from pemt.config import hydra_quoted
from pemt.ownership import RunLock, describe
from pemt.rundir import is_run_dir
from pemt.secrets import redact
from pemt.train.checkpoint_files import committed_checkpoints
from pemt.train.journal import read_journal

ENTRY_POINTS = ("pretrain", "finetune")  # Hydra job names, each the app pemt.apps.<name>


class RunNotFound(LookupError):
    pass


@dataclass
class RunStatus:
    run_dir: str
    state: str  # running | finished | failed | preempted | time limit | terminated | interrupted | not started
    step: int  # step of the last complete checkpoint (0: none)
    checkpoint: str | None
    max_steps: int
    last_job: dict[str, Any] | None
    mlflow_run_id: str | None

    owner: str | None = None  # the live job that owns the run dir, when state is running

    @property
    def resumable(self) -> bool:
        return self.state != "running" and (self.state != "finished" or self.step < self.max_steps)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "resumable": self.resumable}


def run_dir_of_mlflow_run(run_id: str, tracking_uri: str) -> Path:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException as err:
        raise RunNotFound(f"MLflow run {run_id} not found in {redact(tracking_uri)}: {redact(str(err))}") from err
    if "pemt.run_dir" not in run.data.tags:
        raise RunNotFound(f"MLflow run {run_id} has no pemt.run_dir tag: not a pemt training run")
    return Path(run.data.tags["pemt.run_dir"])


def _job_config(run_dir: Path) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    return config


def run_status(run_dir: Path) -> RunStatus:
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise RunNotFound(f"{run_dir} is not a run dir (no .hydra/overrides.yaml)")
    committed = committed_checkpoints(run_dir / "checkpoints")
    last = committed[-1] if committed else None
    journal = read_journal(run_dir)
    last_job = journal[-1] if journal else None
    owner = RunLock(run_dir).holder()
    if owner is not None:
        state = "running"
    elif last_job is None:
        state = "not started"
    elif last_job["event"] == "start":
        state = "interrupted"  # no end recorded: killed outright, or still running
    else:
        state = last_job["outcome"]
    id_file = run_dir / "mlflow_run_id"
    return RunStatus(
        run_dir=str(run_dir),
        state=state,
        step=last.step if last else 0,
        checkpoint=last.tag if last else None,
        max_steps=int(_job_config(run_dir)["train"]["max_steps"]),
        last_job=last_job,
        mlflow_run_id=id_file.read_text().strip() if id_file.exists() else None,
        owner=describe(owner) if owner else None,
    )


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def entry_point(run_dir: Path) -> str:
    """The module of the app that made the run (from its Hydra job name), never a path the run
    dir holds."""
    hydra = yaml.safe_load((Path(run_dir) / ".hydra" / "hydra.yaml").read_text())["hydra"]
    name = str(hydra["job"]["name"])
    if name not in ENTRY_POINTS:
        raise RunNotFound(
            f"{run_dir} was made by job {name!r}, not one of pemt's entry points "
            f"({', '.join(ENTRY_POINTS)}): resume it with the script that made it"
        )
    return f"pemt.apps.{name}"


def resume_command(run_dir: Path, overrides: list[str]) -> tuple[list[str], Path]:
    """The launch command (and its working directory) that continues `run_dir`: the run's own
    entry point and overrides, with `run_dir` set to where the run is now, so the relaunch lands
    in it even if it was moved."""
    run_dir = Path(run_dir).resolve()
    original = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    replaced = {_key(o) for o in overrides} | {"run_dir"}
    merged = (
        [o for o in original if _key(o) not in replaced] + list(overrides) + [f"run_dir={hydra_quoted(str(run_dir))}"]
    )
    hydra = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
    launched_from = Path(hydra["runtime"]["cwd"])  # relative paths in the overrides are from there
    return [
        sys.executable,
        "-m",
        entry_point(run_dir),
        *merged,
    ], launched_from if launched_from.is_dir() else Path.cwd()
