"""The DeepSpeed engine config, built from the run config (never written by hand)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from pemt.config import ConfigError, micro_batch_size, one_of, plain, positive_int, world_size


def deepspeed_config(cfg: DictConfig) -> dict[str, Any]:
    zero = plain(cfg.deepspeed)
    return {
        "train_batch_size": int(cfg.train.global_batch_size),
        "train_micro_batch_size_per_gpu": micro_batch_size(cfg),
        "gradient_accumulation_steps": int(cfg.train.grad_accum_steps),
        "gradient_clipping": float(cfg.train.grad_clip),
        # DeepSpeed skips a step whose gradients are not finite; in bf16 only when asked to
        "bf16": {"enabled": True, "check_grad_overflow": True} if cfg.precision == "bf16" else {"enabled": False},
        "steps_per_print": 10**9,  # progress and metrics are the trainer's job
        "wall_clock_breakdown": False,
        **zero,
    }


def check_world(cfg: DictConfig) -> None:
    """The world shape and the `train.*` counts: whole numbers >= 1, known precision."""
    for key in (
        "nodes",
        "gpus_per_node",
        "train.max_steps",
        "train.log_every",
        "train.checkpoint_every",
        "train.global_batch_size",
        "train.grad_accum_steps",
        "train.keep_last",
        "train.max_skipped_steps",
    ):
        positive_int(cfg, key)
    one_of(cfg, "precision", ("fp32", "bf16"))
    one_of(cfg, "train.async_checkpoint", (True, False))
    one_of(cfg, "train.checkpoint_direct_io", (True, False))


def check_batch(cfg: DictConfig) -> None:
    """A global batch that divides over the ranks and the accumulation steps."""
    world = world_size(cfg)
    if cfg.train.global_batch_size % (world * int(cfg.train.grad_accum_steps)):
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by "
            f"world size {world} (nodes={cfg.nodes} x gpus_per_node={cfg.gpus_per_node})"
            f" x train.grad_accum_steps={cfg.train.grad_accum_steps}"
        )
