"""A benchmark's finished rows, kept as they finish in a JSON file under its root, each with the
settings it ran under: an interrupted build continues where it stopped, and a rerun with the same
settings reports what was measured when each row ran instead of running it again."""

from __future__ import annotations

import json
from pathlib import Path


def cached_rows(path: Path, settings: dict) -> list[dict]:
    """The rows kept under these settings (each row holds its `settings`)."""
    rows = json.loads(path.read_text()) if path.exists() else []
    return [r for r in rows if r["settings"] == settings]


def save_rows(path: Path, settings: dict, rows: list[dict]) -> None:
    """`rows` as the rows of these settings, beside the rows of other settings."""
    kept = [r for r in (json.loads(path.read_text()) if path.exists() else []) if r["settings"] != settings]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(kept + rows, indent=1))
