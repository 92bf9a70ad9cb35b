"""The `--set KEY=VALUE` option the benchmarks share: a config override applied to every variant."""

from __future__ import annotations

import argparse


def add_set_option(parser: argparse.ArgumentParser, example: str) -> None:
    """`--set KEY=VALUE`, repeatable, collected in `args.overrides`."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"a config override for every variant (repeatable), e.g. {example}",
    )
