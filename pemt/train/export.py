"""A run's newest complete checkpoint as one fp32 state dict: exported to a safetensors file
plus its config, or handed to fine-tuning directly.

The weights are gathered from the ZeRO partitions of any stage by DeepSpeed's own
consolidation, so the file loads with `pemt.model.factory.load_exported` without DeepSpeed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from pemt.train.checkpoint import Checkpointer, verify
from pemt.train.universal import glob_safe


def consolidated_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The fp32 weights of the newest complete, intact checkpoint, and its saved state
    (step, config, MLflow run id)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoints = Checkpointer(Path(run_dir) / "checkpoints")
    for candidate in reversed(checkpoints.committed()):
        if verify(candidate.path, candidate.manifest) is None:
            break
    else:
        raise FileNotFoundError(f"{run_dir}: no complete, intact checkpoint to export")
    with glob_safe(checkpoints.directory) as directory:
        state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=candidate.tag)
    # safetensors stores each tensor once: give every entry its own contiguous storage.
    tensors = {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}
    return tensors, {**candidate.manifest["state"], "step": candidate.step}


def export_run(run_dir: Path, out: Path) -> tuple[Path, Path]:
    """Write `out` (.safetensors) and `out` with suffix .yaml (the run's resolved config)."""
    tensors, saved = consolidated_state(run_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors,
        str(out),
        metadata={
            "step": str(saved["step"]),
            "run_dir": str(run_dir),
            "mlflow_run_id": str(saved.get("mlflow_run_id") or ""),
        },
    )
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump(saved["config"], sort_keys=False))
    return out, config
