"""Export a run's newest complete checkpoint as one fp32 safetensors file, loadable without DeepSpeed.

See pemt/apps/export.py (installed: `pemt-export`)."""

import sys

from pemt.apps.export import main

if __name__ == "__main__":
    sys.exit(main())
