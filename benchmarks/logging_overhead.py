"""What metric logging costs the training loop, against the step it is logged from.

    python benchmarks/logging_overhead.py [--steps 40] [--log-every 5]

Runs the default model's forward + backward + AdamW step in one process, and at each log step
hands the full metric set (~30 values) to MLflow in three ways, timing only the call the loop
waits for:
  - baseline: no logging;
  - synchronous: MlflowClient.log_batch straight to the SQLite store (what a naive loop does);
  - outbox: pemt's tracker (a line to a local file; delivery in a background thread).
Prints a table and the overhead as a share of step time (goal: under 2%), and writes it to
benchmarks/results/logging_overhead.md.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pemt.config import compose_config
from pemt.data.decode import log_mel
from pemt.data.loader import clip_spec
from pemt.model.factory import build_pretraining_model
from pemt.track.store import ensure_experiment
from pemt.track.tracker import MlflowTracker

HERE = Path(__file__).resolve().parent


def _metrics(step: int) -> dict[str, float]:
    names = [
        "loss",
        "loss_mep_visual",
        "loss_mep_audio",
        "loss_pair",
        "pair_accuracy",
        "lr",
        "samples",
        "samples_per_s",
        "step_time_s",
        "data_wait_pct",
        "clips_per_s",
        "visual_tokens_per_s",
        "audio_tokens_per_s",
        "bad_samples",
        "grad_norm",
        "tflops_per_device",
        "mfu_pct",
    ]
    names += [f"host_rss_gib_{s}" for s in ("min", "avg", "max")]
    return {name: float(step) + i / 100 for i, name in enumerate(names)}


def run(mode: str, steps: int, log_every: int, folder: Path) -> tuple[float, float]:
    """(mean step seconds without logging, mean seconds per log call the loop waited)."""
    cfg = compose_config("pretrain")
    torch.manual_seed(0)
    model = build_pretraining_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    spec = clip_spec(cfg.data)
    batch = 8
    video = torch.rand(batch, spec.clips, 3, spec.frames_per_clip, spec.crop, spec.crop)
    audio = log_mel(torch.randn(batch, spec.clips, 1, int(spec.clip_seconds * spec.sample_rate)), spec)
    uri = f"sqlite:///{folder}/{mode}.db"
    ensure_experiment(uri, "bench")
    client, tracker, run_id = MlflowClient(uri), None, None
    if mode == "synchronous":
        run_id = client.create_run(client.get_experiment_by_name("bench").experiment_id).info.run_id
    elif mode == "outbox":
        store = OmegaConf.create({"mlflow": {"tracking_uri": uri, "experiment": "bench", "system_metrics": False}})
        (folder / mode).mkdir()
        tracker = MlflowTracker(store, folder / mode, enabled=True)
        tracker.start(store)
    step_s, log_s, logs = 0.0, 0.0, 0
    for step in range(1, steps + 1):
        started = time.perf_counter()
        optimizer.zero_grad()
        model(video, audio, step_seed=step)["loss"].backward()
        optimizer.step()
        step_s += time.perf_counter() - started
        if step % log_every == 0 and mode != "baseline":
            started = time.perf_counter()
            if mode == "synchronous":
                now = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in _metrics(step).items()])
            else:
                tracker.log_metrics(_metrics(step), step)
            log_s += time.perf_counter() - started
            logs += 1
    if tracker is not None:
        tracker.finish("FINISHED")
    return step_s / steps, log_s / max(1, logs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=5, help="as train.log_every")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("baseline", "synchronous", "outbox"):
            step_s, call_s = run(mode, args.steps, args.log_every, Path(tmp))
            share = 100.0 * call_s / (args.log_every * step_s)
            rows.append((mode, step_s, call_s, share))
    base = rows[0][1]
    lines = [
        f"# Logging overhead ({datetime.date.today()}, CPU, {torch.get_num_threads()} threads, default model, "
        f"batch 8, a log every {args.log_every} steps)",
        "",
        "| mode | step time | wait per log call | overhead vs step time | step time vs baseline |",
        "|---|---|---|---|---|",
    ]
    for mode, step_s, call_s, share in rows:
        lines.append(
            f"| {mode} | {step_s * 1000:.1f} ms | {call_s * 1000:.3f} ms | "
            f"{share if mode != 'baseline' else 0:.3f}% | {step_s / base:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "logging_overhead.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
