"""`python launch/finetune.py` from a pretraining run and from an exported file, on shards the
downstream adapters wrote; evaluation metrics; bad initialisations."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from conftest import REPO, describe, make_charades, run_launch, run_name, run_pretrain, write_wav
from pemt.data.adapters import charades, esc50, write_dataset
from pemt.downstream.evaluate import mean_average_precision, top_k_accuracy

SHARD_DATA = [
    "data=shards",
    "data.streams=2",
    "train.global_batch_size=4",
    "train.max_steps=3",
    "train.log_every=1",
    "train.checkpoint_every=3",
]


def test_top_k_and_mean_average_precision() -> None:
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.25, 0.55]])
    labels = torch.tensor([1, 1, 0])
    assert top_k_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    # class 0: its positive ranked 1st -> AP 1; class 1: positives ranked 1st and 2nd -> AP 1;
    # class 2 has no positive and is left out.
    assert mean_average_precision(scores, torch.tensor([[0, 1, 0], [1, 1, 0], [0, 0, 0]])) == pytest.approx(1.0)
    # one positive ranked 2nd -> AP 1/2; two ranked 1st and 3rd -> (1 + 2/3) / 2
    assert mean_average_precision(torch.tensor([[0.9], [0.8], [0.1]]), torch.tensor([[0], [1], [0]])) == 0.5
    assert mean_average_precision(torch.tensor([[0.9], [0.8], [0.1]]), torch.tensor([[1], [0], [1]])) == pytest.approx(
        (1 + 2 / 3) / 2
    )
    with pytest.raises(ValueError, match="no positive labels"):
        mean_average_precision(scores, torch.zeros(3, 3))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 4-step pretraining run (1 rank) and its export. The sharing override puts brackets in
    the run dir's name, which DeepSpeed's checkpoint tools once read as a glob pattern."""
    root = tmp_path_factory.mktemp("pretrain")
    result = run_pretrain(
        root,
        root / "cache",
        "gpus_per_node=1",
        "train.max_steps=4",
        "train.checkpoint_every=4",
        "mlflow.system_metrics=false",
        "model.sharing=[layer,cross]",
    )
    assert result.returncode == 0, describe(result)
    run_dir = root / "pemt-pretrain" / run_name("model.sharing=[layer,cross]")  # gpus_per_node is not in it
    export = subprocess.run(
        [sys.executable, str(REPO / "tools" / "export.py"), str(run_dir), "--out", str(root / "model.safetensors")],
        capture_output=True,
        text=True,
    )
    assert export.returncode == 0, export.stderr
    return run_dir, root / "model.safetensors"


def _finetune_run(root: Path) -> tuple:
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("pemt-finetune").experiment_id])
    return client, run


@pytest.mark.slow
def test_charades_multi_label_from_a_pretraining_run(tmp_path: Path, pretrained: tuple[Path, Path]) -> None:
    run_dir, _ = pretrained
    make_charades(tmp_path / "charades")
    write_dataset(charades(tmp_path / "charades"), tmp_path / "shards", samples_per_shard=2, progress=False)
    result = run_launch(
        "finetune.py",
        tmp_path,
        tmp_path / "cache",
        *SHARD_DATA,
        "deepspeed=zero3",
        f"data.shards={tmp_path / 'shards' / 'train'}",
        f"eval.shards={tmp_path / 'shards' / 'test'}",
        f"task.init='{run_dir}'",
        "mlflow.system_metrics=false",
    )
    assert result.returncode == 0, describe(result)

    client, run = _finetune_run(tmp_path)
    pretrain_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert run.info.status == "FINISHED"
    assert run.data.tags["pemt.pretrain_run_id"] == pretrain_id, "linked to the pretraining run"
    assert run.data.tags["pemt.init"] == str(run_dir) and run.data.tags["pemt.task"] == "long_av"
    # the model section is the pretraining run's, whatever the fine-tuning defaults say
    assert run.data.params["model.sharing"] == "['layer', 'cross']"
    # 3 test videos over 2 ranks (one gets 2, one 1); the one without actions counts as a sample
    assert run.data.metrics["test_samples"] == 3
    assert 0.0 < run.data.metrics["test_map"] <= 100.0
    [evaluation] = [json.loads(line) for line in (Path(run.data.tags["pemt.run_dir"]) / "eval.jsonl").open()]
    assert evaluation["step"] == 3 and evaluation["test_map"] == pytest.approx(run.data.metrics["test_map"])
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2, 3] and all(math.isfinite(m.value) for m in losses)


@pytest.mark.slow
def test_esc50_linear_probe_from_an_export_keeps_the_cnn(tmp_path: Path, pretrained: tuple[Path, Path]) -> None:
    _, exported = pretrained
    root = tmp_path / "esc"
    (root / "meta").mkdir(parents=True)
    rows = [
        (f"{fold}-{i}-A-{target}.wav", fold, target)
        for i, (fold, target) in enumerate([(2, 0), (2, 1), (3, 0), (3, 1), (1, 0), (1, 1)])
    ]
    (root / "meta" / "esc50.csv").write_text(
        "filename,fold,target,category\n"
        + "".join(f"{f},{fold},{t},{'dog' if t == 0 else 'rain'}\n" for f, fold, t in rows)
    )
    for filename, _, _ in rows:
        write_wav(root / "audio" / filename, seconds=0.5)
    write_dataset(esc50(root, split=1), tmp_path / "shards", samples_per_shard=2, progress=False)

    result = run_launch(
        "finetune.py",
        tmp_path,
        tmp_path / "cache",
        *SHARD_DATA,
        "task.name=audio_linear",
        "task.loss=multi_margin",
        f"data.shards={tmp_path / 'shards' / 'train'}",
        f"eval.shards={tmp_path / 'shards' / 'test'}",
        f"task.init={exported}",
        "mlflow.system_metrics=false",
    )
    assert result.returncode == 0, describe(result)
    _, run = _finetune_run(tmp_path)
    assert run.data.tags["pemt.init"] == str(exported) and "pemt.pretrain_run_id" in run.data.tags
    assert run.data.metrics["test_samples"] == 2 and "test_top1" in run.data.metrics

    export = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "export.py"),
            run.data.tags["pemt.run_dir"],
            "--out",
            str(tmp_path / "probe.safetensors"),
        ],
        capture_output=True,
        text=True,
    )
    assert export.returncode == 0, export.stderr
    before, after = load_file(str(exported)), load_file(str(tmp_path / "probe.safetensors"))
    cnn = [k for k in after if k.startswith("backbone.audio_cnn.")]
    assert cnn and all(torch.equal(after[k], before[k]) for k in cnn), "the audio CNN stays frozen"
    assert after["head.weight"].shape[0] == 2


@pytest.mark.slow
def test_visual_clip_from_an_mlflow_run_id_evaluates_every_step(tmp_path: Path, pretrained: tuple[Path, Path]) -> None:
    run_dir, _ = pretrained
    pretrain_id = (run_dir / "mlflow_run_id").read_text().strip()
    store = f"sqlite:///{run_dir.parents[1]}/mlflow.db"  # where the pretraining run is recorded
    result = run_launch(
        "finetune.py",
        tmp_path,
        tmp_path / "cache",
        "gpus_per_node=1",
        "task.name=visual_clip",
        f"task.init={pretrain_id}",
        f"mlflow.tracking_uri={store}",
        "train.max_steps=3",
        "train.checkpoint_every=3",
        "eval.every=1",
        "eval.synthetic_videos=8",
        "mlflow.system_metrics=false",
    )
    assert result.returncode == 0, describe(result)
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("pemt-finetune").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["pemt.task"] == "visual_clip"
    assert run.data.tags["pemt.pretrain_run_id"] == pretrain_id
    evaluations = [json.loads(line) for line in (Path(run.data.tags["pemt.run_dir"]) / "eval.jsonl").open()]
    assert [e["step"] for e in evaluations] == [1, 2, 3]
    assert all(e["test_samples"] == 8 and 0.0 <= e["test_top1"] <= 100.0 for e in evaluations)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "test_top1")) == [1, 2, 3]


def test_bad_initialisation_is_named_before_anything_runs(tmp_path: Path) -> None:
    missing = run_launch("finetune.py", tmp_path, tmp_path / "cache", f"task.init={tmp_path}/nope")
    assert missing.returncode == 2
    assert f"task.init={tmp_path}/nope: no such run dir or file" in missing.stderr
    unknown = run_launch("finetune.py", tmp_path, tmp_path / "cache", f"task.init={'0' * 32}")
    assert unknown.returncode != 0 and f"task.init={'0' * 32}: MLflow run" in unknown.stderr
    wrong = run_launch("finetune.py", tmp_path, tmp_path / "cache", "task.name=video_qa")
    assert wrong.returncode == 2 and "task.name='video_qa': choose one of visual_clip" in wrong.stderr
