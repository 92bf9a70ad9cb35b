"""MLflow observability: the metrics a run logs, one run across jobs, and a tracking server
that goes away and comes back (a real `mlflow server` process)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from conftest import REPO, SMALL_DATA, describe, free_port, run_name, run_pretrain
from pemt.track.outbox import Outbox, read_records
from pemt.track.tracker import RUN_ID_FILE, MlflowTracker


def _store_config(tmp_path: Path, uri: str) -> OmegaConf:
    return OmegaConf.create(
        {
            "mlflow": {"tracking_uri": uri, "experiment": "unit", "system_metrics": False},
            "run_dir": str(tmp_path / "run"),
        }
    )


def _history(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_resumed_job_skips_replayed_steps_but_logs_its_own_timings(tmp_path: Path) -> None:
    from pemt.track.store import ensure_experiment

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ensure_experiment(uri, "unit")
    cfg = _store_config(tmp_path, uri)
    (tmp_path / "run").mkdir()
    first = MlflowTracker(cfg, tmp_path / "run", enabled=True)
    run_id = first.start(cfg)
    for step in range(1, 11):
        first.log_metrics({"loss": 1.0 / step}, step)
    first.finish("FAILED")  # the job died at step 10; its last checkpoint was step 6

    second = MlflowTracker(cfg, tmp_path / "run", enabled=True)
    assert second.start(cfg) == run_id and second.logged_until == 10
    for step in range(7, 13):
        second.log_metrics({"loss": 1.0 / step}, step)
    second.log_metrics({"checkpoint_load_s": 0.5}, 6, replayed=True)
    second.finish("FINISHED")
    client = MlflowClient(uri)
    assert _history(client, run_id, "loss") == list(range(1, 13)), "every step once"
    assert _history(client, run_id, "checkpoint_load_s") == [6]
    assert client.get_run(run_id).info.status == "FINISHED", "the stale FAILED is not replayed over it"


def test_undelivered_metrics_stay_on_disk_and_mlflow_sync_sends_them(tmp_path: Path) -> None:
    from pemt.track.store import ensure_experiment

    def unreachable(records: list) -> None:
        raise ConnectionError("tracking server down")

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    outbox = Outbox(run_dir, unreachable, flush_s=0.05)
    outbox.start()
    for step in range(1, 6):
        outbox.put({"step": step, "time": time.time(), "metrics": {"loss": float(step)}})
    outbox.put({"status": "FINISHED", "time": time.time()})
    assert outbox.close(timeout_s=0.2) == 6, "nothing delivered, nothing dropped"
    records, delivered = read_records(run_dir)
    assert len(records) == 6 and delivered == 0

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(ensure_experiment(uri, "unit"))
    (run_dir / RUN_ID_FILE).write_text(run.info.run_id)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("[]\n")
    synced = subprocess.run(
        [sys.executable, "tools/mlflow_sync.py", str(run_dir), "--tracking-uri", uri],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert synced.returncode == 0 and "5 records sent" not in synced.stdout, synced.stdout + synced.stderr
    assert "6 records sent" in synced.stdout
    assert _history(client, run.info.run_id, "loss") == [1, 2, 3, 4, 5]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    again = subprocess.run(
        [sys.executable, "tools/mlflow_sync.py", str(run_dir), "--tracking-uri", uri],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert "0 records sent" in again.stdout, "sent once"


def _flops_per_sample_in_process(micro_batch: int) -> float:
    """FLOPs of one forward + backward of the default model, counted here by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from pemt.config import compose_config
    from pemt.data.decode import log_mel
    from pemt.data.loader import clip_spec
    from pemt.model.factory import build_pretraining_model

    cfg = compose_config("pretrain", overrides=SMALL_DATA)
    model = build_pretraining_model(cfg)
    spec = clip_spec(cfg.data)
    video = torch.rand(micro_batch, spec.clips, 3, spec.frames_per_clip, spec.crop, spec.crop)
    sound = torch.randn(micro_batch, spec.clips, 1, int(spec.clip_seconds * spec.sample_rate))
    audio = log_mel(sound, spec)
    counter = FlopCounterMode(display=False)
    with counter:
        model(video, audio, step_seed=0)["loss"].backward()
    return counter.get_total_flops() / micro_batch


@pytest.mark.slow
def test_short_run_logs_throughput_flops_memory_and_its_job(
    tmp_path: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MLflow samples system metrics every 10 s by default: longer than this run's training.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    result = run_pretrain(tmp_path, data_cache, "train.max_steps=6", "train.log_every=3")
    assert result.returncode == 0, describe(result)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("pemt-pretrain").experiment_id])
    m = run.data.metrics
    assert run.info.status == "FINISHED"
    assert m["samples_per_s"] > 0 and m["step_time_s"] > 0 and 0 <= m["data_wait_pct"] <= 100
    assert m["clips_per_s"] == pytest.approx(4 * m["samples_per_s"])
    assert m["visual_tokens_per_s"] == m["audio_tokens_per_s"] == pytest.approx(m["clips_per_s"])
    assert m["grad_norm"] > 0
    assert 0 < m["host_rss_gib_min"] <= m["host_rss_gib_avg"] <= m["host_rss_gib_max"] < 8
    # each rank's data worker (data.num_workers=1) is counted, and how long its decodes take
    assert 0.05 < m["data_rss_gib_min"] <= m["data_rss_gib_max"] < 8
    assert 0 < m["decode_s_per_sample"] < 5
    assert m["decoded_cache_share"] == 0, "off by default, and these windows are drawn at random anyway"
    # FLOPs: what the run counted per sample equals torch's count of the same model here.
    logged = m["tflops_per_device"] * 1e12 * 2 / m["samples_per_s"]
    assert logged == pytest.approx(_flops_per_sample_in_process(4), rel=0.02)
    assert 0 < m["mfu_pct"] < 100
    assert any(key.startswith("system/cpu_utilization") for key in m), "MLflow's system metrics"
    assert m["time_to_first_step_s"] > 0 and m["checkpoint_save_s"] >= 0
    [segment] = [json.loads(v) for k, v in run.data.tags.items() if k.startswith("pemt.segment.")]
    assert segment["segment"] == 1 and segment["step"] == 0 and segment["world_size"] == 2


def _start_server(port: int, store: Path, log: Path) -> subprocess.Popen:
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{store}",
            "--artifacts-destination",
            str(store.parent / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=store.parent,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(
                f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1", timeout=2
            )
            return server
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"mlflow server did not answer on {port}:\n{log.read_text()[-3000:]}")


def _stop_server(server: subprocess.Popen) -> None:
    import os

    os.killpg(server.pid, signal.SIGKILL)  # the server and its worker processes
    server.wait()


@pytest.mark.slow
def test_tracking_server_down_and_back_mid_run_loses_nothing(tmp_path: Path, data_cache: Path) -> None:
    port, store, log = free_port(), tmp_path / "server.db", tmp_path / "server.log"
    # Create the store once: the server's processes would race to migrate an empty one.
    MlflowClient(f"sqlite:///{store}").search_experiments()
    server = _start_server(port, store, log)
    root = tmp_path / "runs"
    run_dir = root / "pemt-pretrain" / run_name()
    steps = 60
    job = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "launch" / "pretrain.py"),
            f"paths.root={root}",
            f"paths.cache={data_cache}",
            *SMALL_DATA,
            f"mlflow.tracking_uri=http://127.0.0.1:{port}",
            f"train.max_steps={steps}",
            "train.log_every=2",
            "train.checkpoint_every=1000",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        outbox = run_dir / "mlflow_outbox.jsonl"
        deadline = time.time() + 300
        while not (outbox.exists() and '"loss"' in outbox.read_text()) and time.time() < deadline:
            time.sleep(0.2)
        _stop_server(server)
        # Training goes on without the server: steps keep being recorded locally.
        logged_while_down = len(outbox.read_text().splitlines())
        while len(outbox.read_text().splitlines()) < logged_while_down + 3 and job.poll() is None:
            time.sleep(0.2)
        server = _start_server(port, store, log)
        output, _ = job.communicate(timeout=600)
        assert job.returncode == 0, output[-5000:]
        assert "MLflow does not answer" in output, "the outage is reported, not hidden"
    finally:
        if job.poll() is None:
            job.kill()
    client = MlflowClient(f"http://127.0.0.1:{port}")
    try:
        [run] = client.search_runs([client.get_experiment_by_name("pemt-pretrain").experiment_id])
        assert _history(client, run.info.run_id, "loss") == list(range(2, steps + 1, 2)), "nothing lost, no repeats"
        assert run.info.status == "FINISHED"
    finally:
        _stop_server(server)


def _headless_chromium() -> str:
    """Debian's headless Chromium, installed on first use (root); skips where it cannot be."""
    import os
    import shutil

    found = shutil.which("chromium-headless-shell")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("headless Chromium is not installed and cannot be here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium-headless-shell"],
        check=True,
        capture_output=True,
        env=env,
    )
    return shutil.which("chromium-headless-shell")


@pytest.mark.slow
def test_mlflow_ui_shows_the_run_and_its_throughput(tmp_path: Path) -> None:
    from pemt.track.store import ensure_experiment

    browser = _headless_chromium()
    store = tmp_path / "mlflow.db"
    uri = f"sqlite:///{store}"
    experiment_id = ensure_experiment(uri, "unit")
    cfg = _store_config(tmp_path, uri)
    run_dir = tmp_path / "pemt-ui-check"
    run_dir.mkdir()
    tracker = MlflowTracker(cfg, run_dir, enabled=True)
    run_id = tracker.start(cfg)
    tracker.log_metrics({"samples_per_s": 27.5, "loss": 6.4}, 5)
    tracker.finish("FINISHED")

    port = free_port()
    server = _start_server(port, store, tmp_path / "server.log")
    try:
        page = subprocess.run(
            [
                browser,
                "--no-sandbox",
                "--disable-gpu",
                "--virtual-time-budget=30000",
                "--dump-dom",
                f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs/{run_id}",
            ],
            capture_output=True,
            text=True,
            timeout=180,
        ).stdout
    finally:
        _stop_server(server)
    assert ">pemt-ui-check<" in page, page[-2000:]
    assert "samples_per_s" in page and "27.5" in page


DELIVERING_CHILD = """
import sys, time
from pathlib import Path
from mlflow.tracking import MlflowClient
import pemt.track.outbox as outbox_module
from pemt.track.outbox import Outbox, deliver
outbox_module.COMPACT_BYTES = 1500          # compact often: the kills land in compaction too
run_dir, uri, run_id = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
client = MlflowClient(uri)

def slowly(records):
    for record in records:                  # one at a time: a kill lands mid-batch
        deliver(client, run_id, [record])
        time.sleep(0.01)

outbox = Outbox(run_dir, slowly, flush_s=0.02)
print("ready", flush=True)
first = outbox.max_step
for step in range(first + 1, first + 31):
    outbox.put({"step": step, "time": 1000.0 + step, "metrics": {"m": float(step)}})
outbox.start()
time.sleep(30)
"""


def test_outbox_killed_anywhere_in_delivery_delivers_every_record_exactly_once(tmp_path: Path) -> None:
    import random

    from pemt.track.outbox import read_state
    from pemt.track.store import ensure_experiment

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(ensure_experiment(uri, "unit")).info.run_id
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("[]\n")
    (run_dir / RUN_ID_FILE).write_text(run_id)
    delays = random.Random(0)
    for _ in range(8):
        child = subprocess.Popen(
            [sys.executable, "-c", DELIVERING_CHILD, str(run_dir), uri, run_id],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert child.stdout.readline().strip() == "ready"
        time.sleep(delays.uniform(0.0, 0.6))  # while putting, sending, recording or compacting
        child.kill()
        child.wait()
    synced = subprocess.run(
        [sys.executable, "tools/mlflow_sync.py", str(run_dir), "--tracking-uri", uri],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert synced.returncode == 0, synced.stderr
    last = read_state(run_dir)[1]
    steps = [m.step for m in client.get_metric_history(run_id, "m")]
    assert last >= 30 and sorted(steps) == list(range(1, last + 1)), f"{len(steps)} records for {last} steps"


def test_a_job_that_starts_while_mlflow_is_down_trains_and_creates_its_run_later(tmp_path: Path) -> None:
    from pemt.track.store import ensure_experiment

    store = tmp_path / "mlflow.db"
    ensure_experiment(f"sqlite:///{store}", "unit")  # the server's store exists; the server is down
    port = free_port()
    cfg = _store_config(tmp_path, f"http://127.0.0.1:{port}")
    (tmp_path / "run").mkdir()
    tracker = MlflowTracker(cfg, tmp_path / "run", enabled=True)
    assert tracker.start(cfg) is None, "no run yet, and no exception: training goes on"
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": 1.0 / step}, step)
    server = _start_server(port, store, tmp_path / "server.log")
    try:
        deadline = time.time() + 90
        while not (tmp_path / "run" / RUN_ID_FILE).exists() and time.time() < deadline:
            time.sleep(0.5)
        tracker.log_metrics({"loss": 0.25}, 4)
        tracker.finish("FINISHED")
        run_id = (tmp_path / "run" / RUN_ID_FILE).read_text()
        client = MlflowClient(f"http://127.0.0.1:{port}")
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["pemt.run_dir"] == str(tmp_path / "run")
        assert _history(client, run_id, "loss") == [1, 2, 3, 4]
    finally:
        _stop_server(server)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),  # SXM
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40", 181.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_mfu_peaks_tell_gpu_variants_apart(name: str, peak: float | None) -> None:
    from pemt.track.metrics import data_sheet_peak

    assert data_sheet_peak(name) == peak


def test_an_unknown_device_is_measured_and_says_so() -> None:
    from pemt.track.metrics import peak_tflops

    value, source = peak_tflops(None, torch.device("cpu"), torch.float32)
    assert value > 0 and source.startswith("measured on CPU"), source
    assert peak_tflops(123.0, torch.device("cpu"), torch.float32) == (123.0, "config")
