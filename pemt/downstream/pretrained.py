"""Pretrained weights for fine-tuning: a pretraining run dir or a file from tools/export.py."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from pemt.config import ConfigError


@dataclass
class Pretrained:
    state: dict[str, torch.Tensor]  # the pretraining model's fp32 state dict
    config: dict[str, Any]  # the pretraining run's resolved config
    step: int
    mlflow_run_id: str | None
    source: str

    def backbone_state(self) -> dict[str, torch.Tensor]:
        prefix = "backbone."
        return {k[len(prefix) :]: v for k, v in self.state.items() if k.startswith(prefix)}


def is_mlflow_run_id(init: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{32}", init) is not None and not Path(init).exists()


def load_pretrained(init: str, tracking_uri: str) -> Pretrained:
    """`init`: a run dir (its newest intact checkpoint), the MLflow run id of one (looked up in
    `tracking_uri`), or an exported .safetensors file."""
    if is_mlflow_run_id(init):
        from pemt.runs import RunNotFound, run_dir_of_mlflow_run

        try:
            init = str(run_dir_of_mlflow_run(init, tracking_uri))
        except RunNotFound as err:
            raise ConfigError(f"task.init={init}: {err}") from None
    path = Path(init)
    if path.suffix == ".safetensors":
        return _from_export(path)
    if path.is_dir():
        from pemt.train.export import consolidated_state

        try:
            state, saved = consolidated_state(path)
        except FileNotFoundError as err:
            raise ConfigError(f"task.init={init}: {err}") from None
        return Pretrained(state, saved["config"], int(saved["step"]), saved.get("mlflow_run_id"), str(path))
    raise ConfigError(f"task.init={init}: neither a pretraining run dir nor an exported .safetensors file")


def _from_export(path: Path) -> Pretrained:
    from safetensors import safe_open
    from safetensors.torch import load_file

    config_file = path.with_suffix(".yaml")
    if not path.exists() or not config_file.exists():
        raise ConfigError(f"task.init={path}: needs {path.name} and {config_file.name} (tools/export.py writes both)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        state = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ConfigError(f"task.init={path}: not a readable safetensors file ({err})") from None
    config = yaml.safe_load(config_file.read_text())
    return Pretrained(state, config, int(meta.get("step", 0)), meta.get("mlflow_run_id") or None, str(path))
