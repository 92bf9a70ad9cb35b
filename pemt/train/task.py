"""What a training job trains: the model, how a batch goes through it, what is evaluated.

The trainer owns everything else (distribution, data order, checkpoints, preemption, tracking),
so pretraining and fine-tuning share it by handing it a different task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from omegaconf import DictConfig
from torch import nn

from pemt.data.decode import video_to_float

if TYPE_CHECKING:
    from pemt.train.trainer import Trainer


class Task:
    name = "train"

    def build_model(self, cfg: DictConfig) -> nn.Module:
        raise NotImplementedError

    def forward(self, engine: Any, batch: dict, dtype: torch.dtype, step_seed: int) -> dict[str, torch.Tensor]:
        """The micro-batch's losses ("loss" is optimised) and any other means to report."""
        raise NotImplementedError

    def run_tags(self) -> dict[str, str]:
        """MLflow tags for a new run (links to other runs)."""
        return {}

    def sample_check(self) -> Callable[[dict], None] | None:
        """A picklable check run on every decoded sample in the data workers; it raises
        DecodeError for a sample this task cannot train on (counted as bad, not fatal)."""
        return None

    def evaluate(self, trainer: Trainer, step: int) -> dict[str, float]:
        """Collective: metrics on held-out data after `step` (none by default)."""
        return {}


class PretrainTask(Task):
    """The pretraining objectives on unlabelled videos (pemt.model.pretraining)."""

    name = "pretrain"

    def build_model(self, cfg: DictConfig) -> nn.Module:
        from pemt.model.pretraining import AVPretrainingModel
        from pemt.train.curriculum import largest

        clips, tokens_per_clip = largest(cfg)  # position tables for the largest curriculum stage
        return AVPretrainingModel(cfg.model, cfg.data, cfg.loss, clips, tokens_per_clip)

    def forward(self, engine: Any, batch: dict, dtype: torch.dtype, step_seed: int) -> dict[str, torch.Tensor]:
        return engine(video_to_float(batch["video"], engine.device, dtype), batch["audio"].to(engine.device, dtype),
                      step_seed=step_seed)
