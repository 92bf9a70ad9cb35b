"""What pemt's training loop costs against a bare PyTorch loop, and where the difference goes.

    python benchmarks/step_overhead.py [--models tiny mid] [--steps 20] [--warmup 4] [--ranks 2]
        [--rounds 3] [--set KEY=VALUE ...]

Every variant runs the same model, micro-batch, optimizer (AdamW, clipping at 1.0) and world
size, in fresh processes (gloo on CPU, NCCL on GPUs):
  (a) bare: DistributedDataParallel, one pre-decoded micro-batch held in memory;
  (b) pemt step under ZeRO-1/2/3: the trainer's step (step guard, DeepSpeed engine, metric
      sums) on that same micro-batch;
  (b') pemt step, ZeRO-2 with `train.compile=true`: the same step with compiled blocks;
  (c) pemt loop (ZeRO-2): the whole trainer (real loader decoding mp4 shards, telemetry,
      MLflow) for the same number of steps.
The step time is the slowest rank's, averaged over the timed steps. With `--rounds N` every
variant runs N times, interleaved, each round in the other order, since a shared machine's speed
drifts; the ratios are taken within a round and the table gives their mean and range, so a goal is
met only where every round meets it. Prints a table with the ratios (b)/(a) and (c)/(b) (goals:
<= 1.05 and <= 1.03) and where the time goes in (a) and (b); writes
benchmarks/results/step_overhead_<device>.md. `--set` passes a config override to every variant
(a DeepSpeed setting such as `+deepspeed.zero_optimization.overlap_comm=true`, a model size).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from common import add_set_option
from omegaconf import DictConfig, OmegaConf

from pemt.config import compose_config
from pemt.distributed import leave_distributed

HERE = Path(__file__).resolve().parent

# A model where the transformers are not trivially small: hidden 256, 4 layers, 8 clips.
MODELS = {
    "tiny": ["model=tiny"],
    "mid": [
        "model=tiny",
        "model.hidden_size=256",
        "model.num_layers=4",
        "model.ffn_size=1024",
        "model.visual_cnn.width=16",
        "model.audio_cnn.width=16",
        "data.clips=8",
        "data.crop=48",
    ],
}
VARIANTS = ["bare", "zero1", "zero2", "zero3", "compiled", "loop"]


def _config(
    model: str, variant: str, root: Path, ranks: int, steps: int, extra: list[str], round_: int = 0
) -> DictConfig:
    zero = variant if variant.startswith("zero") else "zero2"
    return compose_config(
        "pretrain",
        overrides=[
            *MODELS[model],
            f"deepspeed={zero}",
            f"train.compile={variant == 'compiled'}",
            f"gpus_per_node={ranks}",
            f"train.global_batch_size={4 * ranks}",
            f"data.streams={4 * ranks}",
            f"train.max_steps={steps}",
            "train.log_every=5",
            f"train.checkpoint_every={steps + 1}",
            f"paths.root={root}",
            f"run_dir={root / model / f'{variant}.{round_}'}",
            f"precision={'bf16' if torch.cuda.is_available() else 'fp32'}",
            *extra,
        ],
    )


class PhaseClock:
    """Wall time per named phase; on CUDA each phase ends at a synchronize."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        method: Callable[..., Any] = getattr(owner, name)
        self.seconds[phase] += 0.0  # the table lists phases in the order they were wrapped

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = method(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - start
            return result

        setattr(owner, name, timed)

    def reset(self) -> None:
        for phase in self.seconds:
            self.seconds[phase] = 0.0


def _first_batch(cfg: DictConfig, rank: int, ranks: int) -> dict[str, Any]:
    from pemt.data.loader import build_loader, shard_source

    in_process = OmegaConf.merge(cfg.data, {"num_workers": 0})  # one batch: no worker left behind
    loader = build_loader(in_process, shard_source(cfg), 4, rank, ranks, seed=int(cfg.seed))
    return next(iter(loader))


def _bare(cfg: DictConfig, rank: int, ranks: int, steps: int, warmup: int, clock: PhaseClock) -> list[float]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pemt.data.decode import video_to_float
    from pemt.host_memory import keep_freed_host_memory
    from pemt.model.factory import build_pretraining_model
    from pemt.train.optimizer import build_optimizer

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // ranks))  # as pemt sets up CPU ranks
        keep_freed_host_memory()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    torch.manual_seed(cfg.seed)
    model = build_pretraining_model(cfg).to(device)
    ddp = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    optimizer, scheduler = build_optimizer(model, cfg.train)
    batch = _first_batch(cfg, rank, ranks)
    times = []
    for step in range(steps):
        if step == warmup:
            clock.reset()  # phases of the timed steps only
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            t = time.perf_counter()
            losses = ddp(
                video_to_float(batch["video"], device, dtype), batch["audio"].to(device, dtype), step_seed=step
            )
            clock.seconds["forward"] += time.perf_counter() - t
        t = time.perf_counter()
        losses["loss"].backward()
        clock.seconds["backward"] += time.perf_counter() - t
        t = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.train.grad_clip))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        clock.seconds["optimizer step"] += time.perf_counter() - t
        times.append(time.perf_counter() - start)
    return times


def _pemt_step(cfg: DictConfig, rank: int, ranks: int, steps: int, warmup: int, clock: PhaseClock) -> list[float]:
    from pemt.train.trainer import Trainer

    trainer = Trainer(cfg)
    batch = _first_batch(cfg, rank, ranks)
    guard, engine = trainer.guard, trainer.engine
    clock.wrap(guard, "any_empty", "agree on empty batches")
    clock.wrap(guard, "before_forward", "keep BatchNorm statistics")
    clock.wrap(trainer.task, "forward", "forward")
    clock.wrap(engine, "backward", "backward")
    clock.wrap(engine, "allreduce_gradients", "of which gradient reduction")  # ZeRO's, after the backward pass
    clock.wrap(engine, "step", "optimizer step")
    clock.wrap(guard, "after_step", "check the step applied")
    clock.wrap(trainer.telemetry, "add_micro_step", "metric sums")
    times = []
    for step in range(steps):
        if step == warmup:
            clock.reset()
        start = time.perf_counter()
        trainer._step(step + 1, [{**batch, "micro_step": step}], count_flops=False)
        times.append(time.perf_counter() - start)
    trainer.stop.uninstall()
    trainer.lock.release()
    return times


def _pemt_loop(cfg: DictConfig, rank: int, ranks: int, steps: int, warmup: int, clock: PhaseClock) -> list[float]:
    from pemt.train.trainer import Trainer

    trainer = Trainer(cfg)
    ends: list[float] = []
    step = trainer._step

    def timed_step(*args: Any, **kwargs: Any) -> bool:
        result = step(*args, **kwargs)
        ends.append(time.perf_counter())
        return result

    trainer._step = timed_step  # type: ignore[method-assign]
    trainer.fit()
    # a step's time is from the previous step's end: data, logging and checks included
    return [b - a for a, b in zip(ends, ends[1:])]


def _rank_main(
    rank: int,
    model: str,
    variant: str,
    round_: int,
    root: str,
    port: int,
    ranks: int,
    steps: int,
    warmup: int,
    extra: list[str],
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(ranks),
        LOCAL_WORLD_SIZE=str(ranks),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    cfg = _config(model, variant, Path(root), ranks, steps, extra, round_)
    clock = PhaseClock()
    run = {"bare": _bare, "loop": _pemt_loop}.get(variant, _pemt_step)
    times = run(cfg, rank, ranks, steps, warmup, clock)
    leave_distributed()
    out = Path(root) / model / f"{variant}.{round_}.rank{rank}.json"
    out.write_text(json.dumps({"times": times, "phases": clock.seconds}))


def _measure(model: str, variant: str, round_: int, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from pemt.distributed import rendezvous_port

    (root / model).mkdir(parents=True, exist_ok=True)
    port = rendezvous_port(f"{model}-{variant}-{round_}-{os.getpid()}")
    ranks, steps = args.ranks, args.steps
    total = steps + args.warmup + (1 if variant == "loop" else 0)  # the loop's first interval needs a step before it
    rank_args = (model, variant, round_, str(root), port, ranks, total, args.warmup, args.overrides)
    mp.start_processes(_rank_main, args=rank_args, nprocs=ranks, start_method="spawn")
    per_rank = [json.loads((root / model / f"{variant}.{round_}.rank{r}.json").read_text()) for r in range(ranks)]
    slowest = [max(ts) for ts in zip(*(r["times"] for r in per_rank))][-steps:]
    phases = {k: v / steps for k, v in per_rank[0]["phases"].items()}
    return {"mean_s": statistics.mean(slowest), "phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "mid"], choices=sorted(MODELS))
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="runs of every variant, interleaved")
    parser.add_argument("--ranks", type=int, default=2 if not torch.cuda.is_available() else torch.cuda.device_count())
    add_set_option(parser, "+deepspeed.zero_optimization.overlap_comm=true")
    parser.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/...)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="pemt-step-overhead-") as tmp:
        root = Path(tmp)
        from pemt.data.synthetic import ensure_synthetic_shards
        from pemt.track.store import ensure_experiment

        for model in args.models:
            cfg = _config(model, "bare", root, args.ranks, 1, args.overrides)
            ensure_synthetic_shards(cfg)
            ensure_experiment(str(cfg.mlflow.tracking_uri), str(cfg.mlflow.experiment))
            rows[model] = {variant: [] for variant in args.variants}
            for round_ in range(args.rounds):
                order = args.variants if round_ % 2 == 0 else args.variants[::-1]
                for variant in order:
                    row = _measure(model, variant, round_, root, args)
                    rows[model][variant].append(row)
                    print(
                        f"{model:5s} {variant:8s} round {round_ + 1}: {1000 * row['mean_s']:8.1f} ms/step", flush=True
                    )
    report = _report(rows, args, device)
    print(report)
    slug = "cpu" if device == "cpu" else "gpu_" + device.lower().replace(" ", "_")
    out = args.out or HERE / "results" / f"step_overhead_{slug}.md"
    out.write_text(report)
    print(f"written to {out}")


def _ratio(rounds: list[dict[str, Any]], baseline: list[dict[str, Any]] | None, goal: float | None) -> list[str]:
    """Within-round ratios against the baseline: mean, range, and whether every round meets the goal."""
    if not baseline:
        return ["-", "-", "-"]
    ratios = [row["mean_s"] / base["mean_s"] for row, base in zip(rounds, baseline)]
    spread = f"{min(ratios):.3f}-{max(ratios):.3f}" if len(ratios) > 1 else "-"
    verdict = "-"
    if goal is not None:
        met = sum(r <= goal for r in ratios)
        verdict = "yes" if met == len(ratios) else "no" if met == 0 else f"{met} of {len(ratios)} rounds"
        verdict += f" (<= {goal})"
    return [f"{statistics.mean(ratios):.3f}", spread, verdict]


def _report(rows: dict[str, dict[str, list[dict[str, Any]]]], args: argparse.Namespace, device: str) -> str:
    command = f"python benchmarks/step_overhead.py --models {' '.join(args.models)} --steps {args.steps}"
    command += f" --rounds {args.rounds}" if args.rounds > 1 else ""
    command += "".join(f" --set {override}" for override in args.overrides)
    lines = [
        f"# Step overhead ({device}, {args.ranks} ranks, {args.steps} timed steps after {args.warmup})",
        "",
        f"`{command}` ({datetime.date.today()}). Step time: the slowest rank's, mean over the timed steps"
        + (
            f", then over {args.rounds} interleaved rounds; ratios are taken within each round."
            if args.rounds > 1
            else "."
        ),
        "",
        "| model | variant | ms/step | / bare | rounds | goal met | / pemt step (ZeRO-2) | rounds | goal met |",
        "|---|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for model, variants in rows.items():
        bare, step = variants.get("bare"), variants.get("zero2")
        for name, rounds in variants.items():
            label = {
                "bare": "(a) bare DDP",
                "compiled": "(b') pemt step, ZeRO-2, compiled",
                "loop": "(c) pemt loop, ZeRO-2",
            }.get(name, f"(b) pemt step, ZeRO-{name[-1]}")
            if name == "bare":
                versus_bare = ["1.000", "-", "-"]
            else:  # the 1.05 goal is the step's; the loop's is against the step
                versus_bare = _ratio(rounds, bare, None if name == "loop" else 1.05)
            versus_step = (
                _ratio(rounds, step, 1.03 if name == "loop" else None) if name in ("compiled", "loop") else ["-"] * 3
            )
            ms = 1000 * statistics.mean(row["mean_s"] for row in rounds)
            lines.append(f"| {model} | {label} | {ms:.1f} | " + " | ".join(versus_bare + versus_step) + " |")
    lines += ["", "Where a step's time goes (rank 0, ms per step, mean of the rounds):", ""]
    for model, variants in rows.items():
        for name in ("bare", "zero1", "zero2", "zero3", "compiled"):
            if name in variants:
                phases = defaultdict(list)
                for row in variants[name]:
                    for phase, seconds in row["phases"].items():
                        phases[phase].append(seconds)
                parts = ", ".join(f"{k} {1000 * statistics.mean(v):.1f}" for k, v in phases.items())
                lines.append(f"- {model}, {name}: {parts}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
