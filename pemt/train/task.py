"""What a training job trains: the model, how a batch goes through it, what is evaluated.

The trainer owns everything else (distribution, data order, checkpoints, preemption, tracking),
so pretraining and fine-tuning share it by handing it a different task. A task sees the run
through a `TaskContext` (the engine, its dtype, the rank, the run dir), never the trainer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from pemt.curriculum import Stage
from pemt.data.decode import video_to_float
from pemt.model.backbone import AVBackbone
from pemt.model.cnn import kept_batchnorm_statistics
from pemt.model.collectives import micro_step, micro_steps

# (step_seed, step) of a micro-batch: what Task.forward draws its masks and negatives from
Keys = Callable[[dict[str, Any]], tuple[int, int]]
MicroStep = Callable[[int], contextlib.AbstractContextManager[None]]


def micro_batch_keys(seed: int, grad_accum_steps: int) -> Keys:
    """A micro-batch's step seed (its masks and negatives) and the optimizer steps before it."""
    return lambda batch: (seed * 1_000_003 + batch["micro_step"], batch["micro_step"] // grad_accum_steps)


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

    @contextlib.contextmanager
    def accumulation(
        self, engine: Any, batches: list[dict[str, Any]], dtype: torch.dtype, keys: Keys
    ) -> Iterator[MicroStep]:
        """Around one optimizer step's micro-steps: yields the context micro-step i runs in."""
        yield lambda i: contextlib.nullcontext()

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

    @contextlib.contextmanager
    def accumulation(
        self, engine: Any, batches: list[dict[str, Any]], dtype: torch.dtype, keys: Keys
    ) -> Iterator[MicroStep]:
        """Several micro-steps draw MEP negatives, pair partners and InfoNCE negatives from the
        whole step's batch, as one batch of that size would: a forward pass without gradients over
        every micro-batch first records what they gather (pemt.model.collectives.micro_steps).
        BatchNorm still normalises over each micro-step, and its running statistics move as
        without the extra pass."""
        if len(batches) == 1:
            yield lambda i: contextlib.nullcontext()
            return
        with micro_steps(len(batches)):
            # eager: with a no-grad graph of each compiled block as well, a resumed run's steps came
            # out other in their last bits than an uninterrupted run's
            with (
                torch.no_grad(),
                kept_batchnorm_statistics(engine.module),
                torch.compiler.set_stance("force_eager"),
            ):
                for i, batch in enumerate(batches):
                    step_seed, step = keys(batch)
                    with micro_step(i, replay=False):
                        self._run(engine.module, engine.device, batch, dtype, step_seed, step)
            yield lambda i: micro_step(i, replay=True)

    def config_warnings(self, cfg: DictConfig) -> list[str]:
        accum = int(cfg.train.grad_accum_steps)
        if accum == 1:
            return []
        together = int(cfg.train.global_batch_size) // accum  # one micro-step, over all ranks
        return [
            f"train.grad_accum_steps={accum}: each micro-step's {together} samples normalise their BatchNorms "
            f"over themselves, not over the global batch of {cfg.train.global_batch_size}. Their MEP negatives, "
            "pair partners and InfoNCE negatives come from the whole step's batch, for one more forward pass "
            "without gradients per micro-batch (benchmarks/results/converging.md). Prefer more ranks or a "
            "larger per-rank batch."
        ]

    def forward(
        self, engine: Any, batch: dict[str, Any], dtype: torch.dtype, step_seed: int, step: int
    ) -> dict[str, torch.Tensor]:
        return self._run(engine, engine.device, batch, dtype, step_seed, step)

    @staticmethod
    def _run(
        model: Callable[..., dict[str, torch.Tensor]],
        device: torch.device,
        batch: dict[str, Any],
        dtype: torch.dtype,
        step_seed: int,
        step: int,
    ) -> dict[str, torch.Tensor]:
        """`model` (the engine, or its module for the recording pass) on the micro-batch."""
        video = video_to_float(batch["video"], device, dtype)
        return model(video, batch["audio"].to(device, dtype), step_seed=step_seed, step=step)
