"""Video files -> WebDataset shards with a manifest, in parallel and restartable.

A `<name>.flac` beside a video is stored as its sound; a sound file alone (.wav, .flac: ESC-50)
is stored as an audio-only sample. Labels are one class (`label`) or several (`labels`, for
multi-label sets such as Charades). Inputs are split into shards up front (by sample count or
bytes, in input order), so the same inputs always give the same shards. Each shard is written
by a worker process to a temporary name and renamed when complete, then recorded in
`progress.jsonl`; a restarted run keeps the shards recorded there and writes only the rest, so
it finishes without duplicates. Inputs that cannot be opened are skipped and listed with the
reason in `skipped.jsonl`.
"""

from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import av
from tqdm import tqdm

from pemt.data.shards import MANIFEST, describe_shard

VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v"}
SOUND_SUFFIXES = {".wav", ".flac"}
PROGRESS = "progress.jsonl"
SKIPPED = "skipped.jsonl"


@dataclass(frozen=True)
class VideoInput:
    path: str
    key: str
    label: int = -1
    labels: tuple[int, ...] = ()   # multi-label: every class of the video

    def metadata(self) -> dict:
        meta: dict = {"id": self.key, "label": self.label, "source": self.path}
        if self.labels:
            meta["labels"] = list(self.labels)
        return meta


def read_inputs(source: Path) -> list[VideoInput]:
    """A folder (searched recursively), or a .csv / .jsonl with `path` and optional `label`, `id`."""
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
        return [VideoInput(str(p), sample_key(p.relative_to(source))) for p in paths]
    if source.suffix == ".csv":
        with source.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    elif source.suffix == ".jsonl":
        rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    else:
        raise ValueError(f"{source}: give a folder of videos, a .csv or a .jsonl list")
    inputs = []
    for number, row in enumerate(rows, start=1):
        if "path" not in row:
            raise ValueError(f"{source}: entry {number} has no 'path' ({row})")
        path = Path(row["path"]) if Path(row["path"]).is_absolute() else source.parent / row["path"]
        inputs.append(VideoInput(str(path), str(row.get("id") or sample_key(Path(row["path"]))),
                                 int(row.get("label", -1) or -1)))
    return inputs


def sample_key(relative: Path) -> str:
    # WebDataset splits keys from extensions at the first dot; keep keys dot-free.
    return str(relative.with_suffix("")).replace(os.sep, "__").replace(".", "_")


def plan_shards(inputs: list[VideoInput], max_samples: int | None, max_bytes: int | None) -> list[list[VideoInput]]:
    groups: list[list[VideoInput]] = [[]]
    size = 0
    for item in inputs:
        item_bytes = os.path.getsize(item.path) if os.path.exists(item.path) else 0
        full = (max_samples and len(groups[-1]) >= max_samples) or (max_bytes and size + item_bytes > max_bytes)
        if groups[-1] and full:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item_bytes
    return [g for g in groups if g]


def probe(path: str) -> dict:
    """Duration and fps of a video (duration of a sound file); raises ValueError with the reason
    if it is not usable."""
    if Path(path).suffix.lower() in SOUND_SUFFIXES:
        return _probe_sound(path)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError("no video track")
            video = container.streams.video[0]
            next(container.decode(video))  # one frame proves the codec works
            duration = float(container.duration / av.time_base) if container.duration else None
            return {"duration": duration, "fps": float(video.average_rate or 0) or None,
                    "has_audio": bool(container.streams.audio)}
    except (av.error.FFmpegError, StopIteration, OSError) as err:
        raise ValueError(f"unreadable video: {err}") from err


def _probe_sound(path: str) -> dict:
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise ValueError("no audio track")
            next(container.decode(container.streams.audio[0]))
            duration = float(container.duration / av.time_base) if container.duration else None
            return {"duration": duration, "fps": None, "has_audio": True}
    except (av.error.FFmpegError, StopIteration, OSError) as err:
        raise ValueError(f"unreadable sound: {err}") from err


def write_shard(index: int, items: list[VideoInput], out_dir: str) -> tuple[dict | None, list[dict]]:
    """Write one shard atomically; return its manifest entry and the skipped inputs."""
    import webdataset as wds

    name = f"shard-{index:06d}.tar"
    final, partial = Path(out_dir) / name, Path(out_dir) / f".{name}.partial"
    skipped, written = [], 0
    with wds.TarWriter(str(partial)) as writer:
        for item in items:
            try:
                meta = probe(item.path)
                data = Path(item.path).read_bytes()
            except (ValueError, OSError) as err:
                skipped.append({"path": item.path, "reason": str(err)})
                continue
            meta.update(item.metadata())
            suffix = Path(item.path).suffix.lower()
            member = suffix[1:] if suffix in SOUND_SUFFIXES else "mp4"
            sample = {"__key__": item.key, member: data, "json": json.dumps(meta).encode()}
            flac = Path(item.path).with_suffix(".flac")
            if member == "mp4" and flac.exists():  # the sound as a separate file beside the video
                sample["flac"] = flac.read_bytes()
            writer.write(sample)
            written += 1
    if not written:
        partial.unlink()
        return None, skipped
    partial.rename(final)
    return {**describe_shard(final), "samples": written}, skipped


def make_shards(source: Path, out_dir: Path, max_samples: int | None = None, max_mb: float | None = None,
                processes: int = 2, progress: bool = True) -> dict:
    """Write (or finish writing) the shards of `source` into `out_dir`; returns the manifest."""
    inputs = read_inputs(source)
    if not inputs:
        raise FileNotFoundError(f"{source}: no video files found ({', '.join(sorted(VIDEO_SUFFIXES))})")
    return write_inputs(inputs, out_dir, max_samples, max_mb, processes, progress, {"source": str(source)})


def write_inputs(inputs: list[VideoInput], out_dir: Path, max_samples: int | None = None,
                 max_mb: float | None = None, processes: int = 2, progress: bool = True,
                 extra: dict | None = None) -> dict:
    """Write (or finish writing) shards of `inputs` into `out_dir`; `extra` goes into the manifest."""
    if not max_samples and not max_mb:
        raise ValueError("give a shard size: samples per shard or megabytes per shard")
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = plan_shards(inputs, max_samples, int(max_mb * 2**20) if max_mb else None)
    done = _recorded(out_dir / PROGRESS)
    for stale in out_dir.glob(".shard-*.partial"):  # left by an interrupted run
        stale.unlink()
    todo = [i for i in range(len(groups)) if i not in done]
    with ProcessPoolExecutor(max_workers=processes) as pool, (out_dir / PROGRESS).open("a") as log:
        futures = {pool.submit(write_shard, i, groups[i], str(out_dir)): i for i in todo}
        for future in tqdm(as_completed(futures), total=len(futures), desc=f"shards {out_dir.name}",
                           disable=not progress):
            entry, skipped = future.result()
            record = {"index": futures[future], "shard": entry, "skipped": skipped}
            log.write(json.dumps(record) + "\n")
            log.flush()
            done[record["index"]] = record
    shards = [done[i]["shard"] for i in sorted(done) if done[i]["shard"]]
    skipped = [s for i in sorted(done) for s in done[i]["skipped"]]
    (out_dir / SKIPPED).write_text("".join(json.dumps(s) + "\n" for s in skipped))
    manifest = {"shards": shards, "samples": sum(s["samples"] for s in shards), "skipped": len(skipped),
                **(extra or {})}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _recorded(progress_file: Path) -> dict[int, dict]:
    """Shards finished by earlier runs whose files are still there."""
    if not progress_file.exists():
        return {}
    done = {}
    for line in progress_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by the interruption
            continue
        shard = record["shard"]
        if shard is None or (progress_file.parent / shard["name"]).exists():
            done[record["index"]] = record
    return done
