"""Write the synthetic audio-visual set (real mp4: h264 + aac) as WebDataset shards.

    python tools/make_synthetic.py OUT_DIR [--videos 64] [--classes 4] [--seconds 3] ...

The same generator `data=synthetic` runs before a launch; use this to make a larger set or to
look at the videos.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from pemt.data.synthetic import SyntheticSpec, generate


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    for field in fields(SyntheticSpec):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    spec = SyntheticSpec(**{f.name: getattr(args, f.name) for f in fields(SyntheticSpec)})
    out = generate(spec, args.out_dir)
    print(f"{spec.videos} videos in {out}")
    return out


def cli() -> int:
    """The console script: exit 0 once done (errors exit through argparse with their own code)."""
    main()
    return 0


if __name__ == "__main__":
    main()
