"""Training on a real Slurm cluster (slurm/cluster.sh): multi-node, preemption, time limit, node death.

The cluster runs on this machine: munge, slurmdbd + MariaDB, slurmctld and three slurmd nodes
n1-n3, with a `high` partition that preempts `normal`. Jobs go through `launch/pretrain.py
cluster=slurm_local`, i.e. hydra-submitit-launcher's Slurm executor and sbatch.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, SMALL_DATA, describe, run_name

pytestmark = pytest.mark.slow
SCRIPT = REPO / "slurm" / "cluster.sh"
# Ports of a cluster of the tests' own, so a cluster started by hand keeps running beside it.
PORTS = {
    "PEMT_SLURM_CTLD_PORT": "15817",
    "PEMT_SLURM_DBD_PORT": "15819",
    "PEMT_SLURM_DB_PORT": "15306",
    "PEMT_SLURM_NODE_PORT": "15000",
}


@pytest.fixture(scope="module")
def slurm() -> Iterator[dict[str, str]]:
    """The environment in which Slurm commands (and submitit) reach a fresh 3-node cluster."""
    if os.geteuid() != 0:
        pytest.skip("Slurm cannot be started here: slurm/cluster.sh needs root (slurmd starts jobs as their users)")
    # Short path: munge and MariaDB sockets live below it (unix socket paths are limited to 108 bytes).
    state = Path(tempfile.mkdtemp(prefix="pemt-slurm-"))
    env = {**os.environ, **PORTS, "PEMT_SLURM_DIR": str(state), "PEMT_SLURM_GRACE_S": "60"}
    started = subprocess.run(
        [str(SCRIPT), "start", "--nodes", "3"], env=env, capture_output=True, text=True, timeout=600
    )
    assert started.returncode == 0, f"{started.stdout}\n{started.stderr}\n" + _logs(state)
    assert (state / "etc" / "munge.key").stat().st_mode & 0o777 == 0o400, "the munge key is readable by root alone"
    env["SLURM_CONF"] = str(state / "etc" / "slurm.conf")
    yield env
    subprocess.run([str(SCRIPT), "clean"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(state, ignore_errors=True)


def _logs(state: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted((state / "log").glob("*.log")))


def _command(root: Path, cache: Path, *overrides: str) -> list[str]:
    flags = [o for o in overrides if o.startswith("-")]
    values = [o for o in overrides if not o.startswith("-")]
    return [
        sys.executable,
        str(REPO / "launch" / "pretrain.py"),
        *flags,
        "cluster=slurm_local",
        f"paths.root={root}",
        f"paths.cache={cache}",
        *SMALL_DATA,
        "train.log_every=4",
        *values,
    ]


def _run(env: dict[str, str], root: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(root, cache, *overrides), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def _start(env: dict[str, str], root: Path, cache: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        _command(root, cache, *overrides),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _journal(run_dir: Path) -> list[dict]:
    path = run_dir / "jobs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _step_reached(run_dir: Path) -> int:
    """The last step rank 0 has taken (from train.record_samples)."""
    record = run_dir / "samples" / "rank00000.jsonl"
    lines = [line for line in record.read_text().splitlines() if line.endswith("}")] if record.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def _wait_for_step(run_dir: Path, step: int, job: subprocess.Popen, timeout_s: float = 300) -> int:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        reached = _step_reached(run_dir)
        if reached >= step:
            return reached
        if job.poll() is not None:
            raise AssertionError(f"launch ended before step {step}:\n{job.stdout.read()[-4000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"step {step} not reached in {timeout_s} s")


def _sacct(env: dict[str, str], job_id: str, timeout_s: float = 60) -> list[dict[str, str]]:
    """Every record Slurm's accounting keeps of the job's allocation, requeued ones included,
    once the job has ended (the launcher returns when the result is in, a moment before)."""
    deadline = time.time() + timeout_s
    while True:
        out = subprocess.run(
            ["sacct", "-n", "-P", "-X", "--duplicates", "-j", job_id, "-o", "JobID,State,NodeList"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        records = [dict(zip(("job", "state", "nodes"), line.split("|"))) for line in out.splitlines() if line]
        if records and records[-1]["state"] not in ("PENDING", "RUNNING", "COMPLETING") or time.time() > deadline:
            return records
        time.sleep(1)


def _only_run(root: Path):
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("pemt-pretrain").experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def _segments(journal: list[dict]) -> list[tuple[dict, dict | None]]:
    starts = [r for r in journal if r["event"] == "start"]
    ends = [r for r in journal if r["event"] == "end"]
    return [(s, ends[i] if i < len(ends) else None) for i, s in enumerate(starts)]


def test_sweep_of_two_node_jobs_trains_across_nodes(slurm: dict[str, str], tmp_path: Path, data_cache: Path) -> None:
    root = tmp_path / "runs"
    result = _run(
        slurm,
        root,
        data_cache,
        "-m",
        "nodes=2",
        "gpus_per_node=1",
        "train.max_steps=8",
        "train.record_samples=true",
        "train.lr=0.001,0.002",
    )
    assert result.returncode == 0, describe(result)
    assert "partition normal" in result.stderr, "the plan names the partition"
    jobs = set()
    for lr in ("0.001", "0.002"):
        run_dir = root / "pemt-pretrain" / run_name(f"train.lr={lr}")
        [(start, end)] = _segments(_journal(run_dir))
        assert start["cluster"] == "slurm" and start["world_size"] == 2
        assert end["outcome"] == "finished" and end["step"] == 8
        jobs.add(start["job_id"])
        # One task on each of two nodes, both training: Slurm ran the job on two nodes, and each
        # rank recorded the samples it trained on.
        [record] = _sacct(slurm, start["job_id"])
        assert record["state"] == "COMPLETED", record
        assert len(start["hosts"]) == len(set(start["hosts"])) == 2, start
        for rank in (0, 1):
            lines = (run_dir / "samples" / f"rank{rank:05d}.jsonl").read_text().splitlines()
            assert json.loads(lines[-1])["step"] == 8
    assert len(jobs) == 2, "one job per sweep point"
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    everything = client.search_runs([client.get_experiment_by_name("pemt-pretrain").experiment_id])
    [parent] = [r for r in everything if r.data.tags.get("pemt.sweep")]
    runs = [r for r in everything if r is not parent]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    assert sorted(r.data.params["train.lr"] for r in runs) == ["0.001", "0.002"]
    assert all(r.info.status == "FINISHED" and r.data.metrics["samples"] == 8 * 8 for r in runs)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["cluster.partition=gpu"], "cluster.partition=gpu: partitions on this cluster: high, normal"),
        (["nodes=4", "gpus_per_node=1"], "nodes=4 but partition normal has 3 nodes"),
        # GPUs on nodes without any: Slurm itself refuses the job (sbatch --test-only), before anything is queued
        (["cluster.gpus=true"], "Slurm would refuse this job"),
    ],
)
def test_preflight_checks_the_partition(
    slurm: dict[str, str], tmp_path: Path, data_cache: Path, overrides: list[str], expected: str
) -> None:
    result = _run(slurm, tmp_path, data_cache, *overrides)
    assert result.returncode == 2 and expected in result.stderr, describe(result)
    assert not list(tmp_path.rglob(".submitit")), "nothing submitted"


def test_preempted_job_saves_requeues_and_finishes(slurm: dict[str, str], tmp_path: Path, data_cache: Path) -> None:
    root = tmp_path / "runs"
    run_dir = root / "pemt-pretrain" / run_name()
    # No periodic checkpoint before the end: the only one mid-run is the one the signal causes.
    job = _start(
        slurm,
        root,
        data_cache,
        "nodes=2",
        "gpus_per_node=1",
        "train.max_steps=30",
        "train.checkpoint_every=1000",
        "train.record_samples=true",
    )
    _wait_for_step(run_dir, 5, job)
    # A job of the high-priority partition that needs every node: Slurm preempts ours for it.
    urgent = subprocess.run(
        ["sbatch", "--parsable", "-p", "high", "-N", "3", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 2"],
        env=slurm,
        capture_output=True,
        text=True,
        check=True,
    )
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, output[-6000:]
    # the signal reached every process of the step: the data workers ignored it
    assert "DataLoader worker" not in output and "resource_tracker" not in output, output[-6000:]

    [(first, stopped), (second, finished)] = _segments(_journal(run_dir))
    assert first["job_id"] == second["job_id"], "requeued, not resubmitted"
    assert stopped["outcome"] == "preempted" and stopped["step"] >= 5
    assert second["step"] == stopped["step"], "resumed from the step the signal saved"
    assert finished["outcome"] == "finished" and finished["step"] == 30
    states = [r["state"] for r in _sacct(slurm, first["job_id"])]
    assert states == ["REQUEUED", "COMPLETED"], states
    assert [r["state"] for r in _sacct(slurm, urgent.stdout.strip().split(";")[0])] == ["COMPLETED"]

    client, run = _only_run(root)
    assert run.info.status == "FINISHED"
    history = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert history == sorted(set(history)) and history[-1] == 30, history
    assert "signal_to_commit_s" in run.data.metrics and "resume_gap_s" in run.data.metrics
    # MLflow knows each job segment: the same Slurm job id, restarted once.
    segments = [json.loads(run.data.tags[f"pemt.segment.{n:03d}"]) for n in (1, 2)]
    assert [(s["job_id"], s["restart"]) for s in segments] == [(first["job_id"], 0), (first["job_id"], 1)]


def _job_started_at(env: dict[str, str], job_id: str) -> float:
    """When Slurm started the job's current allocation (epoch seconds)."""
    shown = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%S"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    return datetime.datetime.fromisoformat(shown).timestamp()


def test_time_limit_requeues_until_finished(slurm: dict[str, str], tmp_path: Path, data_cache: Path) -> None:
    """The first job segment ends at the time limit on a machine of any speed: its ranks are
    held still (SIGSTOP) past Slurm's warning signal, then let go; they save, requeue, and the
    following segments continue, ending at the limit again or finishing."""
    root = tmp_path / "runs"
    run_dir = root / "pemt-pretrain" / run_name()
    limit_s, delay_s = 120, 60
    job = _start(
        slurm,
        root,
        data_cache,
        "nodes=1",
        "gpus_per_node=2",
        "train.max_steps=200",
        "train.log_every=20",
        "train.checkpoint_every=1000",
        "train.record_samples=true",
        f"cluster.time_min={limit_s // 60}",
        f"cluster.signal_delay_s={delay_s}",
    )
    _wait_for_step(run_dir, 2, job)
    [start] = [r for r in _journal(run_dir) if r["event"] == "start"]
    job_id = str(start["job_id"])
    began = _job_started_at(slurm, job_id)
    subprocess.run(["scancel", "--signal=STOP", job_id], env=slurm, check=True)
    # Slurm sends the warning `delay_s` before the limit (its timer up to 30 s early): by
    # limit - delay + 35 s it is pending in the stopped ranks, with 25 s left to save and requeue.
    time.sleep(max(0.0, began + limit_s - delay_s + 35 - time.time()))
    subprocess.run(["scancel", "--signal=CONT", job_id], env=slurm, check=True)
    output, _ = job.communicate(timeout=900)
    assert job.returncode == 0, output[-6000:]
    assert "DataLoader worker" not in output and "resource_tracker" not in output, output[-6000:]

    segments = _segments(_journal(run_dir))
    assert len(segments) >= 2, segments
    assert segments[0][1]["outcome"] == "time limit" and segments[0][1]["step"] < 200
    for (start_record, end), (following, _) in zip(segments, segments[1:]):
        assert end["outcome"] == "time limit" and following["step"] == end["step"] > start_record["step"]
    assert segments[-1][1]["outcome"] == "finished" and segments[-1][1]["step"] == 200
    states = [r["state"] for r in _sacct(slurm, job_id)]
    assert states[-1] == "COMPLETED" and states[:-1] == ["REQUEUED"] * (len(states) - 1), states
    _, run = _only_run(root)
    assert run.info.status == "FINISHED" and run.data.metrics["samples"] == 200 * 8


def test_job_on_a_dead_node_fails_and_resume_py_finishes_it(
    slurm: dict[str, str], tmp_path: Path, data_cache: Path
) -> None:
    root = tmp_path / "runs"
    run_dir = root / "pemt-pretrain" / run_name()
    # requeue=false: Slurm must not bring the job back by itself, so the failure is the user's to see.
    job = _start(
        slurm,
        root,
        data_cache,
        "nodes=2",
        "gpus_per_node=1",
        "train.max_steps=24",
        "train.checkpoint_every=4",
        "train.record_samples=true",
        "cluster.requeue=false",
    )
    _wait_for_step(run_dir, 6, job)
    [start] = [r for r in _journal(run_dir) if r["event"] == "start"]
    dead = start["hosts"][1]
    killed = subprocess.run([str(SCRIPT), "kill-node", dead], env=slurm, capture_output=True, text=True)
    assert killed.returncode == 0, killed.stderr
    try:
        # Rank 0, on the live node, fails at once (its peer is gone) and records why.
        deadline = time.time() + 120
        while not [r for r in _journal(run_dir) if r["event"] == "end"] and time.time() < deadline:
            time.sleep(0.5)
        status = subprocess.run(
            [sys.executable, "tools/resume.py", str(run_dir), "--status", "--json"],
            cwd=REPO,
            env=slurm,
            capture_output=True,
            text=True,
        )
        [before] = json.loads(status.stdout)
        assert before["state"] == "failed" and before["resumable"] and before["step"] >= 4, before
        # The user stops waiting (Ctrl-C): the launcher leaves, saying where to look.
        job.send_signal(signal.SIGINT)
        output, _ = job.communicate(timeout=60)
        assert job.returncode == 130 and "the jobs keep running" in output, output[-3000:]
        # Slurm ends the job once it declares the node dead, and does not requeue it.
        assert _sacct(slurm, start["job_id"], timeout_s=180)[-1]["state"] in ("NODE_FAIL", "FAILED")
        # Slurm marks the node not responding ("*"), then down; either way it schedules nothing there.
        deadline = time.time() + 120
        while not any(mark in _node_state(slurm, dead) for mark in ("*", "down")) and time.time() < deadline:
            time.sleep(1)

        resumed = subprocess.run(
            [sys.executable, "tools/resume.py", str(run_dir)],
            cwd=REPO,
            env=slurm,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert resumed.returncode == 0, describe(resumed)
    finally:
        subprocess.run([str(SCRIPT), "start"], env=slurm, capture_output=True, timeout=300)
    segments = _segments(_journal(run_dir))
    (first, failed), (second, finished) = segments
    assert failed["outcome"] == "failed" and failed["reason"]
    assert second["job_id"] != first["job_id"] and dead not in second["hosts"]
    assert second["step"] == before["step"] and finished["outcome"] == "finished" and finished["step"] == 24
    client, run = _only_run(root)
    assert run.info.status == "FINISHED" and run.info.run_id == before["mlflow_run_id"]


def _node_state(env: dict[str, str], node: str) -> str:
    return subprocess.run(
        ["sinfo", "-h", "-n", node, "-o", "%T"], env=env, capture_output=True, text=True
    ).stdout.strip()


def _videos(folder: Path, count: int) -> list[str]:
    """Short generated videos (and one that is not a video); the keys make_shards gives them."""
    from pemt.data.synthetic import SyntheticSpec, encode_mp4, render

    folder.mkdir(parents=True)
    spec = SyntheticSpec(videos=count, seconds=1.0, size=32)
    for index in range(count):
        frames, audio, _ = render(spec, index)
        (folder / f"v{index:02d}.mp4").write_bytes(encode_mp4(frames, audio, spec.source_fps, spec.sample_rate))
    (folder / "broken.mp4").write_bytes(b"not a video")
    return [f"v{index:02d}" for index in range(count)]


def _packed(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a shard folder: key -> members, read through its manifest."""
    import webdataset as wds

    manifest = json.loads((out / "manifest.json").read_text())
    samples = {}
    for entry in manifest["shards"]:
        for sample in wds.WebDataset(str(out / entry["name"]), shardshuffle=False):
            assert sample["__key__"] not in samples, f"{sample['__key__']} packed twice"
            samples[sample["__key__"]] = {k: v for k, v in sample.items() if not k.startswith("__")}
    return samples


def test_make_shards_as_a_job_array_survives_a_dead_node_and_packs_what_one_machine_packs(
    slurm: dict[str, str], tmp_path: Path
) -> None:
    keys = _videos(tmp_path / "videos", 24)
    out = tmp_path / "array"
    command = [sys.executable, "tools/make_shards.py", str(tmp_path / "videos"), str(out), "--samples", "2"]
    array = [*command, "--slurm", "6", "--cpus-per-task", "1", "--time-min", "10"]
    first = subprocess.Popen(array, cwd=REPO, env=slurm, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The node of the first slice to start dies as it starts (a task takes seconds to start
        # Python and read its inputs): that slice is left unfinished.
        deadline, running = time.time() + 300, []
        while not running and time.time() < deadline and first.poll() is None:
            queue = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%N"], env=slurm, capture_output=True)
            running = queue.stdout.decode().split()
        assert running, first.communicate()[0][-3000:]
        killed = subprocess.run([str(SCRIPT), "kill-node", running[0]], env=slurm, capture_output=True, text=True)
        assert killed.returncode == 0, killed.stderr
        output, _ = first.communicate(timeout=400)
        [array_job] = {json.loads(line)["job_id"].split("_")[0] for line in (out / "array_jobs.jsonl").open()}
        states = {r["state"] for r in _sacct(slurm, array_job)}
        # Slurm requeues a task whose node died (it then finishes elsewhere), or the task fails and
        # the command says how to finish; either way a slice was cut short
        assert first.returncode in (0, 1) and states & {"NODE_FAIL", "REQUEUED", "FAILED"}, (states, output[-3000:])
        if first.returncode:
            assert "run the same command again" in output, output[-3000:]
            status = subprocess.run(
                [sys.executable, "tools/make_shards.py", "--status", str(out)], cwd=REPO, capture_output=True, text=True
            )
            assert status.returncode == 0 and "unfinished" in status.stdout, status.stdout + status.stderr
            again = subprocess.run(array, cwd=REPO, env=slurm, capture_output=True, text=True, timeout=400)
            assert again.returncode == 0, describe(again)
    finally:
        if first.poll() is None:
            first.kill()
        subprocess.run([str(SCRIPT), "start"], env=slurm, capture_output=True, timeout=300)
    packed = _packed(out)
    assert sorted(packed) == keys, "every readable video exactly once"
    [skipped] = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert skipped["path"].endswith("broken.mp4")
    # the same shards as one machine packs: the same samples in the same shards, the same bytes
    one = tmp_path / "one"
    packed_here = subprocess.run([*command[:3], str(one), *command[4:]], cwd=REPO, capture_output=True, text=True)
    # (stored as they are: x264 is not bit-reproducible here, so transcoded bytes can differ run to run)
    assert packed_here.returncode == 0, describe(packed_here)
    assert _packed(one) == packed

    def layout(folder: Path) -> list[tuple[str, int]]:
        return [(e["name"], e["samples"]) for e in json.loads((folder / "manifest.json").read_text())["shards"]]

    assert layout(out) == layout(one)
