"""Bad configs stop the launch with a message naming the key, before any job starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, describe, run_name, run_pretrain


def _assert_nothing_started(root: Path) -> None:
    assert not list(root.rglob(".submitit")), "a job was submitted"
    assert not (root / "mlflow.db").exists(), "the tracking store was touched"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model=does_not_exist"], "model/does_not_exist"),
        (["nodes=0"], "nodes=0"),
        (["train.global_batch_size=7"], "train.global_batch_size=7 is not divisible by world size 2"),
        (["gpus_per_node=3"], "train.global_batch_size=8 is not divisible by world size 3"),
        (["precision=fp8"], "precision='fp8'"),
        (["data.streams=3"], "data.streams=3 is not divisible by world size 2"),
        (["data.streams=16"], "train.global_batch_size=8 is not divisible by data.streams=16"),
        (["nodes=2"], "cluster=local runs on this machine only"),
        (["cluster=slurm", "cluster.requeue=no"], "cluster.requeue='no': choose True or False"),  # a truthy string
        (["model.factorized.normalize=maybe", "model.sharing=[factorized]"], "factorized.normalize='maybe'"),
        (["profile.steps=[3,2]"], "profile.steps=[3, 2]: need 1 <= FIRST <= LAST"),
        (["train.compile=true", "deepspeed=zero3"], "train.compile=true with deepspeed=zero3"),
        (["-m", "nodes=1", "gpus_per_node=1,2"], "gpus_per_node differs between sweep points"),
        (["-m", "train.global_batch_size=8,9"], "train.global_batch_size=9 is not divisible"),
        # Preflight: checks against the machine.
        (["data.synthetic.videos_per_shard=8"], "2 shards for data.streams=8"),
        (["train.keep_last=100000000"], "train.keep_last=100000000 + 1"),
        (["data.shards=https://user:pw@example.org/k700"], "must not carry credentials"),  # nor reach a run dir
        (["data.shards=s3://bucket/k700"], "data=synthetic writes its shards to a local folder"),
    ],
)
def test_bad_config_fails_before_any_job(tmp_path: Path, data_cache: Path, overrides: list[str], expected: str) -> None:
    result = run_pretrain(tmp_path, data_cache, *overrides, timeout=120)
    assert result.returncode != 0, describe(result)
    assert expected in result.stderr + result.stdout, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    _assert_nothing_started(tmp_path)


def test_unreachable_tracking_server_fails_before_any_job(tmp_path: Path, data_cache: Path) -> None:
    result = run_pretrain(tmp_path, data_cache, "mlflow.tracking_uri=http://127.0.0.1:9", timeout=120)
    assert result.returncode != 0, describe(result)
    assert "MLflow tracking server http://127.0.0.1:9 is not reachable" in result.stderr, describe(result)
    assert not list(tmp_path.rglob(".submitit"))


@pytest.mark.parametrize("refusal", ["bad key", "server down", "sweep"])
def test_a_refused_launch_never_echoes_a_secret(tmp_path: Path, data_cache: Path, refusal: str) -> None:
    """The terminal (and so a detached launch's launch.log) shows what was refused, with the
    credentials of a tracking URI and the value of any key named like a secret masked."""
    secrets = ["mlflow.tracking_uri=http://alice:PASSWORD123@127.0.0.1:9/", "+extra.api_token=TOKEN456"]
    cause = {"bad key": ["data.clips=0"], "server down": [], "sweep": ["-m", "seed=1,2", "data.clips=0"]}[refusal]
    result = run_pretrain(tmp_path, data_cache, *cause, *secrets, timeout=120)
    shown = result.stdout + result.stderr
    assert result.returncode != 0, describe(result)
    assert "PASSWORD123" not in shown and "TOKEN456" not in shown, shown[-3000:]
    assert ("in sweep point" in shown) == (refusal != "server down"), shown[-3000:]
    assert "extra.api_token=***" in shown or refusal == "server down", shown[-3000:]
    assert "127.0.0.1" in shown, "what was refused is still named"
    _assert_nothing_started(tmp_path)


def test_preflight_prints_the_plan_and_submits_nothing(tmp_path: Path, data_cache: Path) -> None:
    result = run_pretrain(
        tmp_path, data_cache, "preflight=true", "train.grad_accum_steps=2", "train.global_batch_size=16", timeout=120
    )
    assert result.returncode == 0, describe(result)
    plan = result.stderr
    assert f"run dir     {tmp_path}/pemt-pretrain/" in plan
    assert "1 node(s) x 2 task(s) on this machine" in plan
    assert "4 per rank x 2 accumulation x 2 ranks = 16 per step" in plan
    assert "8 shards over 8 streams" in plan and "experiment pemt-pretrain" in plan
    assert "nothing submitted" in plan
    _assert_nothing_started(tmp_path)


def test_unwritable_checkpoint_dir_stops_the_launch(tmp_path: Path, data_cache: Path) -> None:
    run_dir = tmp_path / "pemt-pretrain" / run_name()
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoints").write_text("a file where the checkpoint folder belongs")
    result = run_pretrain(tmp_path, data_cache, timeout=120)
    assert result.returncode == 2, describe(result)
    assert f"checkpoint dir {run_dir}/checkpoints cannot be created" in result.stderr, describe(result)
    _assert_nothing_started(tmp_path)


def test_missing_shard_folder_stops_the_launch(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "pretrain.py"),
            f"paths.root={tmp_path}",
            "data=shards",
            f"data.shards={tmp_path}/nonexistent",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, describe(result)
    assert f"data.shards={tmp_path}/nonexistent: no shard folder at {tmp_path}/nonexistent" in result.stderr
    _assert_nothing_started(tmp_path)
