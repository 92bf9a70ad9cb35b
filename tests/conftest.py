from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# DeepSpeed JIT-compiles its communication op once; every test run reuses the project's cache.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# Small enough for a 2-core machine; 4 shards so 2 ranks x 1 worker each get their own.
SMALL_DATA = ["data.synthetic.videos=16", "data.synthetic.videos_per_shard=4", "data.synthetic.seconds=2.0"]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated synthetic shards shared by every launch in the session."""
    return tmp_path_factory.mktemp("cache")


def run_pretrain(root: Path, cache: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python launch/pretrain.py` as a user runs it, with outputs under `root`."""
    flags = [o for o in overrides if o.startswith("-")]
    values = [o for o in overrides if not o.startswith("-")]
    cmd = [sys.executable, str(REPO / "launch" / "pretrain.py"), *flags, f"paths.root={root}",
           f"paths.cache={cache}", *SMALL_DATA, *values]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def run_name(*overrides: str) -> str:
    """The run folder Hydra derives from the science-changing overrides (sorted, comma-joined)."""
    return ",".join(sorted([*SMALL_DATA, *overrides]))


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"
