"""Index a WebDataset corpus (sample counts from the tar headers) ahead of training.

See pemt/apps/index_shards.py (installed: `pemt-index-shards`)."""

import sys

from pemt.apps.index_shards import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
