"""Checks that need the machine, not just the config, run before anything is submitted.

`validate` (pemt.config) checks how values relate; this checks them against the world: the
shards exist and cover every data stream, the run's folders can be written, the disk holds the
checkpoints the run will keep, the Slurm partition exists and is big enough. The result is a
plan the launcher prints, so a user sees what will run before it queues.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from pemt.config import ConfigError, micro_batch_size
from pemt.data.shards import transform_warnings
from pemt.ownership import RunLock, describe
from pemt.secrets import redact

# Bytes a checkpoint holds per parameter: fp32 weights (or bf16 + fp32 master copy) plus
# Adam's two fp32 moments, as DeepSpeed writes them.
CHECKPOINT_BYTES_PER_PARAM = 16
GIB = 2**30


@dataclass(frozen=True)
class Plan:
    nodes: int
    tasks_per_node: int
    micro_batch: int
    grad_accum: int
    global_batch: int
    shards: int
    streams: int
    parameters: int
    checkpoint_gib: float
    free_gib: float
    run_dir: Path
    partition: str | None
    experiment: str
    tracking_uri: str
    init: str | None = None
    warnings: tuple[str, ...] = ()

    def describe(self) -> str:
        where = f"partition {self.partition}" if self.partition else "this machine"
        return "\n".join(
            [
                f"  run dir     {self.run_dir}",
                f"  world       {self.nodes} node(s) x {self.tasks_per_node} task(s) on {where}",
                f"  batch       {self.micro_batch} per rank x {self.grad_accum} accumulation x "
                f"{self.nodes * self.tasks_per_node} ranks = {self.global_batch} per step",
                f"  data        {self.shards} shards over {self.streams} streams",
                f"  model       {self.parameters / 1e6:.2f}M parameters, ~{_size(self.checkpoint_gib)} "
                f"per checkpoint ({self.free_gib:.1f} GiB free)",
                f"  MLflow      experiment {self.experiment} at {redact(self.tracking_uri)}",
                *([f"  init        {self.init}"] if self.init else []),
                *(f"  warning     {line}" for line in self.warnings),
            ]
        )


def _size(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def run_dir_of(cfg: DictConfig) -> Path:
    """Where Hydra will put this sweep point's job (its run dir), known before it runs."""
    return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)


def _shard_count(cfg: DictConfig) -> int:
    if cfg.data.name == "synthetic":
        spec = cfg.data.synthetic
        return math.ceil(int(spec.videos) / int(spec.videos_per_shard))
    from pemt.data.shard_sets import check_readable

    try:
        return len(check_readable(str(cfg.data.shards), str(cfg.paths.cache)))
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.shards={cfg.data.shards}: {err}") from None


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _check_writable(path: Path, what: str) -> Path:
    existing = _existing_parent(path)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path} cannot be created: {existing} is not a writable folder")
    return existing


def _bytes_under(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def slurm_partitions() -> tuple[dict[str, int], str | None]:
    """Partition name -> node count on the cluster this machine submits to, and the default one."""
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%P %D"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except FileNotFoundError:
        raise ConfigError(
            "cluster=slurm but sinfo is not on PATH: launch from a machine with Slurm's client commands (a login node)"
        ) from None
    except subprocess.CalledProcessError as err:
        raise ConfigError(
            f"cluster=slurm but Slurm does not answer: sinfo failed: {err.stderr.strip() or err}"
        ) from None
    partitions: dict[str, int] = {}
    default = None
    for line in out.splitlines():
        name, nodes = line.split()
        if name.endswith("*"):  # sinfo marks the default partition
            name = default = name[:-1]
        partitions[name] = partitions.get(name, 0) + int(nodes)
    return partitions, default


def _check_partition(cfg: DictConfig) -> str | None:
    if cfg.cluster.name != "slurm":
        return None
    partitions, default = slurm_partitions()
    name = default if cfg.cluster.partition is None else str(cfg.cluster.partition)
    if name not in partitions:
        known = ", ".join(sorted(partitions)) or "none"
        what = (
            f"cluster.partition={name}"
            if cfg.cluster.partition is not None
            else "cluster.partition is not set and the cluster has no default partition"
        )
        raise ConfigError(f"{what}: partitions on this cluster: {known}")
    if int(cfg.nodes) > partitions[name]:
        raise ConfigError(
            f"nodes={cfg.nodes} but partition {name} has {partitions[name]} nodes: the job could never start"
        )
    return name


def _check_finetune(cfg: DictConfig) -> str | None:
    """Fine-tuning: the held-out shards are readable and the pretrained weights exist."""
    from pemt.data.shard_sets import check_readable
    from pemt.downstream.pretrained import is_mlflow_run_id

    if cfg.eval.shards:
        try:
            check_readable(str(cfg.eval.shards), str(cfg.paths.cache))
        except (OSError, ValueError) as err:
            raise ConfigError(f"eval.shards={cfg.eval.shards}: {err}") from None
    init = str(cfg.task.init or "")
    if not init or init.endswith(".safetensors"):
        return init or None
    if is_mlflow_run_id(init):
        from pemt.runs import RunNotFound, run_dir_of_mlflow_run

        try:
            run_dir = run_dir_of_mlflow_run(init, str(cfg.mlflow.tracking_uri))
        except RunNotFound as err:
            raise ConfigError(f"task.init={init}: {err}") from None
    else:
        run_dir = Path(init)
    from pemt.train.checkpoint import Checkpointer

    committed = Checkpointer(run_dir / "checkpoints").committed()
    if not committed:
        raise ConfigError(f"task.init={init}: no complete checkpoint under {run_dir / 'checkpoints'}")
    return f"{run_dir} at step {committed[-1].step}"


def check(cfg: DictConfig) -> Plan:
    """Raise ConfigError naming what is wrong, or return the plan for this sweep point."""
    shards, streams = _shard_count(cfg), int(cfg.data.streams)
    if shards < streams:
        raise ConfigError(
            f"{shards} shards for data.streams={streams}: every stream needs at least one "
            "shard; lower data.streams (a multiple of the world size) or write smaller shards"
        )
    run_dir = run_dir_of(cfg)
    _check_writable(run_dir, "run dir")
    owner = RunLock(run_dir).holder()
    if owner is not None:
        raise ConfigError(
            f"run dir {run_dir} is in use by {describe(owner)}: a second job would write beside it; "
            "wait for it to end (python tools/resume.py --list shows where runs stand)"
        )
    disk = _check_writable(run_dir / "checkpoints", "checkpoint dir")
    from pemt.model.factory import parameter_count

    parameters = parameter_count(cfg)  # on the meta device: nothing allocated on a login node
    checkpoint = parameters * CHECKPOINT_BYTES_PER_PARAM
    # Steady state: keep_last checkpoints plus the one being written. Committed ones count towards
    # it; leftovers (unfinished saves, conversion caches) do not: retention deletes them only once
    # a newer checkpoint is durable, so until then they take room of their own.
    from pemt.train.checkpoint import Checkpointer

    checkpoints = Checkpointer(run_dir / "checkpoints")
    committed = sum(_bytes_under(c.path) for c in checkpoints.committed())
    leftovers = checkpoints.leftover_bytes()
    needed = (int(cfg.train.keep_last) + 1) * checkpoint - committed
    free = shutil.disk_usage(disk).free
    if needed > free:
        raise ConfigError(
            f"checkpoints need ~{needed / GIB:.1f} GiB (train.keep_last={cfg.train.keep_last} + 1 of "
            f"~{checkpoint / GIB:.2f} GiB) but {disk} has {free / GIB:.1f} GiB free; free space, lower "
            "train.keep_last or move paths.root"
        )
    return Plan(
        nodes=int(cfg.nodes),
        tasks_per_node=int(cfg.gpus_per_node),
        micro_batch=micro_batch_size(cfg),
        grad_accum=int(cfg.train.grad_accum_steps),
        global_batch=int(cfg.train.global_batch_size),
        shards=shards,
        streams=streams,
        parameters=parameters,
        checkpoint_gib=checkpoint / GIB,
        free_gib=free / GIB,
        run_dir=run_dir,
        partition=_check_partition(cfg),
        experiment=str(cfg.mlflow.experiment),
        tracking_uri=str(cfg.mlflow.tracking_uri),
        init=_check_finetune(cfg) if "task" in cfg else None,
        warnings=(
            *(transform_warnings(cfg.data.shards, cfg.data) if cfg.data.name != "synthetic" else ()),
            *(
                [
                    f"{leftovers / GIB:.2f} GiB of unfinished saves and conversion caches under "
                    f"{run_dir / 'checkpoints'}: deleted once the next checkpoint commits"
                ]
                if leftovers
                else ()
            ),
        ),
    )


def check_submission(script: str) -> str:
    """Ask Slurm whether it would take `script` (sbatch --test-only: nothing is queued); raise
    ConfigError with Slurm's own words if not. Returns Slurm's estimate of where and when."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="pemt-preflight-") as handle:
        handle.write(script)
        handle.flush()
        try:
            result = subprocess.run(["sbatch", "--test-only", handle.name], capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise ConfigError(
                "cluster=slurm but sbatch is not on PATH: launch from a machine with Slurm's client "
                "commands (a login node)"
            ) from None
        except subprocess.TimeoutExpired:
            raise ConfigError("cluster=slurm but `sbatch --test-only` did not answer within 60 s") from None
    said = (result.stderr or result.stdout).strip()
    if result.returncode:
        raise ConfigError(f"Slurm would refuse this job: {said.removeprefix('sbatch: error: ')}")
    return said


_NETWORK_FILESYSTEMS = (
    "nfs",
    "lustre",
    "gpfs",
    "beegfs",
    "cephfs",
    "ceph",
    "glusterfs",
    "fuse.sshfs",
    "cifs",
    "smb3",
    "pvfs2",
    "wekafs",
    "9p",
)


def _filesystem(path: Path) -> str | None:
    """The type of the mount `path` is on (from /proc/mounts), or None."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    path = _existing_parent(path.resolve())
    best = max(
        (m for m in mounts if path == Path(m[0]) or Path(m[0]) in path.parents), key=lambda m: len(m[0]), default=None
    )
    return best[1] if best else None


def tracking_store_warnings(configs: list[DictConfig]) -> list[str]:
    """SQLite takes one writer at a time and its locks are unreliable on network file systems:
    many Slurm jobs sharing one store there lose metrics or time out."""
    warnings = []
    for uri in sorted({str(c.mlflow.tracking_uri) for c in configs}):
        if not uri.startswith("sqlite:///"):
            continue
        store = Path(uri.removeprefix("sqlite:///"))
        filesystem = _filesystem(store) or "?"
        shared = filesystem.lower().startswith(_NETWORK_FILESYSTEMS)
        if shared or len(configs) > 1:  # only each job's rank 0 writes to it
            where = f"on a shared {filesystem} file system" if shared else "on this file system"
            warnings.append(
                f"{len(configs)} job(s) will write to one SQLite store {store} {where}: SQLite serves "
                "one writer at a time and network file systems break its locks; run a tracking "
                "server (README: Looking at runs) and set mlflow.tracking_uri=http://HOST:PORT"
            )
    return warnings
