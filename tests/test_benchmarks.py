"""Benchmarks whose smoke runs CI keeps working (the full runs take hours)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _mlflow_runs(root: Path) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")  # the pretraining config's store under paths.root
    return len(client.search_runs([client.get_experiment_by_name("pemt-evidence").experiment_id]))


def test_sharing_quality_quick_runs_the_whole_path_and_continues_from_its_cache(tmp_path: Path) -> None:
    """`sharing_quality.py --quick`: a pretraining run through launch/pretrain.py (in MLflow), probes
    of it and of a random initialisation of the same shape, the table and the plot; run again, it
    pretrains nothing and writes the same table."""
    root, out = tmp_path / "root", tmp_path / "out"
    command = [sys.executable, str(REPO / "benchmarks" / "sharing_quality.py"), "--quick", "--root", str(root)]
    first = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    table = (out / "sharing_quality_quick.md").read_text()
    assert "| random init, factorized r64 |" in table and "| factorized r64 |" in table
    assert (out / "sharing_quality_quick.png").stat().st_size > 0
    rows = json.loads((root / "rows.json").read_text())
    assert sorted(r["random"] for r in rows) == [False, True]
    for row in rows:
        probe = row["probe"]
        assert all(0.0 <= probe[k] <= 100.0 for k in ("full", "2-shot", "4-shot", "8-shot"))
        assert all(0.0 < v < 2.0 for v in probe["spread"].values()), probe["spread"]
    pretrained = next(r for r in rows if not r["random"])
    assert set(pretrained["losses"]) == {"loss_mep_visual", "loss_mep_audio", "loss_pair"}
    assert _mlflow_runs(root) >= 1
    runs = _mlflow_runs(root)

    again = subprocess.run([*command, "--out", str(tmp_path / "again")], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _mlflow_runs(root) == runs, "nothing pretrained again"
    assert (tmp_path / "again" / "sharing_quality_quick.md").read_text() == table


def test_pair_objective_quick_writes_every_row_and_out_norm_spreads_the_clips(tmp_path: Path) -> None:
    """`pair_objective.py --quick`: every row trains and lands in the table, and the rows with
    `out_norm` show clip embeddings that differ between videos far more than the row without."""
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "benchmarks" / "pair_objective.py"), "--quick", "--root", str(tmp_path)]
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in (out / "pair_objective_quick.md").read_text().splitlines() if line.startswith("|")]
    rows = [line.split("|")[1:-1] for line in table[2:]]  # after the header and its rule
    assert [(r[0].strip(), r[1].strip(), r[2].strip()) for r in rows] == [
        ("no out_norm", "bos", "fixed"),
        ("out_norm", "bos", "fixed"),
        ("out_norm", "bos", "new"),
        ("out_norm", "bos", "new"),
        ("out_norm", "agreement", "new"),
        ("out_norm", "agreement", "new"),
    ]
    for row in rows:
        assert 0.0 < float(row[4]) < 10.0 and 0.0 <= float(row[5]) <= 1.0, row
    visual_spread = [float(r[7].split("/")[0]) for r in rows]
    assert min(visual_spread[1:]) > 3 * visual_spread[0], visual_spread
