"""Copy a shard folder to where the cluster reads it: an S3-compatible bucket or an HTTP server
that accepts PUT.

    python tools/upload_shards.py FOLDER s3://bucket/prefix

Shards first, the manifest last; shards already there (same size) are skipped, so an interrupted
upload continues where it stopped. S3 credentials and endpoint come from the AWS environment
(AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL_S3, ~/.aws); training then reads `data.shards=s3://bucket/prefix`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pemt.data.storage import check_location, is_remote


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a shard folder with its manifest.json")
    parser.add_argument("location", help="s3://bucket/prefix or http(s)://host/prefix")
    args = parser.parse_args(argv)
    # imported here, not at the top: --help answers without loading torch
    from pemt.data.shards import upload_shards

    if not is_remote(args.location):
        parser.error(f"{args.location}: not an s3:// or http(s):// location (copy local folders with cp)")
    try:
        check_location(args.location, "location")
        sent = upload_shards(args.folder, args.location)
    except (OSError, ValueError) as err:  # unreachable, denied, not a shard folder
        print(f"upload failed: {err}", file=sys.stderr)
        return 1
    print(f"{sent} files sent to {args.location}")
    return 0


def cli() -> int:
    return main()


if __name__ == "__main__":
    sys.exit(main())
