"""Pretrain an audio-visual transformer: see pemt/apps/pretrain.py (installed: `pemt-pretrain`).

python launch/pretrain.py [overrides...]
"""

from pemt.apps.pretrain import main

if __name__ == "__main__":
    main()
