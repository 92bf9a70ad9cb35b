"""Checkpoints written at another world size, converted once to DeepSpeed's universal format.

The conversion is cached under `checkpoints/.universal/<tag>/` with the digest of the manifest it
was made from: a checkpoint saved again at the same step (after a rollback) is converted again.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

UNIVERSAL = ".universal"
DONE = ".complete"


class ConversionError(RuntimeError):
    pass


def manifest_digest(checkpoint: Path, manifest_name: str) -> str:
    return hashlib.sha256((checkpoint / manifest_name).read_bytes()).hexdigest()


def cached(directory: Path, checkpoint: Path, manifest_name: str) -> Path | None:
    """The conversion of `checkpoint` if one was made from its current manifest."""
    out = directory / UNIVERSAL / checkpoint.name
    done = out / DONE
    if done.is_file() and done.read_text().strip() == manifest_digest(checkpoint, manifest_name):
        return out
    return None


def convert(directory: Path, checkpoint: Path, manifest_name: str) -> Path:
    """Convert `checkpoint` (one process; the others wait for it) and mark it with its manifest."""
    out = directory / UNIVERSAL / checkpoint.name
    log.info("converting %s to the universal format for a new world size", checkpoint)
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with glob_safe(checkpoint) as source:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(source),
                "--output_folder",
                str(out),
                "--inject_missing_state",
            ],
            capture_output=True,
            text=True,
        )
    if result.returncode:
        raise ConversionError(f"converting {checkpoint} to universal format failed:\n{result.stderr[-3000:]}")
    (out / DONE).write_text(manifest_digest(checkpoint, manifest_name))
    return out


def forget(directory: Path, tag: str) -> None:
    """Drop a cached conversion (its checkpoint is deleted or replaced)."""
    shutil.rmtree(directory / UNIVERSAL / tag, ignore_errors=True)


@contextmanager
def glob_safe(path: Path) -> Iterator[Path]:
    """`path`, or a link to it whose name has no glob characters: DeepSpeed's checkpoint loading
    and converters find files with glob, and run dirs are named by overrides such as
    `model.sharing=[layer,cross]`, whose brackets glob reads as a pattern."""
    if not any(c in str(path) for c in "[]*?"):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="pemt-") as folder:
        link = Path(folder) / path.name.translate(str.maketrans("[]*?", "____"))
        link.symlink_to(Path(path).resolve(), target_is_directory=True)
        yield link


def complete_amsgrad_state(optimizer: Any) -> int:
    """Give AMSGrad's running maximum of the second moment back to every parameter a universal
    load left without one; returns how many. DeepSpeed's conversion keeps only `exp_avg` and
    `exp_avg_sq`, and torch's AdamW then fails on the first step (KeyError 'max_exp_avg_sq').
    The maximum restarts from the second moment itself: never below it, as AMSGrad requires, but
    without the larger values it held before the resume."""
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO wraps the torch optimizer
    filled = 0
    for group in getattr(inner, "param_groups", []):
        if not group.get("amsgrad"):
            continue
        for param in group["params"]:
            state = inner.state.get(param)
            if state and "exp_avg_sq" in state and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()
                filled += 1
    return filled
