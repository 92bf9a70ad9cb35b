"""Copy a shard folder to an S3-compatible bucket or an HTTP server.

See pemt/apps/upload_shards.py (installed: `pemt-upload-shards`)."""

import sys

from pemt.apps.upload_shards import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
