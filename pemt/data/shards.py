"""Shard folders: writing them with a manifest, and reading the manifest back.

A shard folder holds `shard-000000.tar ...` (WebDataset tar files, one sample per video) and
`manifest.json` listing each shard's name, sample count, bytes and sha256. It may be a local
folder or a remote prefix (pemt.data.storage); the manifest is read from the same place.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pemt.data.members import INDEX_SUFFIX, shard_index
from pemt.data.storage import NotFound, Retry, StorageError, is_remote, join, object_size, read_bytes, upload
from pemt.integrity import sha256

MANIFEST = "manifest.json"


def describe_shard(path: Path) -> dict[str, Any]:
    """A manifest entry's file facts: name, bytes, sha256."""
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)}


def write_shards(
    samples: Iterable[dict[str, Any]], out_dir: Path, samples_per_shard: int, extra: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Write samples into tar shards under `out_dir` and a manifest describing them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    import webdataset as wds  # (imports torch: only where shards are written)

    with wds.ShardWriter(str(out_dir / "shard-%06d.tar"), maxcount=samples_per_shard, verbose=0) as writer:
        for sample in samples:
            writer.write(sample)
            name = Path(writer.fname).name
            counts[name] = counts.get(name, 0) + 1
    shards = [{**describe_shard(out_dir / name), "samples": n} for name, n in sorted(counts.items())]
    manifest = {"shards": shards, "samples": sum(counts.values()), **(extra or {})}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return shards


def transform_warnings(folder: str | Path, data_cfg: Any) -> list[str]:
    """What the config asks for beyond what transcoded shards hold (upscaled or repeated frames,
    upsampled sound), one line each; nothing for shards stored as they were."""
    try:
        recorded = manifest_json(folder).get("transcode") or {}
    except (OSError, ValueError, AttributeError):
        return []
    lines = []
    if recorded.get("short_side") and int(data_cfg.crop) > int(recorded["short_side"]):
        lines.append(
            f"data.crop={data_cfg.crop} but the shards in {folder} were made with short side "
            f"{recorded['short_side']}: frames are upscaled"
        )
    if recorded.get("fps") and float(data_cfg.fps) > float(recorded["fps"]):
        lines.append(
            f"data.fps={data_cfg.fps} but the shards in {folder} hold at most {recorded['fps']} "
            "frames per second: frames repeat"
        )
    if recorded.get("sample_rate") and int(data_cfg.sample_rate) > int(recorded["sample_rate"]):
        lines.append(
            f"data.sample_rate={data_cfg.sample_rate} but the shards' sound in {folder} was resampled to "
            f"{recorded['sample_rate']} Hz: no sound above {int(recorded['sample_rate']) // 2} Hz"
        )
    return lines


def manifest_json(folder: str | Path, retry: Retry | None = None) -> dict[str, Any]:
    """A shard folder's manifest as written, local or remote; errors name the file or URL."""
    manifest = join(folder, MANIFEST)
    if not is_remote(folder):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"no shard folder at {folder}")
        if not Path(manifest).exists():
            raise FileNotFoundError(
                f"{manifest} is missing: the loader needs each shard's sample count "
                "(tools/make_shards.py and tools/make_synthetic.py write it)"
            )
    try:
        loaded = json.loads(read_bytes(manifest, retry))
    except StorageError as err:
        raise FileNotFoundError(f"{err} (a shard folder needs its manifest.json)") from None
    except ValueError as err:
        raise ValueError(f"{manifest}: not a shard manifest ({err!r})") from err
    if not isinstance(loaded, dict):
        raise ValueError(f"{manifest}: not a shard manifest (a JSON object is expected)")
    return loaded


def read_manifest(folder: str | Path, retry: Retry | None = None) -> list[dict[str, Any]]:
    """The shard entries of a shard folder's manifest (name, samples, bytes, sha256)."""
    manifest = join(folder, MANIFEST)
    try:
        entries: list[dict[str, Any]] = manifest_json(folder, retry)["shards"]
        for entry in entries:
            entry["name"], entry["samples"] = str(entry["name"]), int(entry["samples"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{manifest}: not a shard manifest ({err!r})") from err
    if not entries:
        raise FileNotFoundError(f"{manifest} lists no shards")
    return entries


def upload_shards(folder: Path, location: str, progress: bool = True) -> int:
    """Copy a local shard folder to a remote prefix: every shard and its index (read by one request
    instead of a request per member header), then the manifest, so a reader never finds a manifest
    whose shards are not all there. Where no manifest is there yet (an interrupted upload), a file
    already there with its size is kept; a prefix whose manifest is another folder's is refused
    (shards of two sets must never mix). Returns the files sent."""
    entries = read_manifest(folder)
    if _remote_manifest(folder, location) == (Path(folder) / MANIFEST).read_bytes():
        return 0
    sent = upload_shard_files(folder, entries, location, progress)
    upload(Path(folder) / MANIFEST, join(location, MANIFEST))
    return sent + 1


def _remote_manifest(folder: Path, location: str) -> bytes | None:
    """The manifest already at `location` (None: none yet); refused if it is another folder's."""
    try:
        remote = read_bytes(join(location, MANIFEST))
    except NotFound:
        return None  # nothing uploaded yet, or interrupted before the manifest
    local = Path(folder) / MANIFEST
    if not local.exists() or remote != local.read_bytes():
        raise ValueError(f"{join(location, MANIFEST)} describes other shards than {folder}: upload to a new prefix")
    return remote


def upload_shard_files(folder: Path, entries: list[dict[str, Any]], location: str, progress: bool = False) -> int:
    """Copy these shards of a local folder and their indexes to `location` (no manifest: the
    folder's is uploaded last, once every shard is there); a file already there with its size is
    kept. Returns the files sent."""
    from tqdm import tqdm

    if (Path(folder) / MANIFEST).exists():
        _remote_manifest(folder, location)  # refuses a prefix that holds another set
    sent = 0
    with tempfile.TemporaryDirectory(prefix="pemt-upload-") as scratch:
        for entry in tqdm(entries, desc=f"upload to {location}", unit="shard", disable=not progress):
            shard = Path(folder) / entry["name"]
            index = Path(scratch) / f"{entry['name']}{INDEX_SUFFIX}"
            index.write_bytes(shard_index(shard))  # after its shard: an index never points into nothing
            for path, size in ((shard, int(entry["bytes"])), (index, index.stat().st_size)):
                target = join(location, path.name)
                try:
                    if object_size(target) == size:
                        continue
                except NotFound:
                    pass
                upload(path, target)
                sent += 1
    return sent


def upload_manifest(folder: Path, location: str) -> None:
    """The folder's manifest to `location`, after its shards (array tasks uploaded theirs)."""
    upload(Path(folder) / MANIFEST, join(location, MANIFEST))
