"""Bad configs stop the launch with a message naming the key, before any job starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import describe, run_pretrain


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
        (["-m", "nodes=1", "gpus_per_node=1,2"], "gpus_per_node differs between sweep points"),
        (["-m", "train.global_batch_size=8,9"], "train.global_batch_size=9 is not divisible"),
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
