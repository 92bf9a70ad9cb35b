"""Pack video files into WebDataset shards with a manifest, optionally transcoding them.

    python tools/make_shards.py SOURCE OUT_DIR (--samples N | --mb M) [--processes P]
    python tools/make_shards.py SOURCE OUT_DIR --samples 64 --short-side 128 --fps 16   # decode 10x+ cheaper

SOURCE is a folder of videos (searched recursively), or a .csv / .jsonl list with a `path`
column and optional `label` and `id` (any other column is kept in each sample's metadata).
Videos are stored as they are unless a transform is given: `--short-side` and `--fps` re-encode
each one to H.264 (CRF `--crf`, a keyframe a second) while packing, once, instead of paying for
full-size decoding every epoch; the sound is kept as it is unless `--sample-rate` resamples it
(AAC). Inputs that cannot be read are skipped and listed in OUT_DIR/skipped.jsonl. Run it again
after an interruption: finished shards are kept and the rest is written, without duplicates; a
run with other inputs, shard size or transform refuses
(--restart deletes the folder's shards and starts again). `--upload s3://bucket/prefix` (or an
http(s):// server that takes PUT) then copies the folder there, shards first and the manifest
last, skipping shards already uploaded (see tools/upload_shards.py).

On a Slurm cluster, `--slurm TASKS` packs as one job array of TASKS tasks (each with
`--cpus-per-task` processes), the shards a one-machine run makes, split in fixed slices: a task
killed mid-way keeps its finished shards, and running the command again submits only the slices
with unfinished shards and merges the manifest once every shard is written. `--status OUT` says
where it stands. SOURCE and OUT must be on a file system every node sees (pemt/cluster/packing.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pemt.data.ingest import make_shards
from pemt.data.shards import upload_shards
from pemt.data.storage import check_location, is_remote
from pemt.data.transcode import Transcode


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("out_dir", type=Path)
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--samples", type=int, help="videos per shard")
    size.add_argument("--mb", type=float, help="megabytes of source files per shard")
    parser.add_argument("--processes", type=int, default=2)
    recode = parser.add_argument_group("transcoding (any of --short-side, --fps, --sample-rate turns it on)")
    recode.add_argument("--short-side", type=int, help="pixels of the shorter side (>= data.crop)")
    recode.add_argument("--fps", type=float, help="at most this many frames per second (>= data.fps)")
    recode.add_argument("--crf", type=int, default=23, help="x264 quality: 18 near-lossless, 23 (default), 28 small")
    recode.add_argument("--preset", default="veryfast", help="x264 speed preset (default veryfast)")
    recode.add_argument("--sample-rate", type=int, help="resample the sound to this rate (AAC); default: kept as is")
    recode.add_argument("--keep-original", action="store_true", help="also store each source file (original.<ext>)")
    parser.add_argument("--restart", action="store_true", help="delete OUT_DIR's shards and start again")
    parser.add_argument("--upload", metavar="URL", help="then copy the shards to s3://bucket/prefix or http(s)://...")
    slurm = parser.add_argument_group("a Slurm job array (--slurm TASKS turns it on)")
    slurm.add_argument("--slurm", type=int, metavar="TASKS", help="pack as one job array of TASKS tasks")
    slurm.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    slurm.add_argument("--time-min", type=int, default=240, help="each task's time limit in minutes")
    slurm.add_argument("--cpus-per-task", type=int, default=4, help="CPUs (and packing processes) of each task")
    slurm.add_argument("--parallelism", type=int, default=256, help="tasks running at once")
    args_given = sys.argv[1:] if argv is None else argv
    if args_given[:1] == ["--status"]:  # `--status OUT`: what the array packing of OUT recorded
        return _status(parser, args_given[1:])
    args = parser.parse_args(argv)
    if args.slurm is not None and args.slurm < 1:
        parser.error(f"--slurm {args.slurm}: give a number of tasks >= 1")
    if args.upload:
        try:
            check_location(args.upload, "--upload")
        except ValueError as err:
            parser.error(str(err))
        if not is_remote(args.upload):
            parser.error(f"--upload {args.upload}: not an s3:// or http(s):// location")
    transform = None
    if args.short_side or args.fps or args.sample_rate:
        try:
            transform = Transcode(args.short_side, args.fps, args.crf, args.preset, args.sample_rate)
        except ValueError as err:
            parser.error(str(err))
    if args.slurm:
        return _on_slurm(parser, args, transform)
    try:
        manifest = make_shards(
            args.source,
            args.out_dir,
            args.samples,
            args.mb,
            args.processes,
            recode=transform,
            keep_original=args.keep_original,
            restart=args.restart,
        )
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"make_shards: {err}\n")
    print(
        f"{manifest['samples']} videos in {len(manifest['shards'])} shards at {args.out_dir}; "
        f"{manifest['skipped']} skipped (see {args.out_dir / 'skipped.jsonl'})"
    )
    if args.upload:
        try:
            upload_shards(args.out_dir, args.upload)
        except (OSError, ValueError) as err:  # unreachable, denied, another set at the prefix
            parser.exit(1, f"make_shards: upload failed (run it again to continue): {err}\n")
        print(f"uploaded to {args.upload}: train with data=shards data.shards={args.upload}")
    return manifest


def _on_slurm(parser: argparse.ArgumentParser, args: argparse.Namespace, transform: Transcode | None) -> dict[str, Any]:
    from pemt.cluster.packing import ARRAY_SETTINGS, PackSlice, SlurmOptions, pack_on_slurm
    from pemt.data.ingest import check_plan

    pack = PackSlice(
        str(args.source.resolve()),
        str(args.out_dir.resolve()),
        args.samples,
        args.mb,
        transform,
        args.keep_original,
        args.slurm or 1,
        args.cpus_per_task,
        args.upload,
    )
    try:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        check_plan(args.out_dir, pack.plan().record, args.restart)
        pack.save(args.out_dir / ARRAY_SETTINGS)
        options = SlurmOptions(args.slurm, args.partition, args.time_min, args.cpus_per_task, args.parallelism)
        manifest = pack_on_slurm(args.out_dir, pack, options, {"source": str(args.source)})
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"make_shards: {err}\n")
    if manifest is None:
        parser.exit(1, "make_shards: not every shard is written yet (see above); run the same command again\n")
    print(
        f"{manifest['samples']} videos in {len(manifest['shards'])} shards at {args.out_dir}; "
        f"{manifest['skipped']} skipped (see {args.out_dir / 'skipped.jsonl'})"
    )
    return manifest


def _status(parser: argparse.ArgumentParser, rest: list[str]) -> dict[str, Any]:
    from pemt.cluster.packing import ARRAY_SETTINGS, PackSlice, describe_status

    if len(rest) != 1:
        parser.error("--status OUT_DIR: give the folder an array packing writes to")
    out = Path(rest[0])
    if not (out / ARRAY_SETTINGS).exists():
        parser.exit(2, f"make_shards: {out / ARRAY_SETTINGS} is missing: no array packing was submitted there\n")
    print(describe_status(out, PackSlice.load(out / ARRAY_SETTINGS)))
    return {}


def cli() -> int:
    """The console script: exit 0 once done (errors exit through argparse with their own code)."""
    main()
    return 0


if __name__ == "__main__":
    main()
