"""Process-group setup from the job environment.

Rank, world size and rendezvous come from submitit's view of the job (local executor or
Slurm), exported as the env:// variables torch and DeepSpeed read. Outside a submitit job
(torchrun, a test spawning processes) those variables are expected to be set already.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pemt.host_memory import keep_freed_host_memory
from pemt.secrets import mask_log_secrets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# The rendezvous port is derived from the job id inside this range: below Linux's ephemeral
# ports (32768-60999), which live connections (gloo's among them) hold at random, so a port
# picked there can already be taken on a busy host.
RENDEZVOUS_PORTS = (20000, 32767)
LEAVE_TOGETHER_S = 60.0  # how long a rank that finished waits for its peers before leaving the group


def rendezvous_port(job_id: str) -> int:
    low, high = RENDEZVOUS_PORTS
    return low + zlib.crc32(str(job_id).encode()) % (high - low + 1)


def submitit_environment() -> Any:
    """submitit's view of the job, or None outside a submitit job (torchrun, a test)."""
    import submitit

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # submitit raises when no known job environment is found
        return None
    return env if env.activated() else None


def node_address(name: str) -> str:
    """An address the other nodes reach node `name` at: the name when it resolves, else the
    NodeAddr Slurm has for it (names of Slurm nodes need not be in DNS or /etc/hosts)."""
    try:
        socket.getaddrinfo(name, None)
        return name
    except socket.gaierror:
        pass
    try:
        shown = subprocess.run(
            ["scontrol", "show", "node", "--oneliner", name], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"node {name!r} does not resolve and Slurm cannot say its address: {err}") from err
    found = re.search(r"\bNodeAddr=(\S+)", shown)
    if not found:
        raise RuntimeError(f"node {name!r} does not resolve and `scontrol show node` gives no NodeAddr")
    return found.group(1)


def _export_job_environment() -> None:
    import submitit

    env = submitit_environment()
    if env is not None:
        # Inside a submitit job its view is the truth, even over RANK etc. inherited from the
        # shell that launched it (a launch from inside another distributed job, say).
        os.environ["MASTER_PORT"] = str(rendezvous_port(env.job_id))
        submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=torch.cuda.is_available(), overwrite=True
        )
        # submitit gives the first node's name; rank 0 runs there, so its address is the rendezvous.
        os.environ["MASTER_ADDR"] = node_address(env.hostnames[0])
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(
                f"{key} is not set: run through launch/pretrain.py (a submitit job) or set "
                "RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
            )


def _extensions_dir() -> Path:
    from torch.utils.cpp_extension import _get_build_directory  # noqa: PLC2701

    return Path(_get_build_directory("deepspeed_shm_comm", verbose=False)).parent


def _shm_op_built() -> bool:
    try:
        return (_extensions_dir() / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").exists()
    except Exception:  # a private torch helper: never let it stop training
        return True


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_min: float = 30.0) -> DistInfo:
    """Join the job's process group through DeepSpeed; on CPU, size threads per rank and keep
    freed host memory for reuse.

    `timeout_min` bounds every collective, the rendezvous included: how long ranks wait for a
    peer that died before they fail too.
    """
    _export_job_environment()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    info = DistInfo(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(0 if os.environ.get("CUDA_VISIBLE_DEVICES", "").isdigit() else info.local_rank)
    else:
        # Ranks on one host share its cores; oversubscribing them slows every rank down.
        cores = len(os.sched_getaffinity(0))
        torch.set_num_threads(max(1, cores // info.local_world_size))
        keep_freed_host_memory()  # activations live in host memory: reuse it, step after step
    if info.rank == 0 and not torch.cuda.is_available() and not _shm_op_built():
        log.info(
            "building DeepSpeed's CPU communication op: the first run on this machine "
            "takes about a minute; later runs reuse it from %s",
            _extensions_dir(),
        )
    deepspeed.init_distributed(
        dist_backend=backend(), auto_mpi_discovery=False, timeout=datetime.timedelta(minutes=timeout_min)
    )
    return info


def leave_distributed(together: bool = False) -> None:
    """Tear the process group down before the interpreter exits. Left to the exit, gloo's
    threads abort the process about half the time ("terminate called without an active
    exception", SIGABRT) after the work is done, which Slurm records as a failed task.

    `together`: every rank ended the run normally, so they meet first (for at most
    LEAVE_TOGETHER_S) and tear down at once; a rank that tears down while a peer is still
    in its own teardown can leave that peer waiting on it (pytorch/pytorch#75097). After a
    failure there may be no peer to meet: each rank leaves on its own."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if together and dist.get_world_size() > 1:
        try:
            dist.barrier(async_op=True).wait(timeout=datetime.timedelta(seconds=LEAVE_TOGETHER_S))
        except RuntimeError as err:
            # Tearing down would wait on the barrier left pending, i.e. on the peer that did not
            # come, and so would the exit (gloo cannot abort). Return, so that the job can still
            # write its result; a job process's exit deadline (pemt.train.exit_deadline) ends it.
            log.warning("ranks did not meet before leaving the process group (%s): not torn down", err)
            return
    dist.destroy_process_group()


def from_main(value: Any, world_size: int) -> Any:
    """Rank 0's `value` on every rank (a picklable object; collective when there are several)."""
    import torch.distributed as dist

    box = [value]
    if world_size > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce(values: dict[str, float], device: torch.device, mean: bool = True) -> dict[str, float]:
    """Mean (or sum) of each value over all ranks, in one collective."""
    import torch.distributed as dist

    if not values:
        return {}
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        if mean:
            tensor /= dist.get_world_size()
    return dict(zip(values, tensor.tolist()))


def min_avg_max(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """`<key>_min`, `<key>_avg`, `<key>_max` of each value over all ranks (stragglers, imbalance)."""
    import torch.distributed as dist

    if not values:
        return {}
    local = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        table = torch.stack(gathered)
    else:
        table = local.unsqueeze(0)
    out: dict[str, float] = {}
    for index, key in enumerate(values):
        column = table[:, index]
        out.update(
            {f"{key}_min": column.min().item(), f"{key}_avg": column.mean().item(), f"{key}_max": column.max().item()}
        )
    return out


class _RankTag(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.tag = f"[rank {rank}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.tag):
            record.msg = f"{self.tag}{record.msg}"
        return True


def tag_log_lines(rank: int) -> None:
    """Every log line this process writes (pemt's, Hydra's, DeepSpeed's) says which rank wrote it,
    and shows no credential."""
    tag = _RankTag(rank)
    loggers = (logging.getLogger(), logging.getLogger("DeepSpeed"))
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, _RankTag) for f in handler.filters):
                handler.addFilter(tag)
    mask_log_secrets(*loggers)
