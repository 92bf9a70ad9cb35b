"""What `data.shards` (and `eval.shards`) may name, and the manifest the loader orders samples by.

A shard set is any of
- a folder or prefix holding `manifest.json` (written by tools/make_shards.py, make_synthetic.py,
  make_av_digits.py, make_downstream.py);
- a folder of WebDataset `.tar` files without one (webdataset's ShardWriter, video2dataset), or an
  `s3://` prefix of them (listed);
- a brace pattern: `/data/k700/{000000..001023}.tar`, `s3://bucket/k700/shard-{0000..0999}.tar`,
  `https://host/path/{00..99}.tar`;
- a list file (`.txt`): one shard path or URL per line (relative paths: from the file's folder).

The loader needs each shard's sample count: they fix every sample's place in the order, so exact
resume works. Where there is no `manifest.json`, one is built from the tar headers only (the
members' names; no media is read), shards in parallel, remote ones by ranged reads of their
headers, and kept: beside the shards when their folder is writable
(`.pemt-manifest-<key>.json`), else in `<paths.cache>/manifests/<key>.json`, keyed by the shards'
URLs. It is reused while every shard keeps its size (and, for local files, its modification
time); a shard that changed is indexed again, and the manifest's digest then changes, so a run
that resumes on it is refused as for any changed manifest (pemt.train.continuity).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pemt.data.shards import MANIFEST, manifest_json
from pemt.data.storage import NotFound, Retry, StorageError, is_remote, join, object_size, read_bytes

LIST_SUFFIXES = (".txt", ".list")
BUILT_PREFIX = ".pemt-manifest-"
INDEX_THREADS = 16  # header reads are waits (disk seeks, requests), not computation


@dataclass(frozen=True)
class Manifest:
    """A shard set's manifest: `data` as written (shards, samples, anything else), each shard's
    location, and a digest that changes whenever the sample order would."""

    data: dict[str, Any]
    locations: tuple[str, ...]
    digest: str

    @property
    def entries(self) -> list[dict[str, Any]]:
        return list(self.data["shards"])


def is_pattern(source: str) -> bool:
    return "{" in source and ".." in source


def _is_list_file(source: str) -> bool:
    return not is_remote(source) and Path(source).suffix in LIST_SUFFIXES and Path(source).is_file()


def location(source: str, name: str) -> str:
    """Where a manifest entry's shard lies: its name inside the folder, or the name itself when
    it is a path or URL of its own (a built manifest's)."""
    if is_remote(name) or os.path.isabs(name):
        return name
    if _is_list_file(source):
        return str(Path(source).parent / name)
    return join(source, name)


def has_manifest(source: str, retry: Retry | None = None) -> bool:
    """Whether `source` is a shard folder (or prefix) with its own manifest.json."""
    if is_pattern(source) or _is_list_file(source):
        return False
    if not is_remote(source):
        return (Path(source) / MANIFEST).is_file()
    try:
        read_bytes(join(source, MANIFEST), retry)
    except NotFound:
        return False
    return True


def shard_urls(source: str, retry: Retry | None = None) -> list[str]:
    """The shards a pattern, list file or manifest-less folder names, in their order."""
    if is_pattern(source):
        from braceexpand import braceexpand

        return list(braceexpand(source))
    if _is_list_file(source):
        lines = [ln.split("#", 1)[0].strip() for ln in Path(source).read_text().splitlines()]
        return [location(source, ln) for ln in lines if ln]
    if not is_remote(source):
        if not Path(source).is_dir():
            raise FileNotFoundError(f"no shard folder at {source}")
        return [str(p) for p in sorted(Path(source).glob("*.tar"))]
    if source.startswith("s3://"):
        return _s3_tars(source)
    raise FileNotFoundError(
        f"{join(source, MANIFEST)} is missing, and an HTTP folder cannot be listed: give its shards as a "
        f"brace pattern ({source.rstrip('/')}/{{000000..000099}}.tar) or a list file, or index them with "
        "tools/index_shards.py"
    )


def _s3_tars(prefix: str) -> list[str]:
    import boto3

    parts = urlsplit(prefix)
    bucket, key = parts.netloc, parts.path.lstrip("/").rstrip("/") + "/"
    pages = boto3.session.Session().client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
    keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
    return sorted(f"s3://{bucket}/{key}" for key in keys if key.endswith(".tar"))


def _stat(url: str, retry: Retry | None) -> dict[str, Any]:
    """What says a shard is unchanged: its size, and a local file's modification time."""
    if is_remote(url):
        return {"bytes": object_size(url, retry)}
    stat = os.stat(url)
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def count_samples(url: str, retry: Retry | None = None) -> dict[str, Any]:
    """One shard's manifest entry: its location, sample count, size (and mtime), from its headers."""
    from pemt.data.members import indexed_samples

    facts = _stat(url, retry)
    try:
        samples = sum(1 for _ in indexed_samples(url, retry or Retry(), facts["bytes"]))
    except (OSError, StorageError, ValueError) as err:
        raise ValueError(f"{url}: cannot index the shard ({type(err).__name__}: {err})") from err
    return {"name": url, "samples": samples, **facts}


def key_of(urls: list[str]) -> str:
    return hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]


def _kept_at(urls: list[str], cache_dir: str | Path | None) -> list[Path]:
    """Where a built manifest is kept (the first writable place) and looked for (every place)."""
    name = f"{BUILT_PREFIX}{key_of(urls)}.json"
    places = []
    folders = {str(Path(u).parent) for u in urls if not is_remote(u)}
    if len(folders) == 1:
        places.append(Path(folders.pop()) / name)
    if cache_dir is not None:
        places.append(Path(cache_dir) / "manifests" / f"{key_of(urls)}.json")
    return places


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def _still_valid(manifest: dict[str, Any], urls: list[str], retry: Retry | None) -> bool:
    entries = manifest.get("shards", [])
    if [e["name"] for e in entries] != urls:
        return False
    with ThreadPoolExecutor(INDEX_THREADS) as pool:
        now = list(pool.map(lambda u: _stat(u, retry), urls))
    return all(all(e.get(k) == v for k, v in facts.items()) for e, facts in zip(entries, now))


def build_manifest(urls: list[str], retry: Retry | None = None, progress: bool = True) -> dict[str, Any]:
    """A manifest of these shards from their tar headers, in parallel, with a progress bar."""
    from tqdm import tqdm

    if not urls:
        raise FileNotFoundError("no .tar shards to index")
    with ThreadPoolExecutor(INDEX_THREADS) as pool:
        entries = list(
            tqdm(
                pool.map(lambda u: count_samples(u, retry), urls),
                total=len(urls),
                desc="indexing shards (tar headers)",
                disable=not progress,
                unit="shard",
            )
        )
    return {"shards": entries, "samples": sum(e["samples"] for e in entries), "indexed_by": "pemt"}


def _write(path: Path, manifest: dict[str, Any]) -> bool:
    """Write atomically; False where the place is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".partial") as handle:
            json.dump(manifest, handle, indent=1)
        os.replace(handle.name, path)
    except OSError:
        return False
    return True


def index_shards(
    source: str, cache_dir: str | Path | None, retry: Retry | None = None, progress: bool = True
) -> tuple[dict[str, Any], Path | None]:
    """The built manifest of a pattern, list file or manifest-less folder: the one kept earlier if
    every shard is unchanged, else built now and kept; and where it is kept (None: nowhere writable)."""
    urls = shard_urls(source, retry)
    if not urls:
        raise FileNotFoundError(f"{source}: no .tar shards found")
    places = _kept_at(urls, cache_dir)
    for place in places:
        if place.is_file():
            try:
                kept = json.loads(place.read_text())
            except ValueError:
                continue
            if _still_valid(kept, urls, retry):
                return kept, place
    manifest = build_manifest(urls, retry, progress)
    for place in places:
        if (not place.parent.exists() or _writable(place.parent)) and _write(place, manifest):
            return manifest, place
    return manifest, None


def load_manifest(
    source: str, cache_dir: str | Path | None = None, retry: Retry | None = None, progress: bool = False
) -> Manifest:
    """The manifest of any shard set `data.shards` may name (see the module's docstring)."""
    if has_manifest(source, retry):
        raw = read_bytes(join(source, MANIFEST), retry)
        data = manifest_json(source, retry)
        digest = hashlib.sha256(raw).hexdigest()
    else:
        data, _ = index_shards(source, cache_dir, retry, progress)
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    try:
        entries = data["shards"]
        for entry in entries:
            entry["name"], entry["samples"] = str(entry["name"]), int(entry["samples"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{source}: not a shard manifest ({err!r})") from err
    if not entries:
        raise FileNotFoundError(f"{source}: the manifest lists no shards")
    return Manifest(data, tuple(location(source, e["name"]) for e in entries), digest)


# A launch checks remote shards quickly: a server that is down fails it in seconds, not minutes
PREFLIGHT_RETRY = Retry(attempts=2, backoff_s=1.0, timeout_s=20.0)


def check_readable(source: str, cache_dir: str | None = None) -> list[dict[str, Any]]:
    """The manifest's entries (built and kept if the shard set has none),
    once the first shard is shown readable where it lies (for a remote one: reachable, allowed,
    served by byte range). Raises OSError or ValueError naming the URL."""
    manifest = load_manifest(source, cache_dir, PREFLIGHT_RETRY, progress=True)
    if is_remote(manifest.locations[0]):
        object_size(manifest.locations[0], PREFLIGHT_RETRY)
    return manifest.entries
