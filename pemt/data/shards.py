"""Shard folders: writing them with a manifest, and finding them again.

A shard folder holds `shard-000000.tar ...` (WebDataset tar files, one sample per video) and
`manifest.json` listing each shard's name, sample count, bytes and sha256.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import braceexpand
import webdataset as wds

from pemt.integrity import sha256

MANIFEST = "manifest.json"


def describe_shard(path: Path) -> dict:
    """A manifest entry's file facts: name, bytes, sha256."""
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)}


def write_shards(samples: Iterable[dict], out_dir: Path, samples_per_shard: int,
                 extra: dict | None = None) -> list[dict]:
    """Write samples into tar shards under `out_dir` and a manifest describing them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with wds.ShardWriter(str(out_dir / "shard-%06d.tar"), maxcount=samples_per_shard, verbose=0) as writer:
        for sample in samples:
            writer.write(sample)
            name = Path(writer.fname).name
            counts[name] = counts.get(name, 0) + 1
    shards = [{**describe_shard(out_dir / name), "samples": n} for name, n in sorted(counts.items())]
    manifest = {"shards": shards, "samples": sum(counts.values()), **(extra or {})}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return shards


def list_shards(source: str | Path) -> list[str]:
    """Shard paths from a folder (manifest first, else *.tar) or a brace pattern."""
    text = str(source)
    path = Path(text)
    if path.is_dir():
        manifest = path / MANIFEST
        if manifest.exists():
            try:
                names = [entry["name"] for entry in json.loads(manifest.read_text())["shards"]]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{manifest}: not a shard manifest ({err})") from err
            urls = [str(path / name) for name in names]
        else:
            urls = sorted(str(p) for p in path.glob("*.tar"))
    else:
        urls = [u for u in braceexpand.braceexpand(text) if Path(u).exists() or "://" in u]
    if not urls:
        raise FileNotFoundError(f"no shards found at {text!r} (expected a folder of .tar files or a brace pattern)")
    return urls
