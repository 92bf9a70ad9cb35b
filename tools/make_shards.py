"""Pack video files into WebDataset shards with a manifest.

    python tools/make_shards.py SOURCE OUT_DIR (--samples N | --mb M) [--processes P]

SOURCE is a folder of videos (searched recursively), or a .csv / .jsonl list with a `path`
column and optional `label` and `id`. Videos are stored as they are (no re-encoding). Inputs
that cannot be read are skipped and listed in OUT_DIR/skipped.jsonl. Run it again after an
interruption: finished shards are kept and the rest is written, without duplicates.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pemt.data.ingest import make_shards


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("out_dir", type=Path)
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--samples", type=int, help="videos per shard")
    size.add_argument("--mb", type=float, help="megabytes per shard")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    manifest = make_shards(args.source, args.out_dir, args.samples, args.mb, args.processes)
    print(f"{manifest['samples']} videos in {len(manifest['shards'])} shards at {args.out_dir}; "
          f"{manifest['skipped']} skipped (see {args.out_dir / 'skipped.jsonl'})")
    return manifest


if __name__ == "__main__":
    main()
