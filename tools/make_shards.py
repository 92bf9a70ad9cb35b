"""Pack video files into WebDataset shards with a manifest, optionally transcoding them.

See pemt/apps/make_shards.py (installed: `pemt-make-shards`)."""

import sys

from pemt.apps.make_shards import main

if __name__ == "__main__":
    main(sys.argv[1:])
