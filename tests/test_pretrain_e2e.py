"""`python launch/pretrain.py` end to end: real submitit jobs of 2 DeepSpeed ranks over gloo,
real mp4 shards decoded with PyAV, a real MLflow SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import describe, keys_by_step, run_name, run_pretrain, run_resume

pytestmark = pytest.mark.slow

EXPECTED_METRICS = {
    "loss",
    "loss_mep_visual",
    "loss_mep_audio",
    "loss_pair",
    "pair_accuracy",
    "spread_visual",  # representation health: what the collapse watch reads
    "spread_audio",
    "spread_fused",
    "pair_logit_spread",
    "mep_same_video_visual",
    "grad_norm",
    "lr",
    "samples_per_s",
    "step_time_s",
    "host_rss_gib_max",
    "samples",
}


def _runs(root: Path, experiment: str = "pemt-pretrain") -> list:
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_runs_checkpoints_logs_and_resumes(tmp_path: Path, data_cache: Path) -> None:
    first = run_pretrain(
        tmp_path,
        data_cache,
        "train.max_steps=4",
        "train.log_every=2",
        "train.checkpoint_every=2",
        "profile.steps=[2,3]",
    )
    assert first.returncode == 0, describe(first)
    run_dir = tmp_path / "pemt-pretrain" / run_name()  # profiling does not change which run it is
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000004"
    assert (checkpoints / "step_00000002").is_dir()
    assert "pretrain: 100%" in first.stderr, "the progress bar reaches the terminal"

    [run] = _runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == run_name()
    assert EXPECTED_METRICS <= set(run.data.metrics), run.data.metrics
    assert run.data.metrics["samples"] == 4 * 8
    assert run.data.metrics["samples_per_s"] > 0
    assert run.data.params["train.global_batch_size"] == "8"
    assert run.data.params["deepspeed.zero_optimization.stage"] == "2"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert [a.path for a in client.list_artifacts(run.info.run_id, "config")] == ["config/resolved.yaml"]
    experiment = client.get_experiment_by_name("pemt-pretrain")
    assert experiment.artifact_location.startswith(tmp_path.as_uri()), "artifacts under paths.root, not ./mlruns"
    assert run.data.tags["mlflow.source.name"] == "pemt-pretrain" and run.data.tags["mlflow.user"]
    assert run.data.tags["pemt.version"] and len(run.data.tags.get("mlflow.source.git.commit", "x" * 40)) == 40
    traces = [f"rank0000{rank}-steps2-3.trace.json" for rank in (0, 1)]
    assert sorted(p.name for p in (run_dir / "profile").iterdir()) == traces
    events = json.loads((run_dir / "profile" / traces[1]).read_text())["traceEvents"]
    ops = {e["name"] for e in events if e.get("cat") == "cpu_op"}
    assert {"aten::convolution", "aten::linear"} <= ops, "the model's forward and backward ops are in the trace"
    assert any(e.get("args", {}).get("Input Dims") for e in events), "with input shapes"
    assert any(e["name"] == "[memory]" for e in events), "and memory events"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "profile")] == [f"profile/{t}" for t in traces]
    rank1 = "".join(p.read_text() for p in (tmp_path / "pemt-pretrain" / ".submitit").glob("*/*_1_log.*"))
    assert "[rank 1] " in rank1 and "[rank 0] " not in rank1, "each rank's lines say which rank wrote them"

    # The same command with more steps continues the same run from its checkpoint.
    second = run_pretrain(tmp_path, data_cache, "train.max_steps=6", "train.log_every=2", "train.checkpoint_every=2")
    assert second.returncode == 0, describe(second)
    assert "resumed from" in (run_dir / "pretrain.log").read_text()
    assert (checkpoints / "latest").read_text() == "step_00000006"
    [resumed] = _runs(tmp_path)
    assert resumed.info.run_id == run.info.run_id
    assert resumed.info.status == "FINISHED"
    assert resumed.data.metrics["samples"] == 6 * 8, "the step count continues from the checkpoint"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [2, 4, 6]


def test_a_run_dir_of_ones_own_holds_the_run_and_resumes_wherever_it_moves(tmp_path: Path, data_cache: Path) -> None:
    mine = tmp_path / "mine"
    first = run_pretrain(
        tmp_path / "root", data_cache, f"run_dir={mine}", "train.max_steps=2", "train.checkpoint_every=2"
    )
    assert first.returncode == 0, describe(first)
    assert (mine / ".hydra" / "overrides.yaml").is_file() and (mine / ".submitit").is_dir(), (
        "logs and overrides in PATH"
    )
    assert not (tmp_path / "root" / "pemt-pretrain").exists(), "nothing lands in another run's folder"
    [status] = json.loads(run_resume(str(mine), "--status", "--json").stdout)
    assert status["state"] == "finished" and status["step"] == 2

    moved = tmp_path / "moved"
    mine.rename(moved)
    further = run_resume(str(moved), "train.max_steps=4")
    assert further.returncode == 0, further.stdout[-3000:] + further.stderr[-3000:]
    assert (moved / "checkpoints" / "latest").read_text() == "step_00000004" and not mine.exists()

    changed = run_resume(str(moved), "train.max_steps=6", "loss.temperature=0.5")
    assert changed.returncode != 0
    assert "loss.temperature: 0.1 -> 0.5" in changed.stdout + changed.stderr, changed.stderr[-3000:]
    assert (moved / "checkpoints" / "latest").read_text() == "step_00000004"


def test_two_point_sweep_makes_two_runs(tmp_path: Path, data_cache: Path) -> None:
    # bf16 here, fp32 elsewhere: both precisions run end to end; so do edge and node sparsity
    # under the ZeRO stages the other sparse tests do not use.
    sparse = (
        "model.tokens_per_clip=4",
        "model.attention.kind=block_sparse",
        "model.attention.block_size=4",
        "model.node_sparsity.keep_rate=0.5",
    )
    result = run_pretrain(
        tmp_path,
        data_cache,
        "-m",
        "deepspeed=zero1,zero3",
        "precision=bf16",
        *sparse,
        "train.max_steps=2",
        "train.log_every=1",
        "train.checkpoint_every=2",
    )
    assert result.returncode == 0, describe(result)
    everything = _runs(tmp_path)
    # The sweep is a parent run; its points are its children, side by side in the UI.
    [parent] = [r for r in everything if r.data.tags.get("pemt.sweep")]
    assert parent.info.run_name == "sweep deepspeed=zero1|zero3" and parent.info.status == "FINISHED"
    runs = [r for r in everything if r is not parent]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    zero1, zero3 = (run_name(f"deepspeed={stage}", "precision=bf16", *sparse) for stage in ("zero1", "zero3"))
    assert sorted(r.info.run_name for r in runs) == [zero1, zero3]
    assert all(r.info.status == "FINISHED" for r in runs)
    stages = {r.info.run_name: r.data.params["deepspeed.zero_optimization.stage"] for r in runs}
    assert stages == {zero1: "1", zero3: "3"}
    for name in stages:
        assert (tmp_path / "pemt-pretrain" / name / "checkpoints" / "latest").read_text() == "step_00000002"


def _losses(root: Path, metric: str = "loss") -> dict[int, float]:
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    [run] = _runs(root)
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}


def test_accumulated_steps_with_the_contrastive_loss_resume_exactly(tmp_path: Path, data_cache: Path) -> None:
    """Two micro-batches per rank per step, the optional InfoNCE and compiled blocks: a run stopped
    at step 3 and resumed sees the same samples and computes the same losses as one that never
    stopped; a resume that would change the sample order (another data.streams) is refused."""
    common = (
        "train.grad_accum_steps=2",
        "data.streams=4",  # the global batch of 8 is 4 streams x 2 micro-steps
        "loss.contrastive_weight=0.5",
        "loss.cnn_warmup_steps=0",  # it takes at most half the run: the 3-step part would have another
        "train.log_every=1",
        "train.checkpoint_every=3",
        "train.record_samples=true",
        "train.compile=true",
    )
    straight = run_pretrain(tmp_path / "straight", data_cache, "train.max_steps=6", *common)
    assert straight.returncode == 0, describe(straight)
    assert "train.grad_accum_steps=2: each micro-step's 4 samples normalise their BatchNorms" in straight.stderr
    for steps in (3, 6):
        part = run_pretrain(tmp_path / "resumed", data_cache, f"train.max_steps={steps}", *common)
        assert part.returncode == 0, describe(part)
    name = run_name(
        "train.grad_accum_steps=2", "data.streams=4", "loss.contrastive_weight=0.5", "loss.cnn_warmup_steps=0"
    )
    run_dir = tmp_path / "resumed" / "pemt-pretrain" / name
    seen = keys_by_step(run_dir)
    assert sorted(seen) == [1, 2, 3, 4, 5, 6] and all(len(keys) == 8 for keys in seen.values()), seen
    assert seen == keys_by_step(tmp_path / "straight" / "pemt-pretrain" / name)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")
    contrastive = _losses(tmp_path / "resumed", "loss_contrastive")
    assert sorted(contrastive) == [1, 2, 3, 4, 5, 6] and all(v > 0 for v in contrastive.values())

    other_order = run_pretrain(
        tmp_path / "resumed",
        data_cache,
        "train.max_steps=8",
        *(o for o in common if not o.startswith("data.streams")),
        "data.streams=2",
        f"run_dir='{run_dir}'",  # quoted: the derived name holds '=' and ','
    )
    assert other_order.returncode != 0 and "data.streams" in other_order.stderr, describe(other_order)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006", "nothing was trained"


def test_a_sweep_with_a_failing_point_finishes_the_others_and_says_how_to_continue(
    tmp_path: Path, data_cache: Path
) -> None:
    # A learning rate of 1e30 makes every step after the first non-finite: that point fails.
    result = run_pretrain(
        tmp_path,
        data_cache,
        "-m",
        "train.lr=1e-3,1e30",
        "gpus_per_node=1",
        "train.max_steps=4",
        "train.max_skipped_steps=1",
        "train.checkpoint_every=4",
        "mlflow.system_metrics=false",
    )
    assert result.returncode == 1, describe(result)
    failed_dir = tmp_path / "pemt-pretrain" / run_name("train.lr=1e+30")
    assert f"continue it with: python tools/resume.py {failed_dir}" in result.stderr, describe(result)
    assert "Traceback" not in result.stderr.split("pemt: a job did not finish")[-1]
    everything = _runs(tmp_path)
    [parent] = [r for r in everything if r.data.tags.get("pemt.sweep")]
    assert parent.info.status == "FAILED"
    status = {r.info.run_name: r.info.status for r in everything if r is not parent}
    assert status == {run_name("train.lr=0.001"): "FINISHED", run_name("train.lr=1e+30"): "FAILED"}, status
    finished = tmp_path / "pemt-pretrain" / run_name("train.lr=0.001")
    assert (finished / "checkpoints" / "latest").read_text() == "step_00000004"
