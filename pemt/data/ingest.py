"""Video files -> WebDataset shards with a manifest, in parallel and restartable.

A `<name>.flac` beside a video is stored as its sound; a sound file alone (.wav, .flac: ESC-50)
is stored as an audio-only sample. Labels are one class (`label`) or several (`labels`, for
multi-label sets such as Charades). Inputs are split into shards up front (by sample count or
bytes, in input order), so the same inputs always give the same shards. Each shard is written
by a worker process to a temporary name and renamed when complete, then recorded in
`progress.jsonl`; a restarted run keeps the shards recorded there and writes only the rest, so
it finishes without duplicates. Inputs that cannot be opened are skipped and listed with the
reason in `skipped.jsonl`. `plan.json` records what the shards are made of (inputs, shard
size, transform): a run with other ones refuses to mix them into the same folder.

With a `Transcode`, each video is re-encoded while it is packed (smaller, at most a frame rate,
a keyframe a second: pemt.data.transcode) and the manifest records the transform, so the loader
can warn when a config asks for more pixels or frames than the shards hold.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
from tqdm import tqdm

from pemt.data.shards import MANIFEST, describe_shard
from pemt.data.transcode import Transcode, transcode

VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v"}
SOUND_SUFFIXES = {".wav", ".flac"}
PROGRESS = "progress.jsonl"
SKIPPED = "skipped.jsonl"
PLAN = "plan.json"


# Columns of a list file that say where a video is and what its class is; any other column is
# carried into the sample's metadata as it is.
LISTED = ("path", "id", "label", "labels")


@dataclass(frozen=True)
class VideoInput:
    path: str
    key: str
    label: int = -1
    labels: tuple[int, ...] = ()  # multi-label: every class of the video
    extra: tuple[tuple[str, Any], ...] = ()  # other fields of its list entry, kept in its metadata

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {**dict(self.extra), "id": self.key, "label": self.label, "source": self.path}
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
        extra = tuple(sorted((k, v) for k, v in row.items() if k not in LISTED))
        key = str(row.get("id") or sample_key(Path(row["path"])))
        label = row.get("label")  # class 0 is a label: only a missing or empty one is none
        inputs.append(VideoInput(str(path), key, -1 if label in (None, "") else int(label), extra=extra))
    return inputs


def sample_key(relative: Path) -> str:
    # WebDataset splits keys from extensions at the first dot; keep keys dot-free.
    return str(relative.with_suffix("")).replace(os.sep, "__").replace(".", "_")


def unique_keys(inputs: list[VideoInput]) -> list[VideoInput]:
    """Distinct inputs whose keys came out the same (`a/b.mp4` and `a__b.mp4`, `a.b.mp4` and
    `a_b.mp4`) get their path's hash appended: a key names one video."""
    seen: dict[str, int] = {}
    for item in inputs:
        seen[item.key] = seen.get(item.key, 0) + 1
    return [
        item
        if seen[item.key] == 1
        else VideoInput(
            item.path,
            f"{item.key}-{hashlib.sha1(item.path.encode()).hexdigest()[:10]}",
            item.label,
            item.labels,
            item.extra,
        )
        for item in inputs
    ]


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


def probe(path: str) -> dict[str, Any]:
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
            return {
                "duration": duration,
                "fps": float(video.average_rate or 0) or None,
                "has_audio": bool(container.streams.audio),
            }
    except (av.error.FFmpegError, StopIteration, OSError) as err:
        raise ValueError(f"unreadable video: {err}") from err


def _probe_sound(path: str) -> dict[str, Any]:
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise ValueError("no audio track")
            next(container.decode(container.streams.audio[0]))
            duration = float(container.duration / av.time_base) if container.duration else None
            return {"duration": duration, "fps": None, "has_audio": True}
    except (av.error.FFmpegError, StopIteration, OSError) as err:
        raise ValueError(f"unreadable sound: {err}") from err


def _sample(item: VideoInput, recode: Transcode | None, keep_original: bool) -> dict[str, Any]:
    """One input as a shard sample; raises ValueError or OSError with the reason if unusable."""
    suffix = Path(item.path).suffix.lower()
    if suffix in SOUND_SUFFIXES:
        meta, member, data = probe(item.path), suffix[1:], Path(item.path).read_bytes()
    elif recode is not None:
        data, facts = transcode(item.path, recode)
        meta, member = {**facts, "has_audio": True}, "mp4"
    else:
        meta, member, data = probe(item.path), "mp4", Path(item.path).read_bytes()
    meta.update(item.metadata())
    sample = {"__key__": item.key, member: data, "json": json.dumps(meta).encode()}
    if recode is not None and keep_original and member == "mp4":
        sample[f"original{suffix}"] = Path(item.path).read_bytes()
    flac = Path(item.path).with_suffix(".flac")
    if member == "mp4" and flac.exists():  # the sound as a separate file beside the video
        sample["flac"] = flac.read_bytes()
    return sample


def write_shard(
    index: int, items: list[VideoInput], out_dir: str, recode: Transcode | None = None, keep_original: bool = False
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Write one shard atomically; return its manifest entry and the skipped inputs."""
    import webdataset as wds

    name = f"shard-{index:06d}.tar"
    final, partial = Path(out_dir) / name, Path(out_dir) / f".{name}.partial"
    skipped, written = [], 0
    with wds.TarWriter(str(partial)) as writer:
        for item in items:
            try:
                sample = _sample(item, recode, keep_original)
            except (ValueError, OSError) as err:
                skipped.append({"path": item.path, "reason": str(err)})
                continue
            writer.write(sample)
            written += 1
    if not written:
        partial.unlink()
        return None, skipped
    partial.rename(final)
    return {**describe_shard(final), "samples": written}, skipped


def make_shards(
    source: Path,
    out_dir: Path,
    max_samples: int | None = None,
    max_mb: float | None = None,
    processes: int = 2,
    progress: bool = True,
    recode: Transcode | None = None,
    keep_original: bool = False,
    restart: bool = False,
) -> dict[str, Any]:
    """Write (or finish writing) the shards of `source` into `out_dir`; returns the manifest."""
    inputs = read_inputs(source)
    if not inputs:
        raise FileNotFoundError(f"{source}: no video files found ({', '.join(sorted(VIDEO_SUFFIXES))})")
    return write_inputs(
        inputs,
        out_dir,
        max_samples,
        max_mb,
        processes,
        progress,
        {"source": str(source)},
        recode=recode,
        keep_original=keep_original,
        restart=restart,
    )


def check_plan(out_dir: Path, plan: dict[str, Any], restart: bool) -> None:
    """Refuse to finish a folder begun with other inputs, shard size or transform (or, with
    `restart`, start it afresh): shards of two groupings must never mix."""
    recorded = out_dir / PLAN
    begun = any(out_dir.glob("progress*.jsonl")) or any(out_dir.glob("shard-*.tar"))
    if restart:
        written = [*out_dir.glob("shard-*.tar"), *out_dir.glob("progress*.jsonl")]
        for path in [*written, out_dir / SKIPPED, out_dir / MANIFEST]:
            path.unlink(missing_ok=True)
    elif begun and recorded.exists():
        before = json.loads(recorded.read_text())
        changed = sorted(k for k in plan if before.get(k) != plan[k])
        if changed:
            raise ValueError(
                f"{out_dir} holds shards made with other {', '.join(changed)}; write to a new "
                "folder, or pass --restart to delete them and start again"
            )
    elif begun:
        raise ValueError(
            f"{out_dir} holds shards but no {PLAN} saying how they were made; write to a new "
            "folder, or pass --restart to delete them and start again"
        )
    recorded.write_text(json.dumps(plan, indent=1))


@dataclass(frozen=True)
class PackPlan:
    """How inputs become shards: the groups (shard i holds groups[i]), and what the folder records
    about them (`plan.json`), so a run with other inputs, shard size or transform refuses."""

    groups: list[list[VideoInput]]
    record: dict[str, Any]


def plan_inputs(
    inputs: list[VideoInput],
    max_samples: int | None = None,
    max_mb: float | None = None,
    recode: Transcode | None = None,
    keep_original: bool = False,
) -> PackPlan:
    """The shards `inputs` make, in input order: the same inputs always give the same shards."""
    if not max_samples and not max_mb:
        raise ValueError("give a shard size: samples per shard or megabytes per shard")
    inputs = unique_keys(inputs)
    described = [[i.path, i.key, i.label, list(i.labels), *([dict(i.extra)] if i.extra else [])] for i in inputs]
    listing = hashlib.sha256(json.dumps(described).encode())
    record = {
        "inputs": listing.hexdigest(),
        "samples_per_shard": max_samples,
        "mb_per_shard": max_mb,
        "transcode": recode.describe() if recode else None,
        "keep_original": keep_original if recode else None,
    }
    return PackPlan(plan_shards(inputs, max_samples, int(max_mb * 2**20) if max_mb else None), record)


def write_slice(
    plan: PackPlan,
    out_dir: Path,
    indices: list[int],
    progress_file: Path,
    processes: int = 2,
    progress: bool = True,
    recode: Transcode | None = None,
    keep_original: bool = False,
) -> int:
    """Write the shards `indices` of `plan` not recorded yet (in any progress file of the folder),
    recording each in `progress_file` as it is renamed into place; returns how many were written.
    Several writers (array tasks) may work in one folder on disjoint indices."""
    done = finished_shards(out_dir)
    for index in indices:  # left by an interrupted writer of these shards
        (out_dir / f".shard-{index:06d}.tar.partial").unlink(missing_ok=True)
    todo = [i for i in indices if i not in done]
    with ProcessPoolExecutor(max_workers=processes) as pool, progress_file.open("a") as log:
        if log.tell() and progress_file.read_bytes()[-1:] != b"\n":
            log.write("\n")  # the line an interruption cut stays a line of its own
        futures = {pool.submit(write_shard, i, plan.groups[i], str(out_dir), recode, keep_original): i for i in todo}
        for future in tqdm(
            as_completed(futures), total=len(futures), desc=f"shards {out_dir.name}", disable=not progress
        ):
            entry, skipped = future.result()
            log.write(json.dumps({"index": futures[future], "shard": entry, "skipped": skipped}) + "\n")
            log.flush()
    return len(todo)


def merge_manifest(
    plan: PackPlan, out_dir: Path, extra: dict[str, Any] | None = None, recode: Transcode | None = None
) -> dict[str, Any] | None:
    """The manifest of a folder whose every shard is recorded (written now, with skipped.jsonl);
    None while some are not."""
    done = finished_shards(out_dir)
    if any(i not in done for i in range(len(plan.groups))):
        return None
    shards = [done[i]["shard"] for i in sorted(done) if done[i]["shard"]]
    skipped = [s for i in sorted(done) for s in done[i]["skipped"]]
    (out_dir / SKIPPED).write_text("".join(json.dumps(s) + "\n" for s in skipped))
    manifest = {
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "skipped": len(skipped),
        **({"transcode": recode.describe()} if recode else {}),
        **(extra or {}),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def write_inputs(
    inputs: list[VideoInput],
    out_dir: Path,
    max_samples: int | None = None,
    max_mb: float | None = None,
    processes: int = 2,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
    recode: Transcode | None = None,
    keep_original: bool = False,
    restart: bool = False,
) -> dict[str, Any]:
    """Write (or finish writing) shards of `inputs` into `out_dir`; `extra` goes into the manifest.
    `--mb` groups by the source files' sizes (a transcoded shard is smaller)."""
    plan = plan_inputs(inputs, max_samples, max_mb, recode, keep_original)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_plan(out_dir, plan.record, restart)
    every = list(range(len(plan.groups)))
    write_slice(plan, out_dir, every, out_dir / PROGRESS, processes, progress, recode, keep_original)
    manifest = merge_manifest(plan, out_dir, extra, recode)
    assert manifest is not None, "every shard was written"
    return manifest


def finished_shards(out_dir: Path) -> dict[int, dict[str, Any]]:
    """Shards finished by earlier runs (one machine's `progress.jsonl`, or an array task's
    `progress-task-NNNN.jsonl`) whose files are still there."""
    done = {}
    for progress_file in sorted(out_dir.glob("progress*.jsonl")):
        for line in progress_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by the interruption
                continue
            shard = record["shard"]
            if shard is None or (out_dir / shard["name"]).exists():
                done[record["index"]] = record
    return done
