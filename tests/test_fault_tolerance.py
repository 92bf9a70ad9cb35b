"""Preemption through the real signal path, and resuming at another world size."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import REPO, SMALL_DATA, describe, keys_by_step, run_launch, run_name, run_pretrain, run_resume

pytestmark = pytest.mark.slow
STEPS = 24


def _launch(root: Path, cache: Path, *overrides: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        str(REPO / "launch" / "pretrain.py"),
        f"paths.root={root}",
        f"paths.cache={cache}",
        *SMALL_DATA,
        *overrides,
    ]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _last_step(run_dir: Path) -> int:
    record = run_dir / "samples" / "rank00000.jsonl"
    if not record.exists():
        return 0
    lines = [line for line in record.read_text().splitlines() if line.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


def _task_pids(root: Path) -> dict[int, int]:
    """Global rank -> pid of this run's submitit tasks."""
    tasks = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if "submitit.core._submit" in cmdline and str(root) in cmdline:
                tasks[int(proc.environ()["SUBMITIT_LOCAL_GLOBALID"])] = proc.pid
        except (psutil.Error, KeyError):
            continue
    return tasks


def _signal_at(root: Path, run_dir: Path, at_step: int, rank: int, deadline: float) -> int:
    """Wait for rank 0 to reach `at_step`, then send SIGUSR2 to one task; returns the step seen."""
    while time.time() < deadline:
        step = _last_step(run_dir)
        pids = _task_pids(root)
        if step >= at_step and rank in pids:
            psutil.Process(pids[rank]).send_signal(signal.SIGUSR2)
            return step
        time.sleep(0.05)
    raise TimeoutError(f"step {at_step} not reached")


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text()
    states = torch.load(run_dir / "checkpoints" / latest / "mp_rank_00_model_states.pt", weights_only=False)
    return states["module"]


def _final_state(run_dir: Path) -> dict:
    latest = (run_dir / "checkpoints" / "latest").read_text()
    return json.loads((run_dir / "checkpoints" / latest / "pemt_manifest.json").read_text())["state"]


def test_interrupted_twice_by_signals_ends_bitwise_equal(tmp_path: Path, data_cache: Path) -> None:
    # Periodic checkpoints every 3 steps are written in the background: the signals come while
    # one may be in flight, and the final save on the signal must still leave an exact run.
    # The CNN warm-up ends early (step 11, on the InfoNCE of the last 10 steps over both ranks): the
    # first signal comes before it, so the resumed job must carry those steps' shares over to end it
    # at the same step (the default 0.9 is reached only at step 12, where it would end anyway).
    warmup = "loss.cnn_warmup_until=0.95"
    common = [f"train.max_steps={STEPS}", "train.log_every=4", "train.checkpoint_every=3", "train.record_samples=true"]
    common.append(warmup)
    name = run_name(warmup)
    reference = run_pretrain(tmp_path / "reference", data_cache, *common)
    assert reference.returncode == 0, describe(reference)
    ended = _final_state(tmp_path / "reference" / "pemt-pretrain" / name)["cnn_warmup"]
    assert ended["learned"] and 8 < ended["ended_at"] < STEPS // 2, ended

    root = tmp_path / "interrupted"
    run_dir = root / "pemt-pretrain" / name
    draw = random.Random(STEPS)
    first = draw.randint(4, 8)
    second = draw.randint(first + 3, first + 10)
    job = _launch(root, data_cache, *common)
    deadline = time.time() + 400
    seen = [_signal_at(root, run_dir, first, rank=1, deadline=deadline)]
    # The requeued job resumes from the checkpoint taken at the signal, then is preempted again
    # (the step is only reached by the resumed job: second > first + 2).
    seen.append(_signal_at(root, run_dir, second, rank=0, deadline=deadline))
    output, _ = job.communicate(timeout=400)
    assert job.returncode == 0, output[-6000:]

    log = (run_dir / "pretrain.log").read_text()
    assert log.count("received SIGUSR2") >= 2, (seen, log[-4000:])
    assert log.count("resumed from") >= 2 * 2, "both ranks resumed twice"
    assert _final_state(run_dir)["cnn_warmup"] == ended
    reference_weights = _final_weights(tmp_path / "reference" / "pemt-pretrain" / name)
    resumed_weights = _final_weights(run_dir)
    assert reference_weights.keys() == resumed_weights.keys()
    different = [k for k in reference_weights if not torch.equal(reference_weights[k], resumed_weights[k])]
    assert not different, f"signals at steps {seen}: weights differ in {different[:5]}"

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("pemt-pretrain").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["samples"] == STEPS * 8


def test_failed_run_is_resumed_by_resume_py_and_exported(tmp_path: Path, data_cache: Path) -> None:
    root = tmp_path / "runs"
    run_dir = root / "pemt-pretrain" / run_name()
    job = _launch(root, data_cache, "train.max_steps=40", "train.checkpoint_every=2", "train.log_every=2")
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "latest").exists() and time.time() < deadline:
        time.sleep(0.05)
    pids = _task_pids(root)
    psutil.Process(pids[1]).kill()  # a rank dies: its node is gone
    output, _ = job.communicate(timeout=300)
    assert job.returncode != 0, output[-4000:]

    status = run_resume(str(run_dir), "--status", "--json")
    assert status.returncode == 0, status.stderr
    [before] = json.loads(status.stdout)
    assert before["state"] == "failed" and before["resumable"], before
    assert 2 <= before["step"] < 40
    assert before["last_job"]["reason"], "why it stopped"

    dry = run_resume(str(root), "--dry-run")
    assert dry.returncode == 0 and "-m pemt.apps.pretrain" in dry.stdout
    resumed = run_resume(before["mlflow_run_id"], "--tracking-uri", f"sqlite:///{root}/mlflow.db")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    [after] = json.loads(run_resume(str(run_dir), "--status", "--json").stdout)
    assert after["state"] == "finished" and after["step"] == 40
    assert after["mlflow_run_id"] == before["mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("pemt-pretrain").experiment_id])
    assert run.info.status == "FINISHED"
    # Steps replayed after the rollback to the checkpoint are in the history once.
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(2, 41, 2)), steps
    assert "checkpoint_load_s" in run.data.metrics and run.data.metrics["segment"] == 2

    nothing = run_resume(str(run_dir))
    assert nothing.returncode == 2 and "nothing to resume" in nothing.stderr
    listed = run_resume("--list", str(root))
    assert "finished" in listed.stdout and str(run_dir) in listed.stdout

    # Export: one fp32 file + config that load without DeepSpeed and match the checkpoint.
    from safetensors.torch import load_file

    from pemt.model.factory import load_exported

    exported = subprocess.run(
        [sys.executable, str(REPO / "tools" / "export.py"), str(run_dir), "--out", str(tmp_path / "model.safetensors")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert exported.returncode == 0, exported.stderr
    model, _ = load_exported(tmp_path / "model.safetensors")  # strict: every tensor in its place
    weights = load_file(tmp_path / "model.safetensors")
    reference = _final_weights(run_dir)
    assert all(torch.equal(weights[k], reference[k]) for k in reference if k in weights)
    assert len(weights) == len(model.state_dict())


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_resume_at_another_world_size(tmp_path: Path, data_cache: Path, before: int, after: int) -> None:
    # Uniform negatives: content-aware ones are drawn in proportion to similarities, and a draw
    # flips on a last-bit difference (a loss 1.2e-4 off, two steps after a resume, on one CPU).
    sampling = "loss.sampling=uniform"
    # No CNN warm-up: it takes at most half the run, and the first of these runs is half as long as
    # the reference (the learning-rate warm-up outlasts both runs for the same reason).
    learned = [sampling, "loss.cnn_warmup_steps=0"]
    common = [*learned, "train.log_every=2", "train.checkpoint_every=4", "train.record_samples=true"]
    reference = run_pretrain(tmp_path / "reference", data_cache, "train.max_steps=8", *common)
    assert reference.returncode == 0, describe(reference)
    root = tmp_path / "elastic"
    first = run_pretrain(root, data_cache, "train.max_steps=4", f"gpus_per_node={before}", *common)
    assert first.returncode == 0, describe(first)
    second = run_pretrain(root, data_cache, "train.max_steps=8", f"gpus_per_node={after}", *common)
    assert second.returncode == 0, describe(second)
    run_dir = root / "pemt-pretrain" / run_name(*learned)
    log = (run_dir / "pretrain.log").read_text()
    assert f"resumed at world size {after} from a checkpoint written at {before}" in log
    # AMSGrad (the default) loses its running maximum in the universal format: restarted, and said
    assert "AMSGrad's running maximum" in log
    assert (run_dir / "checkpoints" / ".universal" / "step_00000004" / ".complete").exists()
    # The data stream goes on without repeats or gaps: every step saw what it would have.
    assert keys_by_step(run_dir) == keys_by_step(tmp_path / "reference" / "pemt-pretrain" / run_name(*learned))
    losses = {}
    for name, store in (("elastic", root), ("reference", tmp_path / "reference")):
        client = MlflowClient(f"sqlite:///{store}/mlflow.db")
        [run] = client.search_runs([client.get_experiment_by_name("pemt-pretrain").experiment_id])
        assert run.info.status == "FINISHED"
        losses[name] = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert sorted(losses["elastic"]) == [2, 4, 6, 8]
    # The model step does not depend on the world size, so neither do the losses (fp32), up to
    # the rounding of sums taken in another order, which Adam amplifies step by step (measured: up
    # to 2e-5 relative four steps after the resume).
    for step in (2, 4, 6, 8):
        reference = losses["reference"][step]
        assert abs(losses["elastic"][step] - reference) <= 1e-4 * abs(reference), (step, losses)


def _shards_with_an_all_bad_step(folder: Path) -> Path:
    """8 shards of 2 over 2 streams (one per rank): shard 1 (stream 1) is two truncated videos, so
    once an epoch rank 1 has a micro-batch with no usable sample; shard 3 has a sample whose
    metadata is a JSON list."""
    from pemt.data.shards import write_shards
    from pemt.data.synthetic import SyntheticSpec, make_sample

    spec = SyntheticSpec(videos=16, seconds=2.0)
    samples = [make_sample(spec, i) for i in range(16)]
    for i in (2, 3):
        samples[i]["mp4"] = samples[i]["mp4"][:1500]
    samples[6]["json"] = b"[1, 2]"
    write_shards(iter(samples), folder, samples_per_shard=2)
    return folder


def test_a_rank_whose_micro_batch_is_all_bad_skips_the_step_with_every_rank(tmp_path: Path, data_cache: Path) -> None:
    shards = _shards_with_an_all_bad_step(tmp_path / "shards")
    result = run_launch(
        "pretrain.py",
        tmp_path / "runs",
        data_cache,
        "data=shards",
        f"data.shards={shards}",
        "data.streams=2",
        "data.num_workers=1",
        "train.global_batch_size=4",
        "train.max_steps=8",
        "train.log_every=4",
        "data.max_error_rate=0.3",
        timeout=900,
    )
    assert result.returncode == 0, describe(result)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs'}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("pemt-pretrain").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["skipped_steps"] == 2, "one step per epoch, on both ranks"
    assert run.data.metrics["bad_samples"] == 6, "two epochs of 2 truncated videos and a list as metadata"
    assert "skipped on every rank" in result.stdout + result.stderr


def test_non_finite_steps_are_skipped_then_the_run_stops_with_a_good_checkpoint(
    tmp_path: Path, data_cache: Path
) -> None:
    root = tmp_path / "runs"
    # A learning rate of 1e30: the first step's update overflows every later forward pass.
    result = run_pretrain(
        root,
        data_cache,
        "gpus_per_node=1",
        "train.lr=1e30",
        "train.max_steps=10",
        "train.max_skipped_steps=2",
        "train.checkpoint_every=1",
        "train.log_every=1",
    )
    assert result.returncode != 0, describe(result)
    assert "steps in a row" in result.stderr and "non-finite gradients" in result.stderr, describe(result)
    run_dir = root / "pemt-pretrain" / run_name("train.lr=1e+30")  # as Hydra writes the number
    latest = (run_dir / "checkpoints" / "latest").read_text()
    states = torch.load(run_dir / "checkpoints" / latest / "mp_rank_00_model_states.pt", weights_only=False)
    weights = states["module"]
    running = [k for k in weights if k.endswith(("running_mean", "running_var"))]
    assert running and all(torch.isfinite(weights[k]).all() for k in weights if weights[k].is_floating_point()), (
        "weights and BatchNorm statistics of the last checkpoint are finite"
    )
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("pemt-pretrain").experiment_id])
    assert run.info.status == "FAILED" and run.data.metrics["skipped_steps"] >= 1


def test_ctrl_c_on_a_local_run_saves_before_the_ranks_exit(tmp_path: Path, data_cache: Path) -> None:
    import os

    root = tmp_path / "runs"
    run_dir = root / "pemt-pretrain" / run_name()
    cmd = [
        sys.executable,
        str(REPO / "launch" / "pretrain.py"),
        f"paths.root={root}",
        f"paths.cache={data_cache}",
        *SMALL_DATA,
        "train.max_steps=200",
        "train.checkpoint_every=1000",
        "train.record_samples=true",
    ]
    # its own session: a terminal's Ctrl-C signals the whole foreground process group
    job = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    deadline = time.time() + 300
    while _last_step(run_dir) < 3 and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGINT)
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output[-4000:]
    saved = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 3 <= saved < 200, "saved where the ranks stopped, not at the end"
    assert "stopped by SIGINT" in output and "DataLoader worker" not in output, output[-4000:]
    ends = [json.loads(line) for line in (run_dir / "jobs.jsonl").read_text().splitlines() if '"end"' in line]
    assert ends[-1]["outcome"] == "terminated" and ends[-1]["step"] == saved
