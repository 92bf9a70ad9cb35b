"""Parameters per component of the pretraining model for any config.

    python tools/count_params.py model=avbert_base [overrides...] [--json]

Overrides are Hydra overrides of configs/pretrain.yaml, e.g. model.sharing=[layer] or
model.factorized.rank=64.
"""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=avbert_base")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    # imported here, not at the top: --help answers without loading torch
    from pemt.config import compose_config
    from pemt.model.factory import describe_counts

    cfg = compose_config("pretrain", overrides=args.overrides)
    rows = describe_counts(cfg)  # on the meta device: nothing allocated
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        width = max(map(len, rows))
        print(f"{'component':<{width}}  {'parameters':>13}  {'millions':>9}")
        for name, value in rows.items():
            rule = "-" * (width + 26) + "\n" if name in ("transformers", "total") else ""
            print(f"{rule}{name:<{width}}  {value:>13,}  {value / 1e6:>9.2f}")
    return rows


def cli() -> int:
    """The console script: exit 0 once done (errors exit through argparse with their own code)."""
    main()
    return 0


if __name__ == "__main__":
    main()
