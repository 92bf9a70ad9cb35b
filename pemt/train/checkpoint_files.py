"""What a run's checkpoint folder holds, read without torch or DeepSpeed: the commands that only
look at runs (`tools/resume.py --status`, `--list`) answer at once.

A checkpoint is committed once its manifest (`pemt_manifest.json`, written last) is in its
`step_NNNNNNNN/` folder; `pemt.train.checkpoint` writes, verifies and loads them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "pemt_manifest.json"
LATEST = "latest"
STAGING = ".staging"
INCOMPLETE = ".incomplete"


@dataclass(frozen=True)
class Committed:
    tag: str
    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def committed_checkpoints(directory: Path) -> list[Committed]:
    """Complete checkpoints (those with a manifest), oldest first."""
    found = []
    for manifest in directory.glob(f"step_*/{MANIFEST}"):
        try:
            data = json.loads(manifest.read_text())
        except ValueError:
            continue
        found.append(Committed(manifest.parent.name, manifest.parent, data))
    return sorted(found, key=lambda c: c.step)
