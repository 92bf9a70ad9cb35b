"""Compare runs: a table and PNG plots of loss, throughput and memory against step.

See pemt/apps/compare.py (installed: `pemt-compare`)."""

import sys

from pemt.apps.compare import main

if __name__ == "__main__":
    sys.exit(main())
