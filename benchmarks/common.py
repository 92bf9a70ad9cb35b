"""What the benchmarks share: launching a run as a user does, a cache of finished rows, the
`--set` option, and the line that says where a result was measured.

Benchmarks run as scripts (`python benchmarks/<name>.py`), so this folder is on their path and
they import this module by name; no benchmark imports another."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN_LINE = re.compile(r"pemt: run at step (\d+) in (.+) \(MLflow run (\w+)\)")


def launch(script: str, overrides: list[str]) -> tuple[Path, str, float]:
    """Run launch/<script> with `overrides`; its run dir, MLflow run id and wall time."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(REPO / "launch" / script), *overrides], cwd=REPO, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    found = RUN_LINE.search(done.stderr)
    if done.returncode or not found:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{script} {' '.join(overrides)} failed (exit {done.returncode})")
    return Path(found.group(2)), found.group(3), seconds


def probe_accuracy(run_dir: Path, steps: int) -> float:
    """Held-out top-1 of the linear probe (launch/finetune.py) in `run_dir`, which must have run `steps` steps."""
    last = json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])
    if last["step"] != steps:  # step counts do not name a run: a longer probe there is resumed, not rerun
        raise SystemExit(
            f"{run_dir} holds a probe run to step {last['step']}, not {steps}: remove that folder or use another --root"
        )
    return float(last["test_top1"])


def results_stem(out: Path, name: str, task: str) -> Path:
    """Where a benchmark's table and plot go: `<out>/<name>` for the classes task, `<name>_<task>` otherwise."""
    return out / (name if task == "classes" else f"{name}_{task}")


def machine_line() -> str:
    """The commit and the machine a result was measured on, for the head of a results file."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        )
        commit += "+changes" if dirty.stdout.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown commit"
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    return f"commit {commit}, {platform.machine()} {device}, torch {torch.__version__}"


def add_set_option(parser: argparse.ArgumentParser, example: str) -> None:
    """`--set KEY=VALUE`, repeatable, collected in `args.overrides`: a config override for every variant."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"a config override for every variant (repeatable), e.g. {example}",
    )


# A benchmark's finished rows, kept as they finish in a JSON file under its root, each with the
# settings it ran under: an interrupted build continues where it stopped, and a rerun with the same
# settings reports what was measured when each row ran instead of running it again.


def cached_rows(path: Path, settings: dict) -> list[dict]:
    """The rows kept under these settings (each row holds its `settings`)."""
    rows = json.loads(path.read_text()) if path.exists() else []
    return [r for r in rows if r["settings"] == settings]


def save_rows(path: Path, settings: dict, rows: list[dict]) -> None:
    """`rows` as the rows of these settings, beside the rows of other settings."""
    kept = [r for r in (json.loads(path.read_text()) if path.exists() else []) if r["settings"] != settings]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(kept + rows, indent=1))
