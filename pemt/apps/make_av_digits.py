"""Spoken and handwritten digits as real mp4 videos (H.264 + AAC), packed into training and
held-out shard folders by make_shards.

    python tools/make_av_digits.py OUT [--videos 1024] [--held-out 256] [--seconds 8]
    python launch/pretrain.py data=shards data.shards=OUT/train data.clips=8 data.frames_per_clip=2 \\
        data.fps=2 data.crop=48 ...                       # one token per second of the video
    python launch/finetune.py data=shards data.shards=OUT/train eval.shards=OUT/held_out ...

Each second shows a handwritten digit (scikit-learn's bundled digits, moving, beside
distractor strokes) while a voice (espeak-ng) says the same digit over noise and babble; see
pemt/data/digits.py for what a video holds and its labels (`label` is the digit shown and
spoken most often; each sample's metadata also holds `unspoken`, `shown`, `spoken`, `voices`).
The background and the voice change every second (`--nuisance second`), or stay through a video
(`--nuisance video`).
Held-out videos use digit images and voices no training video uses. Videos are written to
OUT/videos/<split>/ first (kept when an interrupted run is started again), then packed into
OUT/train and OUT/held_out; the videos folder is removed once both are packed unless
--keep-videos. Needs espeak-ng (`make speech`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pemt.data.digits import (
    GENERATOR_VERSION,
    NUISANCES,
    WORDS,
    DigitsSpec,
    MissingSpeech,
    check_espeak,
    make_video,
    video_metadata,
)
from pemt.data.ingest import read_inputs, write_inputs

DONE = "digits.json"  # written last: what the folder holds, once both splits are packed


def _write_video(spec: DigitsSpec, index: int, folder: str) -> dict[str, Any]:
    """Video `index` of `spec` as an mp4 file in `folder` (written whole or not at all; one an
    interrupted run wrote is kept); its list entry."""
    meta = video_metadata(spec, index)
    path = Path(folder) / f"{meta['id']}.mp4"
    if not path.exists():
        data, meta = make_video(spec, index)
        partial = path.with_suffix(".mp4.partial")
        partial.write_bytes(data)
        partial.rename(path)
    return {"path": path.name, **meta}


def write_split(spec: DigitsSpec, folder: Path, processes: int, progress: bool = True) -> Path:
    """The split's videos in `folder` and their list (`<folder>.jsonl`: path, id, labels); videos
    written by an earlier, interrupted run are kept."""
    listing = folder.with_suffix(".jsonl")
    if listing.exists():
        return listing
    folder.mkdir(parents=True, exist_ok=True)
    # spawn: a forked pool would inherit the parent's thread pools (OpenMP) in a state it cannot use
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
        entries = list(
            tqdm(
                pool.map(_write_video, [spec] * spec.videos, range(spec.videos), [str(folder)] * spec.videos),
                total=spec.videos,
                desc=f"digit videos ({spec.split})",
                disable=not progress,
            )
        )
    staging = listing.with_suffix(".jsonl.partial")
    staging.write_text("".join(json.dumps({**e, "path": f"{folder.name}/{e['path']}"}) + "\n" for e in entries))
    staging.rename(listing)
    return listing


def make_av_digits(
    out: Path,
    spec: DigitsSpec,
    held_out: int,
    samples_per_shard: int = 32,
    processes: int = 2,
    keep_videos: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write (or finish writing) OUT/train and OUT/held_out; returns what OUT/digits.json records."""
    check_espeak()
    done = out / DONE
    described: dict[str, Any] = {
        "train": {**asdict(spec), "split": "train"},
        "held_out": {**asdict(spec), "split": "held_out", "videos": held_out},
        "generator": GENERATOR_VERSION,
    }
    if done.exists():
        recorded = json.loads(done.read_text())
        if recorded["specs"] != json.loads(json.dumps(described)):
            raise ValueError(
                f"{out} holds digit videos made with other settings or by another version of the generator "
                f"({done}); choose another folder"
            )
        return dict(recorded)
    videos = out / "videos"
    for split, count in (("train", spec.videos), ("held_out", held_out)):
        split_spec = replace(spec, split=split, videos=count)
        listing = write_split(split_spec, videos / split, processes, progress)
        extra = {"classes": list(WORDS), "digits": asdict(split_spec)}
        write_inputs(read_inputs(listing), out / split, samples_per_shard, None, processes, progress, extra)
    record = {"specs": described, "classes": list(WORDS), "train": "train", "held_out": "held_out"}
    done.write_text(json.dumps(record, indent=1))
    if not keep_videos:
        shutil.rmtree(videos)
    return record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for train/ and held_out/ (and videos/ while it works)")
    parser.add_argument("--videos", type=int, default=1024, help="training videos")
    parser.add_argument("--held-out", type=int, default=256, help="held-out videos")
    parser.add_argument("--seconds", type=int, default=6, help="seconds per video: one digit a second")
    parser.add_argument("--size", type=int, default=32, help="frame side in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="seconds that show and say the majority digit")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument(
        "--digit-px",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=DigitsSpec.digit_px,
        help="side of a drawn digit in pixels, drawn uniformly in [MIN, MAX]",
    )
    parser.add_argument("--clutter", type=int, default=DigitsSpec.clutter, help="stroke-like distractors each second")
    parser.add_argument(
        "--nuisance",
        choices=NUISANCES,
        default="second",
        help="a new background and voice every second (the default: only the digits tie a video's seconds "
        "together), or one per video (pretraining then learns them instead of the digits)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=32)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--keep-videos", action="store_true", help="keep OUT/videos/ (the mp4 files and their lists)")
    args = parser.parse_args(argv)
    try:
        spec = DigitsSpec(
            videos=args.videos,
            seed=args.seed,
            seconds=args.seconds,
            fps=args.fps,
            size=args.size,
            repeats=args.repeats,
            digit_px=tuple(args.digit_px),
            clutter=args.clutter,
            nuisance=args.nuisance,
        )
        record = make_av_digits(args.out, spec, args.held_out, args.samples_per_shard, args.processes, args.keep_videos)
    except (ValueError, MissingSpeech) as err:
        parser.exit(2, f"make_av_digits: {err}\n")
    print(
        f"{args.videos} training and {args.held_out} held-out videos in {args.out}/train and {args.out}/held_out: "
        f"train with data=shards data.shards={args.out}/train"
    )
    return record


def cli() -> int:
    """The console script: exit 0 once done (errors exit through argparse with their own code)."""
    main()
    return 0


if __name__ == "__main__":
    main()
