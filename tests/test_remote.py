"""Shards read from where clusters keep them: an HTTP server and an S3-compatible store, both real
servers on loopback, with a proxy in front that drops connections, goes down and comes back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from servers import FaultProxy, FileServer, S3Server, s3_environment

from conftest import describe, free_port, keys_by_step, run_launch, write_video
from pemt.config import compose_config
from pemt.data.errors import BadSamples
from pemt.data.loader import build_loader
from pemt.data.members import INDEX_SUFFIX, indexed_samples, member_bytes, shard_index
from pemt.data.remote_file import forget_reads, open_remote, read_ahead, reads_in_flight
from pemt.data.shard_sets import check_readable
from pemt.data.shards import read_manifest, upload_shards
from pemt.data.storage import Retry, StorageError, check_location, read_bytes, retries_so_far
from pemt.data.stream import plan_from_manifest, stream_slots
from pemt.data.synthetic import SyntheticSpec, generate

# Quick retries: a test waits seconds, not the minutes a cluster default allows
FAST = Retry(attempts=6, backoff_s=0.1, max_backoff_s=0.5, timeout_s=5.0)
STREAMS = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = SyntheticSpec(videos=16, videos_per_shard=2, seconds=1.0, size=32)
    return generate(spec, tmp_path_factory.mktemp("remote") / "set", progress=False)


@pytest.fixture(scope="module")
def http(shards: Path) -> Iterator[tuple[FileServer, FaultProxy]]:
    port = free_port(2)
    server = FileServer(shards.parent, port)
    proxy = FaultProxy(port + 1, port)
    yield server, proxy
    proxy.down()
    server.stop()


@pytest.fixture(scope="module")
def s3(shards: Path) -> Iterator[FaultProxy]:
    """The shards uploaded to a bucket with pemt's upload tool, behind a proxy."""
    port = free_port(2)
    server = S3Server(port)
    proxy = FaultProxy(port + 1, port)
    environment = s3_environment(proxy.url)
    saved = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    import boto3

    boto3.client("s3").create_bucket(Bucket="videos")
    upload_shards(shards, "s3://videos/train", progress=False)
    yield proxy
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    proxy.down()
    server.stop()


def _slots(
    folder: str, retry: Retry = FAST, positions: int = 6, after_first: Callable[[], None] | None = None
) -> list[tuple[str, dict[str, bytes] | None, str | None]]:
    """The first `positions` slots of every stream: key, member bytes, error, read afresh
    (`after_first` is called once the first slot is read)."""
    forget_reads()
    plan = plan_from_manifest(folder, STREAMS, seed=3, shuffle_buffer=2, retry=retry)
    out = []
    for stream in range(STREAMS):
        slots = stream_slots(plan, stream, 0)
        for _ in range(positions):
            slot = next(slots)
            if after_first is not None:
                after_first()
                after_first = None
            members = None
            if slot.sample is not None:
                members = {k: member_bytes(v) for k, v in slot.sample.items() if not k.startswith("__")}
            out.append((slot.sample["__key__"] if slot.sample else "", members, slot.error))
    return out


@pytest.fixture(scope="module")
def local_slots(shards: Path) -> list:
    return _slots(str(shards))


@pytest.mark.parametrize("where", ["http", "s3"])
def test_remote_shards_stream_exactly_the_local_order_and_bytes(
    where: str, http: tuple[FileServer, FaultProxy], s3: FaultProxy, local_slots: list
) -> None:
    folder = f"{http[1].url}/set" if where == "http" else "s3://videos/train"
    assert _slots(folder) == local_slots


@pytest.mark.parametrize("read_ahead", [True, False])
def test_the_next_batch_is_fetched_while_this_one_decodes(
    http: tuple[FileServer, FaultProxy], read_ahead: bool
) -> None:
    """With read-ahead, a batch's members are in memory before its turn: the store can go away
    after the batch before it and it still decodes whole; without, it has to ask the store."""
    _, proxy = http
    cfg = compose_config(
        "pretrain",
        overrides=[
            "data.num_workers=0",
            f"data.streams={STREAMS}",
            f"data.remote.read_ahead={read_ahead}",
            "data.remote.attempts=2",
            "data.remote.backoff_s=0.1",
        ],
    )
    forget_reads()
    batches = iter(build_loader(cfg.data, f"{proxy.url}/set", STREAMS, 0, 1, seed=0))
    assert not next(batches)["errors"]
    deadline = time.monotonic() + 30
    while reads_in_flight() and time.monotonic() < deadline:
        time.sleep(0.05)
    proxy.down()
    try:
        second = next(batches)
    finally:
        proxy.up()
    if read_ahead:
        assert not second["errors"] and len(second["key"]) == STREAMS
    else:
        assert len(second["errors"]) == STREAMS and proxy.url in second["errors"][0]["reason"], second["errors"]


def _read_in_child(url: str, size: int) -> None:
    with open_remote(url, FAST, 0, size) as handle:
        assert len(handle.read()) == size


def test_a_forked_process_does_not_wait_on_its_parents_reads_ahead(http: tuple[FileServer, FaultProxy]) -> None:
    """A process forked while its parent reads ahead has neither the parent's threads nor its
    reads: it reads for itself instead of waiting on a read that never ends."""
    import multiprocessing

    _, proxy = http
    url = f"{proxy.url}/set/manifest.json"
    size = len(read_bytes(url, FAST))
    forget_reads()
    proxy.stall(connections=1, seconds=3.0)  # the parent's read ahead hangs for a while
    read_ahead(url, FAST, 0, size, whole=True)
    child = multiprocessing.get_context("fork").Process(target=_read_in_child, args=(url, size))
    child.start()
    child.join(timeout=20)
    assert child.exitcode == 0, "the child waited on its parent's read, or failed"


def test_connections_cut_mid_shard_are_resumed_with_nothing_lost(
    http: tuple[FileServer, FaultProxy], local_slots: list
) -> None:
    server, proxy = http
    before = proxy.cuts_made
    proxy.cut(connections=3, after=3000)  # the next connections end a few KB into a body
    retried = retries_so_far()
    assert _slots(f"{proxy.url}/set") == local_slots
    assert proxy.cuts_made - before == 3 and retries_so_far() - retried >= 3


def test_answers_that_time_out_are_tried_again(s3: FaultProxy, local_slots: list) -> None:
    before, retried = s3.cuts_made, retries_so_far()
    s3.stall(connections=1, seconds=2.0)
    patient = Retry(attempts=4, backoff_s=0.1, timeout_s=0.5)
    assert _slots("s3://videos/train", retry=patient) == local_slots
    assert s3.cuts_made - before == 1 and retries_so_far() - retried >= 1


def test_a_server_down_for_a_while_costs_time_not_samples(s3: FaultProxy, local_slots: list) -> None:
    """The store goes down after the first sample is read and is back a second later."""

    def outage() -> None:
        s3.down()
        threading.Timer(1.0, s3.up).start()

    retried = retries_so_far()
    assert _slots("s3://videos/train", after_first=outage) == local_slots
    assert retries_so_far() > retried, "reads met the outage"


def test_a_shard_that_stays_unreachable_counts_its_samples_bad_with_the_reason(
    http: tuple[FileServer, FaultProxy], shards: Path
) -> None:
    server, proxy = http
    # a manifest naming a shard the server does not have
    broken = shards.parent / "missing"
    broken.mkdir(exist_ok=True)
    manifest = (shards / "manifest.json").read_text()
    (broken / "manifest.json").write_text(manifest)
    for entry in read_manifest(shards)[1:]:
        (broken / entry["name"]).write_bytes((shards / entry["name"]).read_bytes())
    missing = read_manifest(shards)[0]["name"]
    slots = _slots(f"{proxy.url}/missing", positions=8)  # two epochs: the shard is opened twice
    bad = [error for _, _, error in slots if error]
    assert len(bad) == 4 and all(f"{proxy.url}/missing/{missing}: not found" in e for e in bad), bad
    tally = BadSamples(max_error_rate=0.5, min_slots=1)
    tally.add({"slots": len(slots), "errors": [{"shard": missing, "key": None, "reason": e} for e in bad]})
    assert tally.errors == 4


def test_unreachable_or_wrong_locations_fail_preflight_naming_the_url(
    http: tuple[FileServer, FaultProxy], s3: FaultProxy
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/set"
    with pytest.raises(OSError, match=f"{dead}/manifest.json: NewConnectionError.*Connection refused"):
        check_readable(dead)
    with pytest.raises(OSError, match="s3://no-such-bucket/x/manifest.json: NoSuchBucket"):
        check_readable("s3://no-such-bucket/x")
    # no manifest where an HTTP folder cannot be listed either: what to give instead
    with pytest.raises(OSError, match=f"{http[1].url}/nothing/manifest.json is missing, and an HTTP folder cannot"):
        check_readable(f"{http[1].url}/nothing")
    with pytest.raises(ValueError, match="must not carry credentials"):
        check_location("https://user:secret@host/shards", "data.shards")
    denying = FileServer(Path("."), free_port(), deny=True)
    try:
        with pytest.raises(OSError, match=f"{denying.url}/set/manifest.json: access denied"):
            check_readable(f"{denying.url}/set")
    finally:
        denying.stop()


def test_a_launch_on_a_server_that_is_down_stops_before_any_job(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/k700"
    result = run_launch("pretrain.py", tmp_path, tmp_path / "cache", "data=shards", f"data.shards={dead}", timeout=120)
    assert result.returncode != 0 and f"{dead}/manifest.json: NewConnectionError" in result.stderr, describe(result)
    assert "Traceback" not in result.stderr and not list(tmp_path.rglob(".submitit")), describe(result)


def test_a_server_without_byte_ranges_is_refused_with_the_reason(shards: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(shards), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                read_bytes(f"{url}/manifest.json", FAST)
                break
            except StorageError:
                time.sleep(0.1)
        with pytest.raises(OSError, match="ignores byte ranges"):
            check_readable(url)
    finally:
        server.terminate()
        server.wait()


def _expected_keys(shards: Path, steps: int, world: int = 2, batch: int = 4) -> dict[int, list[str]]:
    """The samples each step of a run on the local folder sees (its loader, without training)."""
    data = compose_config("pretrain", ["data=shards", f"data.shards={shards}", f"data.streams={STREAMS}"]).data
    data.num_workers = 0
    keys: dict[int, list[str]] = {}
    for rank in range(world):
        loader = iter(build_loader(data, str(shards), batch // world, rank, world, seed=0))
        for step in range(1, steps + 1):
            keys[step] = sorted(keys.get(step, []) + next(loader)["key"])
    return keys


def test_training_resumes_exactly_from_http_then_s3(
    tmp_path: Path, http: tuple[FileServer, FaultProxy], s3: FaultProxy, shards: Path
) -> None:
    """A run trains from the HTTP copy of the shards to its first checkpoint, then resumes from the
    S3 copy (the data moved; the manifest is the same), each through connections cut short: every
    step sees the samples a run on the local folder sees."""
    run_dir = tmp_path / "run"

    def launch(location: str, steps: int) -> None:
        result = run_launch(
            "pretrain.py",
            tmp_path,
            tmp_path / "cache",
            f"run_dir={run_dir}",
            "data=shards",
            f"data.shards={location}",
            f"data.streams={STREAMS}",
            "data.num_workers=1",
            "data.remote.backoff_s=0.2",
            "train.global_batch_size=4",
            "train.checkpoint_every=2",
            "train.record_samples=true",
            "train.log_every=1",
            f"train.max_steps={steps}",
        )
        assert result.returncode == 0, describe(result)

    cuts = http[1].cuts_made + s3.cuts_made
    http[1].cut(connections=4, after=3000)  # past a manifest's size: shard reads are cut
    launch(f"{http[1].url}/set", 2)
    s3.cut(connections=4, after=3000)
    launch("s3://videos/train", 4)
    assert http[1].cuts_made + s3.cuts_made >= cuts + 8, "both runs' reads were cut"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
    assert keys_by_step(run_dir) == _expected_keys(shards, steps=4)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("pemt-pretrain").experiment_id])
    retried = [m.value for m in client.get_metric_history(run.info.run_id, "remote_retries")]
    assert len(retried) == 4 and sum(retried) > 0, "the data workers' retries reach MLflow"


def test_a_shards_index_beside_it_replaces_the_walk_over_its_headers(
    http: tuple[FileServer, FaultProxy], shards: Path, local_slots: list
) -> None:
    """An uploaded shard's index is read in one request instead of one per member header, and gives
    the same samples; an index that does not describe the tar (another size) or is not an index
    is passed over for the headers."""
    _, proxy = http
    folder = shards.parent / "indexed"
    shutil.copytree(shards, folder)
    shard = sorted(folder.glob("*.tar"))[0]

    def index_read(url: str) -> tuple[list, int]:
        """The shard's samples (member bytes), and the bytes its indexing alone read."""
        forget_reads()
        before = proxy.bytes_to_clients
        samples = list(indexed_samples(url, FAST))
        spent = proxy.bytes_to_clients - before
        return [{k: member_bytes(v) for k, v in sample.items() if k != "__url__"} for sample in samples], spent

    url = f"{proxy.url}/indexed/{shard.name}"
    walked, walk_bytes = index_read(url)
    (folder / f"{shard.name}{INDEX_SUFFIX}").write_bytes(shard_index(shard))
    listed, list_bytes = index_read(url)
    assert listed == walked and len(listed) == 2
    assert list_bytes < walk_bytes / 4, (list_bytes, walk_bytes)
    (folder / f"{shard.name}{INDEX_SUFFIX}").write_text('{"bytes": 1, "members": []}')  # the tar was replaced
    assert index_read(url)[0] == walked
    (folder / f"{shard.name}{INDEX_SUFFIX}").write_text("<html>not an index</html>")
    assert index_read(url)[0] == walked
    for tar in folder.glob("*.tar"):
        (folder / f"{tar.name}{INDEX_SUFFIX}").write_bytes(shard_index(tar))
    assert _slots(f"{proxy.url}/indexed") == local_slots


def test_a_damaged_remote_shard_counts_the_same_bad_samples_as_on_disk(damaged_shards: Path) -> None:
    server = FileServer(damaged_shards.parent, free_port())
    try:
        data = compose_config("pretrain", ["data=shards", f"data.shards={damaged_shards}", "data.streams=1"]).data
        data.num_workers = 0

        def epoch(folder: str) -> tuple[list[str], list[tuple[str | None, str]]]:
            forget_reads()
            loader = iter(build_loader(data, folder, 4, 0, 1, seed=0))
            keys, errors = [], []
            for _ in range(3):  # 12 slots
                batch = next(loader)
                keys += batch["key"]
                errors += [(e["key"], e["reason"].replace(folder, "FOLDER")) for e in batch["errors"]]
            return keys, errors

        local, remote = epoch(str(damaged_shards)), epoch(f"{server.url}/set")
        assert remote == local and len(local[1]) >= 4, (remote, local)
    finally:
        server.stop()


def test_make_shards_uploads_what_it_wrote(tmp_path: Path, s3: FaultProxy, shards: Path) -> None:
    import boto3

    from pemt.apps.make_shards import main as make_shards

    for i in range(3):
        write_video(tmp_path / "videos" / f"v{i}.mp4", i)
    local = tmp_path / "shards"
    make_shards([str(tmp_path / "videos"), str(local), "--samples", "2", "--upload", "s3://videos/made"])
    assert read_manifest("s3://videos/made") == read_manifest(local)
    assert len(check_readable("s3://videos/made")) == 2
    assert upload_shards(local, "s3://videos/made", progress=False) == 0, "all there already"
    boto3.client("s3").delete_object(Bucket="videos", Key="made/manifest.json")  # as if cut before it
    assert upload_shards(local, "s3://videos/made", progress=False) == 1, "shards there are not sent again"
    with pytest.raises(ValueError, match="describes other shards"):
        upload_shards(shards, "s3://videos/made", progress=False)
