"""Downstream datasets in their standard layouts -> labelled inputs per split -> shard folders.

Each adapter reads the dataset's own index files (class list, split lists or CSVs) and finds
the media files anywhere under the root by file name, so the usual unpacked variants work:
- `ucf101`: `classInd.txt`, `trainlist0N.txt`, `testlist0N.txt` (split N = 1..3) and the
  `v_<Class>_gXX_cYY.avi` videos.
- `esc50`: `meta/esc50.csv` (filename, fold, target, category) and the `.wav` clips; fold N is
  the test split, the other four the training split.
- `kinetics_sounds`: Kinetics CSVs (`label, youtube_id, time_start, time_end`) named
  train/validate/val/test.csv and videos named `<youtube_id>_<start:06d>_<end:06d>.<ext>` (or
  `<youtube_id>.<ext>`); the classes are those listed in a class file (the Kinetics-Sounds subset
  of Kinetics), else every label the CSVs name.
- `charades`: `Charades_v1_classes.txt`, `Charades_v1_{train,test}.csv` (`id`, `actions` as
  "c092 11.90 21.20;c147 0.00 12.60") and `<id>.mp4`: multi-label, every action of the video.

Videos an index lists but the folder lacks are reported and left out; an index file that is
missing or malformed is an error naming the file (and line).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pemt.data.ingest import SOUND_SUFFIXES, VIDEO_SUFFIXES, VideoInput, sample_key, write_inputs

MISSING = "missing.jsonl"


class LayoutError(ValueError):
    """The dataset folder does not have the expected layout; the message names the file."""


@dataclass
class Dataset:
    name: str
    classes: list[str]
    splits: dict[str, list[VideoInput]]
    multi_label: bool = False
    missing: list[dict[str, Any]] = field(default_factory=list)  # listed in an index, not found on disk


def _find(root: Path, name: str) -> Path:
    """The index file `name` anywhere under `root`."""
    found = sorted(root.rglob(name))
    if not found:
        raise LayoutError(f"{root}: no {name} found (is this the dataset's root folder?)")
    return found[0]


def _media(root: Path, suffixes: set[str]) -> dict[str, Path]:
    """Media files under `root` by lower-cased stem (releases disagree on case)."""
    return {p.stem.lower(): p for p in sorted(root.rglob("*")) if p.suffix.lower() in suffixes}


def _input(
    media: dict[str, Path], stem: str, root: Path, missing: list[dict[str, Any]], where: str, **labels: Any
) -> VideoInput | None:
    path = media.get(stem.lower())
    if path is None:
        missing.append({"name": stem, "listed_in": where})
        return None
    return VideoInput(str(path), sample_key(path.relative_to(root)), **labels)


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    return [(n, line.split()) for n, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]


def ucf101(root: Path, split: int = 1) -> Dataset:
    if split not in (1, 2, 3):
        raise LayoutError(f"UCF-101 has splits 1, 2, 3, not {split}")
    class_file = _find(root, "classInd.txt")
    classes = []
    for number, parts in _lines(class_file):
        if len(parts) != 2 or not parts[0].isdigit():
            raise LayoutError(f"{class_file}:{number}: expected '<index> <ClassName>', got {' '.join(parts)!r}")
        classes.append(parts[1])
    index = {name.lower(): i for i, name in enumerate(classes)}
    media, splits = _media(root, VIDEO_SUFFIXES), {}
    missing: list[dict[str, Any]] = []
    for split_name, list_name in (("train", f"trainlist0{split}.txt"), ("test", f"testlist0{split}.txt")):
        list_file = _find(root, list_name)
        inputs = []
        for number, parts in _lines(list_file):
            relative = Path(parts[0])
            folder = relative.parent.name.lower()
            if folder not in index:
                raise LayoutError(f"{list_file}:{number}: class folder {relative.parent.name!r} is not in {class_file}")
            item = _input(media, relative.stem, root, missing, list_file.name, label=index[folder])
            if item:
                inputs.append(item)
        splits[split_name] = inputs
    return Dataset("ucf101", classes, splits, missing=missing)


def esc50(root: Path, split: int = 1) -> Dataset:
    if split not in range(1, 6):
        raise LayoutError(f"ESC-50 has folds 1..5, not {split}")
    meta = _find(root, "esc50.csv")
    rows = _csv(meta, ("filename", "fold", "target", "category"))
    names = {int(r["target"]): r["category"] for r in rows}
    classes = [names.get(i, str(i)) for i in range(max(names) + 1)]
    media = _media(root, SOUND_SUFFIXES)
    missing: list[dict[str, Any]] = []
    splits: dict[str, list[VideoInput]] = {"train": [], "test": []}
    for row in rows:
        item = _input(media, Path(row["filename"]).stem, root, missing, meta.name, label=int(row["target"]))
        if item:
            splits["test" if int(row["fold"]) == split else "train"].append(item)
    return Dataset("esc50", classes, splits, missing=missing)


def kinetics_sounds(root: Path, classes_file: Path | None = None) -> Dataset:
    tables = {}
    for split_name, candidates in (
        ("train", ("train.csv",)),
        ("val", ("validate.csv", "val.csv")),
        ("test", ("test.csv",)),
    ):
        found = [p for name in candidates for p in sorted(root.rglob(name))]
        if found:
            tables[split_name] = (found[0], _csv(found[0], ("label", "youtube_id", "time_start", "time_end")))
    if "train" not in tables:
        raise LayoutError(f"{root}: no train.csv found (Kinetics annotations: label, youtube_id, time_start, time_end)")
    if classes_file is not None:
        classes = [line.strip() for line in Path(classes_file).read_text().splitlines() if line.strip()]
    else:
        classes = sorted({r["label"] for _, rows in tables.values() for r in rows})
    index = {name: i for i, name in enumerate(classes)}
    media, splits = _media(root, VIDEO_SUFFIXES), {}
    missing: list[dict[str, Any]] = []
    for split_name, (table, rows) in tables.items():
        inputs = []
        for row in rows:
            if row["label"] not in index:  # a Kinetics class outside the chosen subset
                continue
            clip = f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
            stem = clip if clip.lower() in media else row["youtube_id"]
            item = _input(media, stem, root, missing, table.name, label=index[row["label"]])
            if item:
                inputs.append(item)
        splits[split_name] = inputs
    return Dataset("kinetics_sounds", classes, splits, missing=missing)


def charades(root: Path) -> Dataset:
    class_file = _find(root, "Charades_v1_classes.txt")
    codes = []
    for number, parts in _lines(class_file):
        if not parts or not parts[0].startswith("c"):
            raise LayoutError(f"{class_file}:{number}: expected 'cNNN <description>', got {' '.join(parts)!r}")
        codes.append((parts[0], " ".join(parts[1:])))
    index = {code: i for i, (code, _) in enumerate(codes)}
    media, splits = _media(root, VIDEO_SUFFIXES), {}
    missing: list[dict[str, Any]] = []
    for split_name in ("train", "test"):
        table = _find(root, f"Charades_v1_{split_name}.csv")
        inputs = []
        for number, row in enumerate(_csv(table, ("id", "actions")), start=2):
            labels = set()
            for action in filter(None, (a.strip() for a in (row["actions"] or "").split(";"))):
                code = action.split()[0]
                if code not in index:
                    raise LayoutError(f"{table}:{number}: action {code!r} is not in {class_file}")
                labels.add(index[code])
            item = _input(media, row["id"], root, missing, table.name, labels=tuple(sorted(labels)))
            if item:
                inputs.append(item)
        splits[split_name] = inputs
    return Dataset("charades", [name for _, name in codes], splits, multi_label=True, missing=missing)


def _csv(path: Path, needed: tuple[str, ...]) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        absent = [c for c in needed if c not in (reader.fieldnames or [])]
        if absent:
            raise LayoutError(f"{path}: missing column(s) {absent} (has {reader.fieldnames})")
        return list(reader)


ADAPTERS: dict[str, Callable[..., Dataset]] = {
    "ucf101": ucf101,
    "esc50": esc50,
    "kinetics_sounds": kinetics_sounds,
    "charades": charades,
}


def write_dataset(
    dataset: Dataset, out_dir: Path, samples_per_shard: int, processes: int = 2, progress: bool = True
) -> dict[str, dict[str, Any]]:
    """One shard folder per split under `out_dir`, each manifest naming the classes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MISSING).write_text("".join(json.dumps(m) + "\n" for m in dataset.missing))
    manifests = {}
    for split, inputs in dataset.splits.items():
        if not inputs:
            continue
        extra = {
            "dataset": dataset.name,
            "split": split,
            "classes": dataset.classes,
            "multi_label": dataset.multi_label,
        }
        manifests[split] = write_inputs(inputs, out_dir / split, samples_per_shard, None, processes, progress, extra)
    if not manifests:
        raise LayoutError(f"{dataset.name}: none of the listed files were found (see {out_dir / MISSING})")
    return manifests
