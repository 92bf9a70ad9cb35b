"""Export a run's newest complete checkpoint as one fp32 safetensors file, loadable without DeepSpeed.

    python tools/export.py RUN_DIR --out model.safetensors      # also writes model.yaml (the config)

Load it back (strictly, without DeepSpeed):
    from pemt.model.factory import load_exported
    model, cfg = load_exported("model.safetensors")      # reads model.yaml beside it
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    # imported here, not at the top: --help answers without loading torch
    from pemt.train.export import export_run

    try:
        weights, config = export_run(args.run_dir, args.out)
    except FileNotFoundError as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    print(f"wrote {weights} and {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
