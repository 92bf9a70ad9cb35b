"""Turn a downstream dataset in its standard layout into shard folders, one per split.

    python tools/make_downstream.py ucf101 ROOT OUT [--split 1]            # OUT/train, OUT/test
    python tools/make_downstream.py esc50 ROOT OUT [--split 1]             # fold 1 is OUT/test
    python tools/make_downstream.py kinetics_sounds ROOT OUT [--classes kinetics_sounds.txt]
    python tools/make_downstream.py charades ROOT OUT                      # multi-label

Each split's manifest names the classes; fine-tune with
`python launch/finetune.py data=shards data.shards=OUT/train eval.shards=OUT/test task=...`.
Videos an index lists but ROOT lacks are left out and listed in OUT/missing.jsonl. Run it
again after an interruption: finished shards are kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pemt.data.adapters import ADAPTERS, LayoutError, write_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(ADAPTERS))
    parser.add_argument("root", type=Path, help="the dataset's folder as released")
    parser.add_argument("out", type=Path)
    parser.add_argument("--split", type=int, default=1, help="UCF-101 split (1-3) or ESC-50 test fold (1-5)")
    parser.add_argument("--classes", type=Path, help="Kinetics-Sounds: file with the class names, one per line")
    parser.add_argument("--samples", type=int, default=64, help="samples per shard")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    options = {
        "ucf101": {"split": args.split},
        "esc50": {"split": args.split},
        "kinetics_sounds": {"classes_file": args.classes},
        "charades": {},
    }[args.dataset]
    try:
        dataset = ADAPTERS[args.dataset](args.root, **options)
        manifests = write_dataset(dataset, args.out, args.samples, args.processes)
    except LayoutError as err:
        print(f"make_downstream: {err}", file=sys.stderr)
        return 2
    for split, manifest in manifests.items():
        print(
            f"{split}: {manifest['samples']} samples in {len(manifest['shards'])} shards at {args.out / split}"
            f" ({manifest['skipped']} unreadable)"
        )
    print(
        f"{len(dataset.classes)} classes; {len(dataset.missing)} listed files not found"
        + (f" (see {args.out / 'missing.jsonl'})" if dataset.missing else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
