"""Checks on a composed config, run before any job starts, and the config resolvers.

Hydra reports unknown groups and keys by itself; what it cannot know is how values relate
(world size against batch size, say). Those checks live here so the launcher can run them
for every point of a sweep before submitting anything.
"""

from __future__ import annotations

import hashlib
import os

from omegaconf import DictConfig, OmegaConf

DEFAULT_RUN_NAME = "default"
MAX_RUN_NAME_BYTES = 200   # file systems take 255 bytes per name


class ConfigError(ValueError):
    """A config that cannot run, with the key and value at fault in the message."""


def run_name(override_dirname: str) -> str:
    """The run's folder name: its science-changing overrides, or 'default' when none. Path
    separators in values (task.init=..., data.shards=...) become '_' so the run stays one folder,
    and the name then ends with a hash of the overrides as given, so `/d/a_b` and `/d/a/b` stay two
    runs; a name past what file systems take is cut and ended with a hash of the whole."""
    name = override_dirname.replace(os.sep, "_") or DEFAULT_RUN_NAME
    if name != (override_dirname or DEFAULT_RUN_NAME):
        name += "-" + hashlib.sha1(override_dirname.encode()).hexdigest()[:8]
    if len(name.encode()) > MAX_RUN_NAME_BYTES:
        digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:12]
        name = name.encode()[:MAX_RUN_NAME_BYTES - 13].decode(errors="ignore") + "-" + digest
    return name


def hydra_quoted(value: str) -> str:
    """`value` as one quoted Hydra override value (paths of runs hold = , [ ] which Hydra parses)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def hydra_unquoted(value: str) -> str:
    """The value of an override as Hydra reads it, without its quotes."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1].replace(f"\\{value[0]}", value[0]).replace("\\\\", "\\")
    return value


def explicit_run_dir(root: DictConfig) -> str | None:
    """`run_dir` when the user set it (run_dir=PATH), read without resolving it: by default it is
    Hydra's output dir, which is itself made from the sweep dir these resolvers compute."""
    node = root._get_node("run_dir") if isinstance(root, DictConfig) else None
    if node is None or OmegaConf.is_interpolation(root, "run_dir") or node._value() is None:
        return None
    return os.path.abspath(str(node._value()))


def _sweep_dir(default: str, _root_: DictConfig) -> str:
    explicit = explicit_run_dir(_root_)
    return os.path.dirname(explicit) if explicit else default


def _run_subdir(override_dirname: str, _root_: DictConfig) -> str:
    explicit = explicit_run_dir(_root_)
    return os.path.basename(explicit) if explicit else run_name(override_dirname)


def _submitit_dir(default: str, _root_: DictConfig) -> str:
    explicit = explicit_run_dir(_root_)
    return os.path.join(explicit, ".submitit", "%j") if explicit else default


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("pemt_run_name"):
        OmegaConf.register_new_resolver("pemt_run_name", run_name)
    if not OmegaConf.has_resolver("pemt_sweep_dir"):
        # run_dir=PATH puts the run (Hydra's .hydra/, logs, checkpoints) in PATH itself
        OmegaConf.register_new_resolver("pemt_sweep_dir", _sweep_dir)
        OmegaConf.register_new_resolver("pemt_run_subdir", _run_subdir)
        OmegaConf.register_new_resolver("pemt_submitit_dir", _submitit_dir)
    if not OmegaConf.has_resolver("pemt_abspath"):
        # Relative paths are taken from where the launch command runs.
        OmegaConf.register_new_resolver("pemt_abspath", lambda path: os.path.abspath(path))


register_resolvers()


def world_size(cfg: DictConfig) -> int:
    return int(cfg.nodes) * int(cfg.gpus_per_node)


def micro_batch_size(cfg: DictConfig) -> int:
    """Samples per rank per forward pass, from the global batch."""
    return int(cfg.train.global_batch_size) // (world_size(cfg) * int(cfg.train.grad_accum_steps))


def _positive_int(cfg: DictConfig, key: str) -> int:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r}: must be a whole number >= 1")
    return value


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the key and value if `cfg` cannot run."""
    for key in ("nodes", "gpus_per_node", "train.max_steps", "train.log_every",
                "train.checkpoint_every", "train.global_batch_size", "train.grad_accum_steps", "train.keep_last",
                "data.clips", "data.frames_per_clip"):
        _positive_int(cfg, key)
    world = world_size(cfg)
    per_step = world * int(cfg.train.grad_accum_steps)
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by "
            f"world size {world} (nodes={cfg.nodes} x gpus_per_node={cfg.gpus_per_node})"
            f" x train.grad_accum_steps={cfg.train.grad_accum_steps}"
        )
    streams = _positive_int(cfg, "data.streams")
    if streams % world:
        raise ConfigError(f"data.streams={streams} is not divisible by world size {world}; "
                          "choose a multiple of nodes x gpus_per_node")
    if cfg.train.global_batch_size % (streams * int(cfg.train.grad_accum_steps)):
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by data.streams="
            f"{streams} x train.grad_accum_steps={cfg.train.grad_accum_steps}: every stream gives "
            "the same number of samples to each step")
    if cfg.cluster.name == "local" and cfg.nodes != 1:
        raise ConfigError(f"nodes={cfg.nodes}: cluster=local runs on this machine only; use nodes=1")
    if cfg.precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision={cfg.precision!r}: choose fp32 or bf16")
    if cfg.data.name != "synthetic" and not cfg.data.shards:
        raise ConfigError("data.shards is not set: give a shard folder with its manifest.json")
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(
            f"model.hidden_size={cfg.model.hidden_size} is not divisible by "
            f"model.num_heads={cfg.model.num_heads}"
        )
    unknown = set(cfg.model.sharing) - {"layer", "cross", "factorized"}
    if unknown:
        raise ConfigError(f"model.sharing={list(cfg.model.sharing)}: unknown {sorted(unknown)}; "
                          "use any of layer, cross, factorized")
    if cfg.model.fusion not in ("mid", "early", "late"):
        raise ConfigError(f"model.fusion={cfg.model.fusion!r}: choose mid, early or late")
    if cfg.data.short_videos not in ("loop", "pad"):
        raise ConfigError(f"data.short_videos={cfg.data.short_videos!r}: choose loop or pad")
    if cfg.loss.sampling not in ("content", "uniform"):
        raise ConfigError(f"loss.sampling={cfg.loss.sampling!r}: choose content or uniform")
    if not 0.0 < cfg.loss.mask_ratio < 1.0:
        raise ConfigError(f"loss.mask_ratio={cfg.loss.mask_ratio}: must be between 0 and 1")
    from pemt.train.curriculum import stages

    stages(cfg)  # the curriculum's stages, or the one stage of the plain config
    if "task" in cfg:
        _validate_finetune(cfg)


def _validate_finetune(cfg: DictConfig) -> None:
    from pemt.downstream.models import FREEZABLE, TASKS

    if cfg.task.name not in TASKS:
        raise ConfigError(f"task.name={cfg.task.name!r}: choose one of {', '.join(TASKS)}")
    unknown = set(cfg.task.freeze) - set(FREEZABLE)
    if unknown:
        raise ConfigError(f"task.freeze={list(cfg.task.freeze)}: unknown {sorted(unknown)}; "
                          f"use any of {', '.join(FREEZABLE)}")
    if cfg.task.loss not in ("cross_entropy", "multi_margin"):
        raise ConfigError(f"task.loss={cfg.task.loss!r}: choose cross_entropy or multi_margin")
    from pemt.downstream.pretrained import is_mlflow_run_id

    init = str(cfg.task.init or "")
    if init and not os.path.exists(init) and not is_mlflow_run_id(init):
        raise ConfigError(f"task.init={init}: no such run dir or file (nor an MLflow run id)")
    _positive_int(cfg, "eval.batch_size")
