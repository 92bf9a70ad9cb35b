"""Write the synthetic audio-visual set (real mp4: h264 + aac) as WebDataset shards.

See pemt/apps/make_synthetic.py (installed: `pemt-make-synthetic`)."""

import sys

from pemt.apps.make_synthetic import main

if __name__ == "__main__":
    main(sys.argv[1:])
