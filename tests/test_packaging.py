"""The installed package: configs inside it, console scripts, and a run launched away from the
repository (as after `pip install .`)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, SMALL_DATA, describe


def test_the_wheel_carries_configs_entry_points_and_types(tmp_path: Path) -> None:
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = tmp_path.glob("pemt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in (
        "pemt/configs/pretrain.yaml",
        "pemt/configs/finetune.yaml",
        "pemt/configs/model/avbert_base.yaml",
        "pemt/configs/cluster/slurm.yaml",
        "pemt/py.typed",
        "hydra_plugins/pemt_launcher/launchers.py",
    ):
        assert needed in names, needed
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in ("pemt-pretrain", "pemt-finetune", "pemt-resume", "pemt-export"):
        assert f"{script} = pemt.apps." in entry_points


@pytest.mark.slow
def test_an_installed_pemt_pretrains_and_resumes_away_from_the_repository(tmp_path: Path, data_cache: Path) -> None:
    bin_dir = Path(sys.executable).parent
    elsewhere = tmp_path / "somewhere"
    elsewhere.mkdir()
    run = [
        str(bin_dir / "pemt-pretrain"),
        f"paths.cache={data_cache}",
        *SMALL_DATA,
        "train.checkpoint_every=2",
        "mlflow.system_metrics=false",
    ]
    first = subprocess.run([*run, "train.max_steps=2"], cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, describe(first)
    [run_dir] = [p.parent.parent for p in (elsewhere / "outputs").rglob(".hydra/overrides.yaml")]
    resumed = subprocess.run(
        [str(bin_dir / "pemt-resume"), str(run_dir), "train.max_steps=4"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
