"""What a training job trains: the model, how a batch goes through it, what is evaluated.

The trainer owns everything else (distribution, data order, checkpoints, preemption, tracking),
so pretraining and fine-tuning share it by handing it a different task. A task sees the run
through a `TaskContext` (the engine, its dtype, the rank, the run dir), never the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from pemt.curriculum import Stage
from pemt.data.decode import video_to_float
from pemt.model.backbone import AVBackbone


@dataclass(frozen=True)
class TaskContext:
    """What a task may use of the running job."""

    engine: Any  # the DeepSpeed engine: forward passes, its device
    dtype: torch.dtype
    rank: int
    run_dir: Path

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Task:
    name = "train"

    def build_model(self, cfg: DictConfig) -> nn.Module:
        raise NotImplementedError

    def forward(
        self, engine: Any, batch: dict[str, Any], dtype: torch.dtype, step_seed: int, step: int
    ) -> dict[str, torch.Tensor]:
        """The micro-batch's losses ("loss" is optimised) and any other means to report; `step`:
        optimizer steps done before this one."""
        raise NotImplementedError

    def run_tags(self) -> dict[str, str]:
        """MLflow tags for a new run (links to other runs)."""
        return {}

    def config_warnings(self, cfg: DictConfig) -> list[str]:
        """Lines to warn about, once, before training: settings that run but do not compute what a
        user may expect of them."""
        return []

    def sample_check(self) -> Callable[[dict[str, Any]], None] | None:
        """A picklable check run on every decoded sample in the data workers; it raises
        DecodeError for a sample this task cannot train on (counted as bad, not fatal)."""
        return None

    def evaluate(self, context: TaskContext, step: int) -> dict[str, float]:
        """Collective: metrics on held-out data after `step` (none by default)."""
        return {}

    def enter_stage(self, model: nn.Module, stage: Stage) -> None:
        """A curriculum stage begins: set the model's sequence settings (tokens per clip, node and
        edge sparsity); the weights do not change. Both pemt models carry them on their backbone."""
        backbone = model.get_submodule("backbone")
        assert isinstance(backbone, AVBackbone)
        backbone.set_sparsity(stage.tokens_per_clip, stage.keep_rate, stage.sparsity())


class PretrainTask(Task):
    """The pretraining objectives on unlabelled videos (pemt.model.pretraining)."""

    name = "pretrain"

    def build_model(self, cfg: DictConfig) -> nn.Module:
        from pemt.model.factory import build_pretraining_model

        return build_pretraining_model(cfg)

    def config_warnings(self, cfg: DictConfig) -> list[str]:
        accum = int(cfg.train.grad_accum_steps)
        if accum == 1:
            return []
        together = int(cfg.train.global_batch_size) // accum  # one micro-step, over all ranks
        return [
            f"train.grad_accum_steps={accum}: each micro-step's {together} samples draw their own MEP "
            "negatives, pair partners and InfoNCE negatives and normalise their BatchNorms over themselves, "
            f"not over the global batch of {cfg.train.global_batch_size}: fewer, easier negatives than one "
            "batch of that size (benchmarks/results/converging.md). Prefer more ranks or a larger per-rank batch."
        ]

    def forward(
        self, engine: Any, batch: dict[str, Any], dtype: torch.dtype, step_seed: int, step: int
    ) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = engine(
            video_to_float(batch["video"], engine.device, dtype),
            batch["audio"].to(engine.device, dtype),
            step_seed=step_seed,
            step=step,
        )
        return losses
