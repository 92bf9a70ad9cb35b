"""The `cluster.*` keys: where jobs run. Checked before anything is submitted."""

from __future__ import annotations

from omegaconf import DictConfig

from pemt.config import ConfigError, one_of, positive_int


def check_cluster(cfg: DictConfig) -> None:
    if cfg.cluster.name == "local" and cfg.nodes != 1:
        raise ConfigError(f"nodes={cfg.nodes}: cluster=local runs on this machine only; use nodes=1")
    positive_int(cfg, "cluster.time_min")
    if cfg.cluster.name == "slurm":
        # typed: `cluster.requeue=no` is a string, and a truthy one
        one_of(cfg, "cluster.requeue", (True, False))
        one_of(cfg, "cluster.gpus", (True, False))
        positive_int(cfg, "cluster.signal_delay_s")
        positive_int(cfg, "cluster.cpus_per_task")
        max_requeue = cfg.cluster.max_requeue
        if not isinstance(max_requeue, int) or isinstance(max_requeue, bool) or max_requeue < 0:
            raise ConfigError(f"cluster.max_requeue={max_requeue!r}: must be a whole number >= 0")
