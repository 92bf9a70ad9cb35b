"""Checkpoints commit atomically, loading falls back past damage, retention keeps what it says."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO, free_port
from pemt.train.checkpoint import INCOMPLETE, LATEST, MANIFEST, Checkpointer, step_tag, verify

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


@pytest.fixture(scope="module")
def engine_factory(single_rank_deepspeed: None) -> dict[str, Any]:
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
    assert checkpointer.load(fresh, chosen, universal=False)[1]["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(_weights(fresh), expected))


def test_missing_manifest_is_never_loaded_and_set_aside(engine_factory: dict, tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path / "ckpt")
    _train_and_save(engine_factory, checkpointer, [1, 2])
    (tmp_path / "ckpt" / step_tag(2) / MANIFEST).unlink()
    assert checkpointer.select().step == 1
    assert not (tmp_path / "ckpt" / step_tag(2)).exists()
    assert [p.name.split("-")[0] for p in (tmp_path / "ckpt" / INCOMPLETE).iterdir()] == [step_tag(2)]


def test_the_same_unfinished_step_set_aside_twice_in_a_second_keeps_both(tmp_path: Path) -> None:
    """A job that dies saving step 6, restarts and dies saving step 6 again (a crash loop)."""
    checkpointer = Checkpointer(tmp_path / "ckpt")
    for attempt in range(2):
        leftover = tmp_path / "ckpt" / ".staging" / step_tag(6)
        leftover.mkdir(parents=True)
        (leftover / "part").write_text(str(attempt))
        assert len(checkpointer.set_aside_leftovers()) == 1
    kept = sorted((tmp_path / "ckpt" / INCOMPLETE).iterdir())
    assert [p.name.split("-")[0] for p in kept] == [step_tag(6)] * 2
    assert sorted((p / "part").read_text() for p in kept) == ["0", "1"]


def test_retention_keeps_last_k_and_every_mth(engine_factory: dict, tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path / "ckpt", keep_last=2, keep_every=3)
    _train_and_save(engine_factory, checkpointer, [1, 2, 3, 4, 5, 6, 7])
    assert [c.step for c in checkpointer.committed()] == [3, 6, 7]


def test_host_copies_refill_kept_buffers_and_never_share_one_between_tensors() -> None:
    """An asynchronous save's copy reuses the last save's buffers (no allocation per save), holds
    the values of the moment it was taken, and two files' tensors at the same path in their
    state dicts (DeepSpeed's model and optimizer files) never land in one buffer."""
    from pemt.train.snapshot import HostCopy

    copy = HostCopy()
    model, optimizer = {"state": {"w": torch.ones(4)}}, {"state": {"w": torch.zeros(4)}}
    first = copy(model, ("model.pt",)), copy(optimizer, ("optim.pt",))
    assert first[0]["state"]["w"].data_ptr() != first[1]["state"]["w"].data_ptr()
    assert copy.kept_bytes == 2 * 4 * 4
    model["state"]["w"].add_(1)  # training goes on: the copy keeps what was saved
    assert torch.equal(first[0]["state"]["w"], torch.ones(4))
    again = copy(model, ("model.pt",))
    assert again["state"]["w"].data_ptr() == first[0]["state"]["w"].data_ptr(), "the kept buffer is refilled"
    assert torch.equal(again["state"]["w"], torch.full((4,), 2.0)) and copy.kept_bytes == 2 * 4 * 4


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")
def test_a_background_write_yields_the_cpu_to_training_and_its_hashes_match_the_files(
    engine_factory: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The background writer runs below the training thread's CPU priority (which stays as it
    was), and the sha256 it computes on a second thread while writing is the files' own."""
    from pemt.train import checkpoint, snapshot

    priorities = []

    def recording_write_files(job: snapshot.WriteJob) -> dict[str, Any]:
        priorities.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return snapshot.write_files(job)

    monkeypatch.setattr(checkpoint, "write_files", recording_write_files)
    monkeypatch.setattr(snapshot, "HASH_ALONGSIDE_BYTES", 1024)  # this engine's tensors are small
    training = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    checkpointer = Checkpointer(tmp_path / "ckpt", asynchronous=True)
    _train_and_save(engine_factory, checkpointer, [1, 2])  # the first save is synchronous, the second not
    checkpointer.settle()
    assert priorities == [training, min(19, training + snapshot.WRITER_NICENESS)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == training
    assert [c.step for c in checkpointer.committed()] == [1, 2]
    assert all(verify(c.path, c.manifest) is None for c in checkpointer.committed())


KILLED_WRITERS = ENGINE + textwrap.dedent("""
    import random, signal, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from pemt.train.checkpoint import Checkpointer
    ckpt, draw, base_port = Path(sys.argv[1]), random.Random(int(sys.argv[2])), int(sys.argv[4])
    landed = 0
    for kill in range(10):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # a job: trains from the start, saving every step in the background
            os.environ["MASTER_PORT"] = str(base_port + kill)
            deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
            engine = make_engine(width=1024)
            checkpointer = Checkpointer(ckpt, keep_last=3, asynchronous=True)
            checkpointer.select()  # as a restarting job does: leftovers set aside
            for step in range(1, 10000):
                train_step(engine, width=1024)
                checkpointer.save(engine, step, {"step": step})
                if step == 3:
                    os.write(write_end, b"x")
            os._exit(0)
        os.close(write_end)  # the child's copy is the only one: a child that dies ends the read
        if not os.read(read_end, 1):
            sys.exit(f"job {kill} died before its third step: {os.waitpid(pid, 0)}")
        os.close(read_end)
        time.sleep(draw.uniform(0.0, 0.6))
        # a moment that fell between two saves waits for the next one to start (a busy machine
        # stretches the steps between saves)
        deadline = time.monotonic() + 5
        while not any((ckpt / ".staging").glob("step_*")) and time.monotonic() < deadline:
            time.sleep(0.002)
        landed += any((ckpt / ".staging").glob("step_*"))  # a save was being written
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    print(landed)
""")


def test_kill_at_any_point_of_a_background_save_resumes_bitwise(engine_factory: dict, tmp_path: Path) -> None:
    """Ten jobs killed (SIGKILL, seeded moments) while their checkpoints are written in the
    background: the newest committed checkpoint loads, and its weights are bitwise those of an
    uninterrupted run at that step; every committed one verifies."""
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    result = subprocess.run(
        [sys.executable, "-c", KILLED_WRITERS, str(ckpt), "7", str(REPO), str(free_port(count=10))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) >= 8, "most kills landed while a save was being written"
    checkpointer = Checkpointer(ckpt)
    chosen = checkpointer.select()
    assert chosen is not None and chosen.step >= 3
    assert all(verify(c.path, c.manifest) is None for c in checkpointer.committed())
    engine = engine_factory["make_engine"](width=1024)
    assert checkpointer.load(engine, chosen, universal=False)[1]["step"] == chosen.step
    reference = engine_factory["make_engine"](width=1024)
    for _ in range(chosen.step):
        engine_factory["train_step"](reference, width=1024)
    assert all(torch.equal(a, b) for a, b in zip(_weights(engine), _weights(reference)))
    assert not list((ckpt / ".staging").glob("step_*")), "unfinished saves are set aside"


def test_a_missing_optimizer_shard_with_a_valid_manifest_falls_back(engine_factory: dict, tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path / "ckpt")
    _train_and_save(engine_factory, checkpointer, [1, 2])
    newest = checkpointer.committed()[-1]
    assert newest.manifest["ranks"]["0"] == sorted(newest.manifest["files"]), "the manifest lists what was written"
    next(newest.path.glob("*optim_states.pt")).unlink()
    assert checkpointer.select().step == 1


def test_a_checkpoint_that_verifies_but_does_not_load_is_set_aside(
    engine_factory: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import hashlib
    import json

    checkpointer = Checkpointer(tmp_path / "ckpt")
    engine = engine_factory["make_engine"]()
    engine_factory["train_step"](engine)
    checkpointer.save(engine, 1, {"step": 1})
    expected = _weights(engine)
    engine_factory["train_step"](engine)
    checkpointer.save(engine, 2, {"step": 2})
    newest = checkpointer.committed()[-1]
    states = next(newest.path.glob("*model_states.pt"))
    torch.save({"not": "a DeepSpeed checkpoint"}, states)  # intact on disk, wrong inside
    manifest = json.loads((newest.path / MANIFEST).read_text())
    name = str(states.relative_to(newest.path))
    manifest["files"][name] = {
        "bytes": states.stat().st_size,
        "sha256": hashlib.sha256(states.read_bytes()).hexdigest(),
    }
    (newest.path / MANIFEST).write_text(json.dumps(manifest))
    chosen = checkpointer.select()
    assert chosen.step == 2, "it verifies"
    fresh = engine_factory["make_engine"]()
    with caplog.at_level(logging.WARNING):
        loaded, state = checkpointer.load(fresh, chosen, universal=False)
    assert loaded.step == 1 and state["step"] == 1 and "does not load" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(_weights(fresh), expected))
    assert [c.step for c in checkpointer.committed()] == [1]
    assert any(p.name.startswith(f"{step_tag(2)}-unloadable") for p in (tmp_path / "ckpt" / INCOMPLETE).iterdir())


FULL_DISK = ENGINE + textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch.multiprocessing as mp
    sys.path.insert(0, sys.argv[2])

    def rank_main(rank, ckpt, port):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=port, DS_ACCELERATOR="cpu")
        from pemt.distributed import leave_distributed
        from pemt.train.checkpoint import Checkpointer
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        engine = make_engine(width=512)
        checkpointer = Checkpointer(Path(ckpt), keep_last=1)
        outcomes = []
        for step in (1, 2, 3):
            train_step(engine, width=512)
            outcomes.append(checkpointer.save(engine, step, {"step": step}).committed)
        # one write per line: the ranks share stdout, and print() writes the newline separately
        sys.stdout.write(json.dumps({"rank": rank, "committed": outcomes}) + "\\n")
        sys.stdout.flush()
        leave_distributed()  # left to the exit, gloo aborts a rank about half the time

    if __name__ == "__main__":
        mp.start_processes(rank_main, args=(sys.argv[1], sys.argv[3]), nprocs=2, start_method="spawn")
""")


def test_a_full_disk_fails_that_save_on_every_rank_at_once_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    import json

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "small"
    disk.mkdir()
    # room for one checkpoint (~4 MB for this model over 2 ranks) and a little: the next cannot be written
    # while the previous one must stay
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        script = tmp_path / "full_disk.py"
        script.write_text(FULL_DISK)
        result = subprocess.run(
            [sys.executable, str(script), str(disk / "ckpt"), str(REPO), str(free_port())],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"rank"')]
        outcomes = {r["rank"]: r["committed"] for r in reports}
        assert outcomes[0] == outcomes[1] == [True, False, False], outcomes
        assert "No space left on device" in result.stderr
        checkpointer = Checkpointer(disk / "ckpt")
        assert [c.step for c in checkpointer.committed()] == [1] and (disk / "ckpt" / LATEST).read_text() == step_tag(1)
        assert checkpointer.select().step == 1
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_universal_conversion_is_used_only_for_the_checkpoint_it_was_made_from(tmp_path: Path) -> None:
    from pemt.train import universal

    checkpoint = tmp_path / "ckpt" / step_tag(4)
    checkpoint.mkdir(parents=True)
    (checkpoint / MANIFEST).write_text('{"step": 4}')
    converted = tmp_path / "ckpt" / universal.UNIVERSAL / step_tag(4)
    converted.mkdir(parents=True)
    (converted / universal.DONE).write_text(universal.manifest_digest(checkpoint, MANIFEST))
    assert universal.cached(tmp_path / "ckpt", checkpoint, MANIFEST) == converted
    (checkpoint / MANIFEST).write_text('{"step": 4, "saved again": true}')  # re-saved after a rollback
    assert universal.cached(tmp_path / "ckpt", checkpoint, MANIFEST) is None, "converted again, not reused"
