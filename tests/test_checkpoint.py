"""Checkpoints commit atomically, loading falls back past damage, retention keeps what it says."""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from pemt.train.checkpoint import INCOMPLETE, LATEST, MANIFEST, Checkpointer, step_tag

ENGINE = textwrap.dedent("""
    import os, torch, deepspeed
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    def make_engine(width=64):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        config = {"train_batch_size": 4, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return engine
    def train_step(engine, width=64):
        loss = engine(torch.randn(4, width)).square().mean()
        engine.backward(loss)
        engine.step()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine_factory():
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()), DS_ACCELERATOR="cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    namespace: dict = {}
    exec(ENGINE, namespace)
    return namespace


def _train_and_save(factory: dict, checkpointer: Checkpointer, steps: list[int]):
    engine = factory["make_engine"]()
    for step in steps:
        factory["train_step"](engine)
        checkpointer.save(engine, step, {"step": step})
    return engine


def _weights(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def test_save_commits_with_manifest_and_pointer(engine_factory: dict, tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path / "ckpt")
    _train_and_save(engine_factory, checkpointer, [1, 2])
    assert (tmp_path / "ckpt" / LATEST).read_text() == step_tag(2)
    committed = checkpointer.committed()
    assert [c.step for c in committed] == [1, 2]
    files = committed[-1].manifest["files"]
    assert "rng/rank00000.pt" in files and any(name.endswith("model_states.pt") for name in files)
    assert not list((tmp_path / "ckpt" / ".staging").glob("step_*"))


def test_truncated_file_falls_back_to_previous(engine_factory: dict, tmp_path: Path, caplog) -> None:
    checkpointer = Checkpointer(tmp_path / "ckpt")
    engine = engine_factory["make_engine"]()
    engine_factory["train_step"](engine)
    checkpointer.save(engine, 1, {"step": 1})
    expected = _weights(engine)
    engine_factory["train_step"](engine)
    checkpointer.save(engine, 2, {"step": 2})
    damaged = next((tmp_path / "ckpt" / step_tag(2)).glob("*model_states.pt"))
    damaged.write_bytes(damaged.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        chosen = checkpointer.select()
    assert chosen.step == 1
    assert "is damaged" in caplog.text and "falling back" in caplog.text
    fresh = engine_factory["make_engine"]()
    assert checkpointer.load(fresh, chosen, universal=False)["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(_weights(fresh), expected))


def test_missing_manifest_is_never_loaded_and_set_aside(engine_factory: dict, tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path / "ckpt")
    _train_and_save(engine_factory, checkpointer, [1, 2])
    (tmp_path / "ckpt" / step_tag(2) / MANIFEST).unlink()
    assert checkpointer.select().step == 1
    assert not (tmp_path / "ckpt" / step_tag(2)).exists()
    assert [p.name.split("-")[0] for p in (tmp_path / "ckpt" / INCOMPLETE).iterdir()] == [step_tag(2)]


def test_retention_keeps_last_k_and_every_mth(engine_factory: dict, tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path / "ckpt", keep_last=2, keep_every=3)
    _train_and_save(engine_factory, checkpointer, [1, 2, 3, 4, 5, 6, 7])
    assert [c.step for c in checkpointer.committed()] == [3, 6, 7]


def test_kill_during_save_leaves_a_loadable_checkpoint(engine_factory: dict, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    script = ENGINE + textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from pemt.train.checkpoint import Checkpointer
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        engine = make_engine(width=1024)
        checkpointer = Checkpointer({str(ckpt)!r}, keep_last=100)
        for step in range(1, 1000):
            train_step(engine, width=1024)
            checkpointer.save(engine, step, {{"step": step}})
    """)
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": str(_free_port())}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (ckpt / LATEST).exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    assert child.poll() is None, child.stderr.read().decode()[-3000:]
    time.sleep(random.uniform(0.2, 1.5))  # the child spends nearly all its time saving
    child.send_signal(signal.SIGKILL)
    child.wait()
    checkpointer = Checkpointer(ckpt)
    chosen = checkpointer.select()
    assert chosen is not None
    engine = engine_factory["make_engine"](width=1024)
    assert checkpointer.load(engine, chosen, universal=False)["step"] == chosen.step
    assert not list((ckpt / ".staging").glob("step_*")), "unfinished saves are set aside"
