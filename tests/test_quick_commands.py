"""Commands that only print a usage line, a table or a plan answer at once: they do not import
torch, DeepSpeed or MLflow (seconds each) unless the command needs them, and print no DeepSpeed
warning. The bound on wall time is generous (a busy CI machine); the imports are the property."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib

from conftest import REPO

HEAVY = ("torch", "deepspeed", "mlflow", "webdataset")
BOUND_S = 3.0  # measured 0.2-0.6 s alone on 2 cores; the test runs beside other test files
SCRIPTS = sorted(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])
TOOLS = sorted(p.name for p in (REPO / "tools").glob("*.py"))


def _run(command: list[str]) -> tuple[subprocess.CompletedProcess, float, set[str]]:
    """The command under `-X importtime`: its output, wall time and the heavy packages it imported."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    seconds = time.perf_counter() - started
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return done, seconds, {name for name in HEAVY if name in imported}


def _script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.mark.parametrize("command", [*(["script", s] for s in SCRIPTS), *(["tool", t] for t in TOOLS)])
def test_help_answers_without_loading_torch(command: list[str]) -> None:
    kind, name = command
    argv = [_script(name)] if kind == "script" else [sys.executable, str(REPO / "tools" / name)]
    done, seconds, heavy = _run([*argv, "--help"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower() or "== Config ==" in done.stdout, done.stdout[:500]
    assert not heavy, f"{name} --help imported {sorted(heavy)}"
    assert "Setting accelerator" not in done.stderr
    assert seconds < BOUND_S, f"{name} --help took {seconds:.2f} s"


def _fake_run(root: Path) -> Path:
    """A run dir as a finished pretraining job leaves it: Hydra's files, a journal, a checkpoint."""
    run = root / "pemt-pretrain" / "default"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("[]\n")
    (run / ".hydra" / "config.yaml").write_text("train:\n  max_steps: 30\n")
    (run / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    name: pretrain\n")
    records = [{"event": "start", "step": 0, "time": 1.0}, {"event": "end", "outcome": "finished", "step": 30}]
    (run / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "checkpoints" / "step_00000030").mkdir(parents=True)
    (run / "checkpoints" / "step_00000030" / "pemt_manifest.json").write_text(json.dumps({"step": 30, "files": {}}))
    return run


@pytest.mark.parametrize("flags", [["--status"], ["--list"], ["--status", "--json"]])
def test_resume_status_and_list_answer_at_once(tmp_path: Path, flags: list[str]) -> None:
    run = _fake_run(tmp_path)
    target = [str(tmp_path)] if flags[0] == "--list" else [str(run)]
    argv = [*flags[:1], *target, *flags[1:]] if flags[0] == "--list" else [*target, *flags]
    done, seconds, heavy = _run([_script("pemt-resume"), *argv])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "finished" in done.stdout and "30" in done.stdout
    assert not heavy, f"pemt-resume {' '.join(flags)} imported {sorted(heavy)}"
    assert seconds < BOUND_S, f"pemt-resume {' '.join(flags)} took {seconds:.2f} s"
