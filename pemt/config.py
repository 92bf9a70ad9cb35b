"""What every part of pemt shares about configs: the error a bad value raises, the helpers each
component uses to check its own section, the run name, and the resolvers configs refer to.

Each component checks the keys it reads (pemt.train.engine_config the training and world keys,
pemt.data.loader the data keys, pemt.model.factory the model and loss keys, pemt.curriculum the
stages, pemt.cluster.launcher the cluster keys, pemt.downstream.task the task keys);
pemt.checks runs them all, for every point of a sweep before anything is submitted.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pemt.secrets import mask_secret_overrides

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped in the package
DEFAULT_RUN_NAME = "default"
MAX_RUN_NAME_BYTES = 200  # file systems take 255 bytes per name


class ConfigError(ValueError):
    """A config that cannot run, with the key and value at fault in the message."""


def run_name(override_dirname: str) -> str:
    """The run's folder name: its science-changing overrides, or 'default' when none. Path
    separators in values (task.init=..., data.shards=...) become '_' so the run stays one folder,
    and the name then ends with a hash of the overrides as given, so `/d/a_b` and `/d/a/b` stay two
    runs; a name past what file systems take is cut and ended with a hash of the whole."""
    override_dirname = mask_secret_overrides(override_dirname)  # a folder name never holds a secret
    name = override_dirname.replace(os.sep, "_") or DEFAULT_RUN_NAME
    if name != (override_dirname or DEFAULT_RUN_NAME):
        name += "-" + hashlib.sha1(override_dirname.encode()).hexdigest()[:8]
    if len(name.encode()) > MAX_RUN_NAME_BYTES:
        digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:12]
        name = name.encode()[: MAX_RUN_NAME_BYTES - 13].decode(errors="ignore") + "-" + digest
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


def compose_config(name: str = "pretrain", overrides: Sequence[str] = (), hydra: bool = False) -> DictConfig:
    """`name`'s config with `overrides`, composed as a launch would without launching anything
    (benchmarks, tools, tests); `hydra` keeps Hydra's own section."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=hydra)


def world_size(cfg: DictConfig) -> int:
    return int(cfg.nodes) * int(cfg.gpus_per_node)


def micro_batch_size(cfg: DictConfig) -> int:
    """Samples per rank per forward pass, from the global batch."""
    return int(cfg.train.global_batch_size) // (world_size(cfg) * int(cfg.train.grad_accum_steps))


def positive_int(cfg: DictConfig, key: str) -> int:
    """`key`'s value, which must be a whole number >= 1 (ConfigError naming it otherwise)."""
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r}: must be a whole number >= 1")
    return value


def positive_number(cfg: DictConfig, key: str) -> float:
    """`key`'s value, which must be a number > 0 (ConfigError naming it otherwise)."""
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ConfigError(f"{key}={value!r}: must be a number > 0")
    return float(value)


def one_of(cfg: DictConfig, key: str, choices: tuple[Any, ...]) -> object:
    """`key`'s value, which must be one of `choices` (compared with their types: `no` is not false)."""
    value = OmegaConf.select(cfg, key)
    if not any(value == c and type(value) is type(c) for c in choices):
        raise ConfigError(f"{key}={value!r}: choose {' or '.join(map(repr, choices))}")
    return value


def plain(cfg: DictConfig, resolve: bool = True) -> dict[str, Any]:
    """A config section as plain Python containers (for dataclasses, JSON, DeepSpeed)."""
    container = OmegaConf.to_container(cfg, resolve=resolve)
    if not isinstance(container, dict):
        raise ConfigError(f"expected a mapping, got {container!r}")
    return {str(k): v for k, v in container.items()}


def detached(cfg: DictConfig, resolve: bool = False) -> DictConfig:
    """An independent copy of `cfg` (no parent, no shared nodes) that can be edited freely."""
    return OmegaConf.create(plain(cfg, resolve=resolve))
