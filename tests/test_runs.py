"""Run dirs: one live owner, resuming what was trained (or saying what changed), and the command
that continues a run wherever its folder now is."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO
from pemt.config import ConfigError
from pemt.ownership import RunBusy, RunLock
from pemt.runs import RunNotFound, resume_command, run_status
from pemt.train.continuity import check_continuity

HOLD = """
import sys, time
from pathlib import Path
from pemt.ownership import RunLock
RunLock(Path(sys.argv[1])).acquire("training")
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def owner(tmp_path: Path):
    """A live process that owns tmp_path/run (its lock held, its identity recorded)."""
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert process.stdout.readline().strip() == "held"
    yield run_dir, process
    process.kill()
    process.wait()


def test_a_live_owner_keeps_its_run_dir_and_a_dead_one_is_taken_over(owner) -> None:
    run_dir, process = owner
    with pytest.raises(RunBusy, match=rf"training \(pid {process.pid} on .*since"):
        RunLock(run_dir).acquire("training")
    assert RunLock(run_dir).holder()["pid"] == process.pid
    process.kill()
    process.wait()
    assert RunLock(run_dir).holder() is None, "the kernel dropped a dead owner's lock"
    lock = RunLock(run_dir)
    gone = lock.acquire("training")
    assert gone["pid"] == process.pid, "the dead owner is reported as taken over"
    lock.release()


def test_an_owner_recorded_on_a_file_system_without_shared_locks_still_counts(tmp_path: Path) -> None:
    """No lock is held (as on a network file system that does not share locks between nodes), but
    the recorded owner is a live process: it still owns the run dir."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        import psutil

        from pemt.ownership import this_process

        record = {
            **this_process("training"),
            "pid": sleeper.pid,
            "pid_started": psutil.Process(sleeper.pid).create_time(),
        }
        (tmp_path / ".pemt.lock").write_text(json.dumps(record))
        with pytest.raises(RunBusy, match="not visible from here"):
            RunLock(tmp_path).acquire("training")
    finally:
        sleeper.kill()
        sleeper.wait()
    RunLock(tmp_path).acquire("training")  # now it is gone


def _fake_run(run_dir: Path, job: str = "pretrain", launched_from: Path = REPO) -> Path:
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(["deepspeed=zero1", "train.max_steps=10"]))
    (hydra_dir / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"job": {"name": job}, "runtime": {"cwd": str(launched_from)}}})
    )
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"max_steps": 10}}))
    return run_dir


def test_resume_py_leaves_a_live_run_alone(owner) -> None:
    run_dir, process = owner
    _fake_run(run_dir)
    assert run_status(run_dir).state == "running"
    resumed = subprocess.run(
        [sys.executable, str(REPO / "tools" / "resume.py"), str(run_dir), "--dry-run"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert resumed.returncode == 2 and f"in use by training (pid {process.pid}" in resumed.stderr, resumed.stderr


def test_the_resume_command_lands_in_the_run_dir_wherever_it_is(tmp_path: Path) -> None:
    run_dir = _fake_run(tmp_path / "moved" / "model.sharing=[layer,cross],seed=1")
    command, cwd = resume_command(run_dir, ["train.max_steps=20"])
    assert command[1:3] == ["-m", "pemt.apps.pretrain"] and cwd == REPO
    assert command[3:] == ["deepspeed=zero1", "train.max_steps=20", f"run_dir='{run_dir.resolve()}'"]
    _fake_run(tmp_path / "odd", job="../../tmp/evil")
    with pytest.raises(RunNotFound, match="not one of pemt's entry points"):
        resume_command(tmp_path / "odd", [])


SAVED = {
    "config": {
        "seed": 0,
        "nodes": 1,
        "train": {"lr": 0.001, "max_steps": 10, "warmup_steps": 2},
        "loss": {"temperature": 0.1},
        "data": {"shards": "/d/a", "num_workers": 2},
    },
    "data_manifest": "abc",
}


def _config(**changes: object) -> tuple:
    config = json.loads(json.dumps(SAVED["config"]))
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            config[section][name] = value
        else:
            config[section] = value
    return OmegaConf.create(config), config


def test_resuming_refuses_a_change_of_what_is_learned_and_names_it(caplog: pytest.LogCaptureFixture) -> None:
    cfg, config = _config(nodes=4, data__num_workers=8, data__shards="/moved/a")
    check_continuity(SAVED, cfg, config, "abc", 5)  # resources and where the data now is: fine
    cfg, config = _config(loss__temperature=0.5)
    with pytest.raises(
        ConfigError, match=r"loss.temperature: 0.1 -> 0.5.*train.allow_config_change=\[loss.temperature\]"
    ):
        check_continuity(SAVED, cfg, config, "abc", 5)
    cfg.train.allow_config_change = ["loss"]
    with caplog.at_level(logging.WARNING):
        check_continuity(SAVED, cfg, config, "abc", 5)
    assert "accepted by train.allow_config_change: loss.temperature" in caplog.text
    cfg, config = _config()
    with pytest.raises(ConfigError, match=r"data.shards \(its manifest.json changed\)"):
        check_continuity(SAVED, cfg, config, "def", 5)


def test_a_key_added_since_the_checkpoint_counts_with_what_runs_without_it_learned() -> None:
    """A checkpoint written before train.transformer_lr_scale existed trained everything at
    train.lr: resuming it at another scale is refused by name, at 1.0 it continues."""
    cfg, config = _config(train__transformer_lr_scale=0.3)
    with pytest.raises(ConfigError, match=r"train.transformer_lr_scale: 1.0 -> 0.3"):
        check_continuity(SAVED, cfg, config, "abc", 5)
    for earlier in (1.0, 1):
        cfg, config = _config(train__transformer_lr_scale=earlier)
        check_continuity(SAVED, cfg, config, "abc", 5)


def test_a_longer_run_says_how_its_schedule_stretches(caplog: pytest.LogCaptureFixture) -> None:
    cfg, config = _config(train__max_steps=20)
    with caplog.at_level(logging.WARNING):
        check_continuity(SAVED, cfg, config, "abc", 6)
    assert "train.max_steps 10 -> 20: the cosine schedule's decay is now 18 steps instead of 8 steps" in caplog.text
    assert "at step 6 the learning rate goes from 0.0005 to 0.000883" in caplog.text
    caplog.clear()
    cfg, config = _config(train__max_steps=20, train__warmup_steps=30)  # a warm-up past the run's end
    saved = {**SAVED, "config": {**SAVED["config"], "train": {**SAVED["config"]["train"], "warmup_steps": 30}}}
    with caplog.at_level(logging.WARNING):
        check_continuity(saved, cfg, config, "abc", 6)
    assert "decay is now none (train.warmup_steps=30 outlasts it) instead of none" in caplog.text


def test_a_longer_short_run_says_its_cnn_warmup_moves(caplog: pytest.LogCaptureFixture) -> None:
    """The CNN warm-up takes at most half the run: raising train.max_steps of a 100-step run
    (warm-up 50) to 1000 makes it 300, and the log says MEP and the pair wait again."""
    loss = {"temperature": 0.1, "cnn_warmup_steps": 300, "contrastive_weight": 1.0}
    saved = {**SAVED, "config": {**SAVED["config"], "train": {**SAVED["config"]["train"], "max_steps": 100}}}
    saved["config"]["loss"] = loss
    config = json.loads(json.dumps(saved["config"]))
    config["train"]["max_steps"] = 1000
    with caplog.at_level(logging.WARNING):
        check_continuity(saved, OmegaConf.create(config), config, "abc", 60)
    assert "the CNN warm-up (at most half the run) is now 300 steps instead of 50" in caplog.text
    assert "from step 60 MEP and the pair wait until step 300" in caplog.text
    caplog.clear()
    ended = {**saved, "cnn_warmup": {"recent": [], "ended_at": 40, "learned": True}}
    with caplog.at_level(logging.WARNING):
        check_continuity(ended, OmegaConf.create(config), config, "abc", 60)
    assert "CNN warm-up" not in caplog.text, "a warm-up that ended stays where it ended"


def test_credentials_never_reach_a_config_an_override_file_or_a_log() -> None:
    from pemt.cluster.launcher import _normalised
    from pemt.secrets import redact, redact_config

    environ_before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    try:
        [overrides] = _normalised([["mlflow.tracking_uri=https://alice:s3cr%3At@track.example:5000", "seed=1"]])
        assert overrides == ["mlflow.tracking_uri='https://track.example:5000'", "seed=1"]
        # as a sweep hands them over: Hydra escapes the colons
        [swept] = _normalised([[r"mlflow.tracking_uri=https\://alice\:s3cr%3At@track.example\:5000"]])
        assert swept == ["mlflow.tracking_uri='https://track.example:5000'"]
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cr:t"
        with pytest.raises(ConfigError, match="other credentials"):
            _normalised([["mlflow.tracking_uri=https://bob:x@track.example:5000"]])
    finally:
        for key, value in environ_before.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    assert redact("see https://u:p@h/x?token=abc&n=1") == "see https://***@h/x?token=***&n=1"
    assert redact(r"uri=http\://u\:p@h\:1 db.password=x AWS_SESSION_TOKEN=y") == (
        r"uri=http\://***@h\:1 db.password=*** AWS_SESSION_TOKEN=***"
    )
    assert redact('{"secret_key": "k", "tokens_per_clip": 4}') == '{"secret_key": "***", "tokens_per_clip": 4}'
    assert redact_config({"a": ["http://u:p@h"], "b": 3}) == {"a": ["http://***@h"], "b": 3}
    [one] = _normalised([["run_dir=relative/run"]])
    assert one == [f"run_dir='{Path('relative/run').resolve()}'"]
    with pytest.raises(ConfigError, match="names one run, but the sweep has 2 points"):
        _normalised([["run_dir=/a", "seed=1"], ["run_dir=/a", "seed=2"]])


def test_many_jobs_on_one_sqlite_store_are_warned_about(tmp_path: Path) -> None:
    from pemt.cluster.preflight import tracking_store_warnings

    point = {"nodes": 1, "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}}
    assert tracking_store_warnings([OmegaConf.create(point)]) == []  # one job on a local disk
    [warning] = tracking_store_warnings([OmegaConf.create(point)] * 2)
    assert "2 job(s) will write to one SQLite store" in warning and "tracking_uri=http://" in warning
    assert tracking_store_warnings([OmegaConf.create({**point, "mlflow": {"tracking_uri": "http://h:5000"}})] * 2) == []
