"""Parameters per component of the pretraining model for any config.

See pemt/apps/count_params.py (installed: `pemt-count-params`)."""

import sys

from pemt.apps.count_params import main

if __name__ == "__main__":
    main(sys.argv[1:])
