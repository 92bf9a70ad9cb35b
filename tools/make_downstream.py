"""Turn a downstream dataset in its standard layout into shard folders, one per split.

See pemt/apps/make_downstream.py (installed: `pemt-make-downstream`)."""

import sys

from pemt.apps.make_downstream import main

if __name__ == "__main__":
    sys.exit(main())
