"""Index a WebDataset corpus ahead of training: the sample count of every shard, read from the tar
headers only (no media), in parallel, local or remote (ranged reads), kept where the loader finds it.

    python tools/index_shards.py /data/k700                           # a folder of .tar files
    python tools/index_shards.py '/data/k700/{000000..001023}.tar'     # a brace pattern (quote it)
    python tools/index_shards.py 's3://bucket/k700/shard-{0000..0999}.tar' --cache outputs/.cache
    python tools/index_shards.py shards.txt                           # a list file: a shard per line

Training with `data=shards data.shards=<the same>` builds the index itself when there is none; this
does it once, ahead, for a huge or read-only corpus. The index is kept beside the shards when their
folder is writable, else under `--cache` (a run's `paths.cache`, default outputs/.cache), and reused
while every shard keeps its size (and a local one its modification time). See
pemt/data/shard_sets.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", help="a folder or s3:// prefix of .tar files, a brace pattern, or a list file")
    parser.add_argument(
        "--cache", type=Path, default=Path("outputs/.cache"), help="where to keep the index if not beside the shards"
    )
    args = parser.parse_args(argv)
    from pemt.data.shard_sets import has_manifest, index_shards
    from pemt.data.storage import StorageError

    try:
        if has_manifest(args.shards):
            print(f"{args.shards} has its manifest.json already: nothing to index")
            return 0
        manifest, kept = index_shards(args.shards, args.cache.resolve())
    except (OSError, ValueError, StorageError) as err:
        print(f"index_shards: {err}", file=sys.stderr)
        return 2
    where = f"kept at {kept}" if kept else "not kept: neither beside the shards nor under --cache is writable"
    print(f"{manifest['samples']} samples in {len(manifest['shards'])} shards; index {where}")
    return 0 if kept else 1


if __name__ == "__main__":
    sys.exit(main())
