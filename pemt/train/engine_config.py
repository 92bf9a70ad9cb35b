"""The DeepSpeed engine config, built from the run config (never written by hand)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from pemt.config import micro_batch_size


def deepspeed_config(cfg: DictConfig) -> dict[str, Any]:
    zero = OmegaConf.to_container(cfg.deepspeed, resolve=True)
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
