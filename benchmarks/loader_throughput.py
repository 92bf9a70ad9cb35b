"""Loader throughput against the decoder it is built on.

    python benchmarks/loader_throughput.py [--videos 64 --seconds 4 --size 112 --workers 2]

Decodes the same generated mp4 files four ways and prints samples/s (a sample is a sequence of
`data.clips` clips) and clips/s per worker:
  bare PyAV   decode_clips() in a plain loop over the files: the decoder's limit;
  torch       a plain torch Dataset over the folder of mp4 files, in a DataLoader;
  pemt        pemt's resumable WebDataset stream over shards of the same files.
Then the tiny model's training step time, and the workers needed to keep it fed.
Ratios are against bare PyAV measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import math
import random
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from pemt.config import compose_config
from pemt.data.decode import decode_clips
from pemt.data.ingest import make_shards
from pemt.data.loader import build_loader, clip_spec
from pemt.data.synthetic import SyntheticSpec, make_sample
from pemt.model.factory import build_pretraining_model

HERE = Path(__file__).resolve().parent


class FolderDataset(Dataset):
    def __init__(self, files: list[Path], spec) -> None:
        self.files, self.spec = files, spec

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        return decode_clips(self.files[index].read_bytes(), self.spec, random.Random(index))


def _rate(samples: int, seconds: float) -> float:
    return samples / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    cfg = compose_config("pretrain", overrides=["data.streams=1", f"data.num_workers={args.workers}"])
    spec = clip_spec(cfg.data)
    work = Path(tempfile.mkdtemp(prefix="pemt-loader-"))
    videos = SyntheticSpec(videos=args.videos, seconds=args.seconds, size=args.size)
    files = []
    for i in range(args.videos):
        files.append(work / "videos" / f"v{i:04d}.mp4")
        files[-1].parent.mkdir(exist_ok=True)
        files[-1].write_bytes(make_sample(videos, i)["mp4"])
    make_shards(work / "videos", work / "shards", max_samples=max(1, args.videos // 8), progress=False)
    n, w = args.videos, max(1, args.workers)

    torch.set_num_threads(1)  # as in DataLoader workers
    start = time.perf_counter()
    for i, path in enumerate(files):
        decode_clips(path.read_bytes(), spec, random.Random(i))
    bare = _rate(n, time.perf_counter() - start)

    def drain(loader, batches: int) -> float:
        iterator = iter(loader)
        next(iterator)  # workers started, first batch decoded
        begin = time.perf_counter()
        for _ in range(batches - 1):
            next(iterator)
        return _rate((batches - 1) * args.batch, time.perf_counter() - begin)

    torch_rate = drain(
        DataLoader(
            FolderDataset(files, spec),
            batch_size=args.batch,
            num_workers=w,
            multiprocessing_context="forkserver",
            persistent_workers=True,
        ),
        n // args.batch,
    )
    pemt_rate = drain(build_loader(cfg.data, str(work / "shards"), args.batch, 0, 1, seed=0), n // args.batch)

    model = build_pretraining_model(cfg)
    no_workers = OmegaConf.merge(cfg.data, {"num_workers": 0})
    loader = iter(build_loader(no_workers, str(work / "shards"), args.batch, 0, 1, seed=0))
    batch = next(loader)
    step_times = []
    for _ in range(4):
        begin = time.perf_counter()
        model(batch["video"], batch["audio"])["loss"].backward()
        step_times.append(time.perf_counter() - begin)
    step = sorted(step_times)[1]
    needed = args.batch / step
    per_worker = pemt_rate / w

    rows = [
        ("bare PyAV (1 process)", bare, 1),
        (f"torch Dataset ({w} workers)", torch_rate, w),
        (f"pemt stream ({w} workers)", pemt_rate, w),
    ]
    lines = ["| loader | samples/s | clips/s | clips/s per worker | per worker vs bare PyAV |", "|---|---|---|---|---|"]
    for name, rate, workers in rows:
        lines.append(
            f"| {name} | {rate:.1f} | {rate * spec.clips:.1f} | {rate * spec.clips / workers:.1f} "
            f"| {rate / workers / bare:.2f}x |"
        )
    setting = (
        f"{datetime.date.today()}, CPU, {args.videos} videos of {args.seconds:g} s at {args.size}px -> "
        f"{spec.clips} clips x {spec.frames_per_clip} frames at {spec.crop}px, batch {args.batch}"
    )
    feed = (
        f"tiny model training step (1 thread, batch {args.batch}): {step * 1000:.0f} ms -> needs "
        f"{needed:.1f} samples/s; at {per_worker:.1f} samples/s per worker that is "
        f"{math.ceil(needed / per_worker)} worker(s) per rank"
    )
    table = "\n".join(lines)
    print(f"{setting}\n\n{table}\n\n{feed}")
    (HERE / "results" / "loader_throughput_cpu.md").write_text(
        f"# Loader throughput\n\n{setting}\n\n{table}\n\n{feed}\n"
    )


if __name__ == "__main__":
    main()
