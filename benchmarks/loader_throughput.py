"""Loader throughput against the decoder it is built on.

    python benchmarks/loader_throughput.py [--videos 64 --seconds 4 --size 112 --workers 2 --paper-window]

Decodes the same generated mp4 files four ways and prints samples/s (a sample is a sequence of
`data.clips` clips) and clips/s per worker:
  bare PyAV   decode_clips() in a plain loop over the files: the decoder's limit;
  torch       a plain torch Dataset over the folder of mp4 files, in a DataLoader;
  pemt        pemt's resumable WebDataset stream over shards of the same files;
  pemt HTTP   the same shards served over HTTP (byte ranges) on loopback, without and with each
              request held `--latency-ms` (a store's latency), reading ahead off and on; each
              shard's headers walked, then its index beside it (as pemt's upload writes);
  pemt S3     the same shards uploaded (with their indexes) to an S3-compatible store (moto).
Then the tiny model's training step time, and the workers needed to keep it fed.
Ratios are against bare PyAV measured in the same run; the remote rows also against the local
pemt stream, with the bytes they read per sample (counted by a proxy in front of each server).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from pemt.config import compose_config
from pemt.data.decode import decode_clips, video_to_float
from pemt.data.ingest import make_shards
from pemt.data.loader import build_loader, clip_spec
from pemt.data.synthetic import SyntheticSpec, make_sample
from pemt.model.factory import build_pretraining_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the loopback servers the tests use

from servers import FaultProxy, FileServer, S3Server, s3_environment  # noqa: E402

from conftest import free_port  # noqa: E402


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
    parser.add_argument(
        "--paper-window",
        action="store_true",
        help="decode the paper's window (30 clips x 16 frames at 16 fps, crop 112) instead of the tiny default",
    )
    parser.add_argument("--latency-ms", type=float, default=20.0, help="a store's latency added to each request")
    parser.add_argument("--out", default="loader_throughput_cpu.md", help="file name under benchmarks/results/")
    args = parser.parse_args()

    # Workers start from a forkserver that keeps the environment it started with: point boto3 at
    # the loopback S3 store before any loader exists.
    port = free_port(4)
    os.environ.update(s3_environment(f"http://127.0.0.1:{port + 3}"))
    window = ["data.clips=30", "data.frames_per_clip=16", "data.fps=16", "data.crop=112"] if args.paper_window else []
    cfg = compose_config("pretrain", overrides=["data.streams=1", f"data.num_workers={args.workers}", *window])
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
            batch = next(iterator)
            assert not batch.get("errors"), batch["errors"]
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
    remote = _remote_rates(work / "shards", port, cfg.data, args.batch, n // args.batch, drain, args.latency_ms)

    per_worker = pemt_rate / w
    feed = ""
    if not args.paper_window:  # the tiny model's step; at the paper's window the model is not tiny
        model = build_pretraining_model(cfg)
        no_workers = OmegaConf.merge(cfg.data, {"num_workers": 0})
        loader = iter(build_loader(no_workers, str(work / "shards"), args.batch, 0, 1, seed=0))
        batch = next(loader)
        step_times = []
        for _ in range(4):
            begin = time.perf_counter()
            video = video_to_float(batch["video"], torch.device("cpu"), torch.float32)
            model(video, batch["audio"])["loss"].backward()
            step_times.append(time.perf_counter() - begin)
        step = sorted(step_times)[1]
        needed = args.batch / step
        feed = (
            f"tiny model training step (1 thread, batch {args.batch}): {step * 1000:.0f} ms -> needs "
            f"{needed:.1f} samples/s; at {per_worker:.1f} samples/s per worker that is "
            f"{math.ceil(needed / per_worker)} worker(s) per rank\n\n"
        )

    rows = [
        ("bare PyAV (1 process)", bare, 1),
        (f"torch Dataset ({w} workers)", torch_rate, w),
        (f"pemt stream ({w} workers)", pemt_rate, w),
    ]
    read = {name: (per_sample, cpu) for name, _, per_sample, cpu in remote}
    rows += [(f"{name} ({w} workers)", rate, w) for name, rate, _, _ in remote]
    shard_bytes = sum(p.stat().st_size for p in (work / "shards").glob("*.tar")) / n
    lines = [
        "| loader | samples/s | clips/s | clips/s per worker | per worker vs bare PyAV | vs pemt local "
        "| KB read per sample | server core-ms per sample |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rate, workers in rows:
        base = name.split(" (")[0]
        versus = f"{rate / pemt_rate:.2f}x" if base in read or base == "pemt stream" else ""
        kb = f"{read[base][0] / 1e3:.1f}" if base in read else ""
        server = f"{read[base][1] * 1e3:.1f}" if base in read else ""
        lines.append(
            f"| {name} | {rate:.1f} | {rate * spec.clips:.1f} | {rate * spec.clips / workers:.1f} "
            f"| {rate / workers / bare:.2f}x | {versus} | {kb} | {server} |"
        )
    setting = (
        f"{datetime.date.today()}, CPU, {args.videos} videos of {args.seconds:g} s at {args.size}px -> "
        f"{spec.clips} clips x {spec.frames_per_clip} frames at {spec.crop}px, batch {args.batch}"
    )
    feed += (
        f"The shards hold {shard_bytes / 1e3:.1f} KB per sample; a remote read is the tar's headers "
        "plus what each decode's window needs. Loopback has no network latency or bandwidth limit: the "
        "plain remote rows measure pemt's request overhead, not a cluster's network; the +ms rows hold "
        "every request that long at the proxy, as a distant store would. The servers (Python's "
        "http.server with range support, moto) and the proxy that counts bytes run on the same cores as "
        "the decoders; their CPU time per sample is in the last column."
    )
    table = "\n".join(lines)
    print(f"{setting}\n\n{table}\n\n{feed}")
    (HERE / "results" / args.out).write_text(f"# Loader throughput\n\n{setting}\n\n{table}\n\n{feed}\n")


def _cpu(*processes: psutil.Process) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def _remote_rates(
    shards: Path, port: int, data_cfg, batch: int, batches: int, drain, latency_ms: float
) -> list[tuple[str, float, float, float]]:
    """(row, samples/s, bytes read per sample, server core-seconds per sample) of the pemt stream
    from HTTP and from S3 on loopback (ports `port` to `port + 3`). The servers and the counting
    proxy share this machine's cores with the decoders; their CPU time is measured."""
    from pemt.data.members import INDEX_SUFFIX, shard_index
    from pemt.data.shards import upload_shards

    rows = []
    here = psutil.Process()
    http = FileServer(shards.parent, port)  # threads of this process, as is the proxy
    proxy = FaultProxy(port + 1, port)
    samples = batches * batch
    # Each shard's headers walked (shards copied there by other tools), then its index beside it
    # (as pemt's upload writes it); without and with a store's latency (object stores answer in
    # tens of ms), reading ahead off and on.
    settings = [(0, True, False), (latency_ms, False, False), (latency_ms, True, False)]
    settings += [(0, True, True), (latency_ms, True, True)]
    for latency, read_ahead, indexed in settings:
        if indexed:
            for tar in shards.glob("*.tar"):
                (shards / f"{tar.name}{INDEX_SUFFIX}").write_bytes(shard_index(tar))
        proxy.latency_s = latency / 1000
        cfg = OmegaConf.merge(data_cfg, {"remote": {"read_ahead": read_ahead}})
        sent, began = proxy.bytes_to_clients, _cpu(here)
        rate = drain(build_loader(cfg, f"{proxy.url}/{shards.name}", batch, 0, 1, seed=0), batches)
        name = (
            f"pemt HTTP{f' +{latency:g} ms' if latency else ''}, read-ahead {'on' if read_ahead else 'off'}, "
            f"{'shard indexes' if indexed else 'headers walked'}"
        )
        rows.append((name, rate, (proxy.bytes_to_clients - sent) / samples, (_cpu(here) - began) / samples))
    proxy.down()
    http.stop()

    s3 = S3Server(port + 2)
    proxy = FaultProxy(port + 3, port + 2)
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    upload_shards(shards, "s3://bench/shards", progress=False)
    uploaded, began = proxy.bytes_to_clients, _cpu(here, psutil.Process(s3.process.pid))
    rate = drain(build_loader(data_cfg, "s3://bench/shards", batch, 0, 1, seed=0), batches)
    cpu = (_cpu(here, psutil.Process(s3.process.pid)) - began) / samples
    rows.append(("pemt S3", rate, (proxy.bytes_to_clients - uploaded) / samples, cpu))
    proxy.down()
    s3.stop()
    return rows


if __name__ == "__main__":
    main()
