"""Continue a training run after a preemption, a failure or a time limit, or say where it stands.

See pemt/apps/resume.py (installed: `pemt-resume`)."""

import sys

from pemt.apps.resume import main

if __name__ == "__main__":
    sys.exit(main())
