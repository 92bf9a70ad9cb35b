"""Spoken and handwritten digits as real audio-visual videos, packed into train and held-out shards.

See pemt/apps/make_av_digits.py (installed: `pemt-make-av-digits`)."""

import sys

from pemt.apps.make_av_digits import main

if __name__ == "__main__":
    main(sys.argv[1:])
