"""The cluster group maps nodes and gpus_per_node onto hydra-submitit-launcher's settings."""

from __future__ import annotations

from conftest import REPO
from pemt.config import compose_config


def _launcher(*overrides: str) -> dict:
    cfg = compose_config("pretrain", overrides=list(overrides), hydra=True)
    return cfg.hydra.launcher


def test_local_cluster_runs_processes_on_this_machine() -> None:
    launcher = _launcher("gpus_per_node=3")
    assert launcher._target_ == "hydra_plugins.pemt_launcher.launchers.LocalLauncher"
    assert (launcher.nodes, launcher.tasks_per_node) == (1, 3)


def test_slurm_cluster_takes_partition_time_shape_and_signal_from_config() -> None:
    launcher = _launcher(
        "cluster=slurm",
        "nodes=8",
        "gpus_per_node=4",
        "cluster.partition=gpu",
        "cluster.time_min=90",
        "cluster.signal_delay_s=300",
        "cluster.max_requeue=5",
    )
    assert launcher._target_ == "hydra_plugins.pemt_launcher.launchers.SlurmLauncher"
    assert launcher.partition == "gpu"
    assert launcher.timeout_min == 90
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (8, 4, 4)
    assert launcher.signal_delay_s == 300
    assert launcher.max_num_timeout == 5


def test_run_dir_ignores_keys_that_do_not_change_the_science() -> None:
    cfg = compose_config("pretrain", hydra=True)
    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert {"train.max_steps", "nodes", "gpus_per_node", "cluster", "train.compile", "model.batchnorm"} <= excluded
    assert "train.lr" not in excluded


def test_a_key_that_continues_a_run_may_also_change_on_resume() -> None:
    """Keys left out of the run dir's name (the same command continues the run) are the ones a
    resume accepts changed: the two lists cannot drift apart."""
    from pemt.train.continuity import EXECUTION_KEYS, _under

    cfg = compose_config("pretrain", hydra=True)
    excluded = list(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert [key for key in excluded if not _under(key, EXECUTION_KEYS)] == []
    assert {"train.stop_on_collapse", "train.collapse.patience"} <= set(excluded)


def test_no_cluster_setting_changes_the_run_dir() -> None:
    """Moving a run to another partition, time limit or requeue policy continues the same run."""
    from omegaconf import OmegaConf

    cfg = compose_config("pretrain", hydra=True)
    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    for path in (REPO / "configs" / "cluster").glob("*.yaml"):
        keys = OmegaConf.load(path).get("cluster", {}).keys()
        assert {f"cluster.{key}" for key in keys if key != "name"} <= excluded, path.name


def test_run_names_stay_one_folder_of_legal_length() -> None:
    from pemt.config import MAX_RUN_NAME_BYTES, run_name

    assert run_name("") == "default"
    assert run_name("data.shards=/data/ucf/train,seed=1").startswith("data.shards=_data_ucf_train,seed=1-")
    assert run_name("data.shards=/d/a_b") != run_name("data.shards=/d/a/b"), "a path separator is not a '_'"
    assert run_name("deepspeed=zero1,train.lr=0.1") == "deepspeed=zero1,train.lr=0.1", "names without paths stay plain"
    long = ",".join(f"data.shards=/very/long/path/{i}" for i in range(20))
    name = run_name(long)
    assert len(name.encode()) <= MAX_RUN_NAME_BYTES and "/" not in name
    assert run_name(long) == name, "the same overrides find the same run again"
    assert run_name(long + "x") != name, "different overrides never share a run"


def test_ctrl_c_while_waiting_for_slurm_leaves_at_once_even_mid_poll(tmp_path) -> None:
    """Whatever the launcher is in when Ctrl-C comes (here a poll that swallows the interrupt,
    as a library's retry loop may), it exits 130 at once and says the jobs keep running."""
    import signal
    import subprocess
    import sys
    import time

    waiting = tmp_path / "waiting"
    script = (
        "import pathlib, time\n"
        "from pemt.cluster.launcher import _detach_on_interrupt\n"
        "with _detach_on_interrupt('pemt: stopped waiting; the jobs keep running\\n'):\n"
        f"    pathlib.Path({str(waiting)!r}).touch()\n"
        "    while True:\n"
        "        try:\n"
        "            time.sleep(0.1)\n"
        "        except KeyboardInterrupt:\n"
        "            pass\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not waiting.exists() and time.time() < deadline:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGINT)
    _, stderr = launcher.communicate(timeout=10)
    assert launcher.returncode == 130, stderr
    assert "the jobs keep running" in stderr


def test_ctrl_c_or_a_closed_terminal_ends_the_launcher_even_when_nobody_reads_its_output(tmp_path) -> None:
    """The log relay echoes a job's output into a pipe nobody reads until the pipe is full; Ctrl-C
    (or SIGHUP from a closed terminal) still ends the launcher within seconds."""
    import signal
    import subprocess
    import sys
    import time

    job = tmp_path / "sweep" / ".submitit" / "17"
    job.mkdir(parents=True)
    (job / "17_0_log.err").write_text("a job's progress line\n" * 50_000)  # ~1 MB: far more than a pipe holds
    waiting = tmp_path / "waiting"
    script = (
        "import pathlib, time\n"
        "from pemt.cluster.launcher import _detach_on_interrupt\n"
        "from pemt.cluster.relay import LogRelay\n"
        f"relay = LogRelay({str(tmp_path / 'sweep' / '.submitit' / '%j')!r}, poll_s=0.05)\n"
        "relay.started_at = 0\n"
        "with _detach_on_interrupt('pemt: stopped waiting; the jobs keep running\\n'):\n"
        "    relay.start()\n"
        "    time.sleep(1.0)\n"
        f"    pathlib.Path({str(waiting)!r}).touch()\n"
        "    print('the launcher reports something', file=__import__('sys').stderr)\n"
        "    while True:\n"
        "        time.sleep(0.1)\n"
    )
    for signum in (signal.SIGINT, signal.SIGHUP):
        waiting.unlink(missing_ok=True)
        launcher = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE)  # never read
        deadline = time.time() + 60
        while not waiting.exists() and time.time() < deadline and launcher.poll() is None:
            time.sleep(0.05)
        assert waiting.exists(), "the launcher got past its own report line"
        launcher.send_signal(signum)
        started = time.time()
        while launcher.poll() is None and time.time() - started < 10:
            time.sleep(0.05)
        ended = launcher.poll()
        if ended is None:
            launcher.kill()
        launcher.wait()
        assert ended == 130, f"{signal.Signals(signum).name}: still running 10 s later" if ended is None else ended
