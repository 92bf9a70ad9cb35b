"""The collapse watch: what it calls collapsed, when, and how often it says so."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import describe, run_name, run_pretrain
from pemt.config import ConfigError
from pemt.train.collapse import CollapseLimits, CollapseWatch, check_collapse

# No MEP, at a learning rate far too high for the pair head (the transformers' too, and from the
# first step): the fused output stops depending on the video within a few steps (the default
# InfoNCE beside it does not prevent it)
FORCED_COLLAPSE = ["loss.mep_weight=0", "train.lr=0.05", "train.transformer_lr_scale=1", "loss.cnn_warmup_steps=0"]
LIMITS = CollapseLimits(min_spread=0.02, min_pair_logit_spread=0.05, chance_margin=0.05, min_grad_norm=0.01, patience=3)
HEALTHY = {"spread_fused": 0.3, "pair_logit_spread": 1.2, "pair_accuracy": 0.8, "grad_norm": 2.0}


def test_a_fused_output_that_stops_depending_on_the_video_is_called_collapsed_once() -> None:
    watch = CollapseWatch(LIMITS, warmup_steps=10)
    flat = {"spread_fused": 0.004, "pair_accuracy": 0.5, "grad_norm": 1.5}
    assert watch.observe(10, flat) is None, "not judged during warm-up"
    assert watch.observe(15, flat) is None and watch.observe(20, flat) is None
    message = watch.observe(25, flat)
    assert message is not None and "step 25" in message and "spread is 0.0040" in message
    assert "train.lr" in message, "it says what to try"
    assert watch.observe(30, flat) is None, "said once"


def test_chance_accuracy_counts_only_with_a_vanishing_gradient() -> None:
    watch = CollapseWatch(LIMITS, warmup_steps=0)
    learning_slowly = {"spread_fused": 0.2, "pair_accuracy": 0.52, "grad_norm": 1.0}
    assert all(watch.observe(step, learning_slowly) is None for step in range(1, 10))
    stuck = {"spread_fused": 0.2, "pair_accuracy": 0.5, "grad_norm": 0.001}
    verdicts = [watch.observe(step, stuck) for step in range(10, 13)]
    assert verdicts[:2] == [None, None] and verdicts[2] is not None and "gradient norm of 0.001" in verdicts[2]


def test_a_pair_head_that_answers_alike_is_called_collapsed_whatever_the_gradient() -> None:
    """The other objectives (the InfoNCE, MEP) keep the gradient large and the fused output varied
    enough, while the pair head gives every pair the same answer (the digits task at 600 steps:
    logit spread 0.002-0.03, fused spread 0.03)."""
    watch = CollapseWatch(LIMITS, warmup_steps=0)
    answers_alike = {"spread_fused": 0.035, "pair_logit_spread": 0.01, "pair_accuracy": 0.59, "grad_norm": 3.0}
    verdicts = [watch.observe(step, answers_alike) for step in range(1, 4)]
    assert verdicts[:2] == [None, None] and verdicts[2] is not None
    assert "logit varies by 0.0100" in verdicts[2] and "min_pair_logit_spread=0.05" in verdicts[2]
    assert "loss.contrastive_weight" in verdicts[2], "it says what to try"
    starting = CollapseWatch(LIMITS, warmup_steps=0)  # a random initialisation's head: std ~0.1
    assert all(starting.observe(s, {**answers_alike, "pair_logit_spread": 0.1}) is None for s in range(1, 9))


def test_patience_restarts_after_a_healthy_log_step_and_unjudged_runs_pass() -> None:
    watch = CollapseWatch(LIMITS, warmup_steps=0)
    flat = {**HEALTHY, "spread_fused": 0.001}
    for step, metrics in enumerate([flat, flat, HEALTHY, flat, flat], start=1):
        assert watch.observe(step, metrics) is None
    assert watch.observe(6, flat) is not None
    fine_tuning = CollapseWatch(LIMITS, warmup_steps=0)
    assert all(fine_tuning.observe(step, {"loss": 2.3, "grad_norm": 0.0}) is None for step in range(1, 20))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("collapse.patience", 0, "train.collapse.patience=0"),
        ("collapse.min_spread", -1.0, "train.collapse.min_spread=-1.0"),
        ("collapse.min_pair_logit_spread", -0.1, "train.collapse.min_pair_logit_spread=-0.1"),
        ("stop_on_collapse", "yes", "train.stop_on_collapse='yes'"),
    ],
)
def test_collapse_keys_are_checked(key: str, value: object, message: str) -> None:
    train = {
        "stop_on_collapse": False,
        "collapse": {
            "min_spread": 0.02,
            "min_pair_logit_spread": 0.05,
            "chance_margin": 0.05,
            "min_grad_norm": 0.01,
            "patience": 3,
        },
    }
    cfg = OmegaConf.create({"train": train})
    OmegaConf.update(cfg, f"train.{key}", value)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        check_collapse(cfg)


def _tags_and_status(root: Path) -> tuple[dict[str, str], str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("pemt-pretrain").experiment_id])
    return run.data.tags, run.info.status


JUDGED = ["train.log_every=2", "train.warmup_steps=4", "train.checkpoint_every=100", "mlflow.system_metrics=false"]


@pytest.mark.slow
def test_a_collapsing_run_is_warned_about_tagged_and_stopped_with_its_checkpoint(
    tmp_path: Path, data_cache: Path
) -> None:
    result = run_pretrain(
        tmp_path, data_cache, *FORCED_COLLAPSE, "train.max_steps=40", "train.stop_on_collapse=true", *JUDGED
    )
    assert result.returncode != 0, describe(result)
    [line] = [ln for ln in result.stderr.splitlines() if "representation collapse at step" in ln and "WARNING" in ln]
    step = int(line.split("representation collapse at step ")[1].split(":")[0])
    assert step < 40 and "train.lr" in line
    assert "Stopped (train.stop_on_collapse=true)" in result.stderr, describe(result)
    run_dir = tmp_path / "pemt-pretrain" / run_name(*FORCED_COLLAPSE, "train.warmup_steps=4")
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:08d}", "its checkpoint is kept"
    tags, status = _tags_and_status(tmp_path)
    assert tags["pemt.collapse"].startswith(f"representation collapse at step {step}") and status == "FAILED"


@pytest.mark.slow
def test_a_healthy_run_is_never_called_collapsed(tmp_path: Path, data_cache: Path) -> None:
    result = run_pretrain(tmp_path, data_cache, "train.max_steps=30", *JUDGED)
    assert result.returncode == 0, describe(result)
    assert "representation collapse" not in result.stderr
    tags, status = _tags_and_status(tmp_path)
    assert "pemt.collapse" not in tags and status == "FINISHED"
    # its CNNs match sound and picture within a few steps: the CNN warm-up ends there, not at 15
    assert "CNN warm-up over at step" in result.stderr and "pemt.cnn_warmup" not in tags
    assert 10 <= _metric(tmp_path, "cnn_warmup_end") < 15


@pytest.mark.slow
def test_a_cnn_warmup_that_runs_its_longest_without_learning_says_so(tmp_path: Path, data_cache: Path) -> None:
    never = "loss.cnn_warmup_until=0.05"  # an InfoNCE no run reaches in a few steps
    result = run_pretrain(tmp_path, data_cache, "train.max_steps=24", never, *JUDGED)
    assert result.returncode == 0, describe(result)
    [line] = [ln for ln in result.stderr.splitlines() if "CNN warm-up ran its longest" in ln]
    assert "WARNING" in line and "12 steps" in line and "loss.cnn_warmup_steps" in line
    tags, _ = _tags_and_status(tmp_path)
    assert tags["pemt.cnn_warmup"].startswith("CNN warm-up ran its longest")
    assert _metric(tmp_path, "cnn_warmup_end") == 12


def _metric(root: Path, key: str) -> float:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("pemt-pretrain").experiment_id])
    return float(run.data.metrics[key])
