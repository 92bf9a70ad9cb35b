"""Run dirs on disk: a Hydra job output folder (`.hydra/` with the job's overrides) holding what
a run keeps (checkpoints, jobs.jsonl, mlflow_run_id ...), and finding them under a folder."""

from __future__ import annotations

from pathlib import Path


def is_run_dir(path: Path) -> bool:
    return (Path(path) / ".hydra" / "overrides.yaml").is_file()


def find_runs(root: Path) -> list[Path]:
    """Run dirs at or below `root` (a run dir, a sweep dir or any folder above them)."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    return sorted(p.parent.parent for p in root.rglob(".hydra/overrides.yaml") if ".submitit" not in p.parts)
