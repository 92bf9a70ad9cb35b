"""AdamW (optionally its AMSGrad variant, as the paper trains) with linear warmup and cosine decay.

A torch optimizer is handed to DeepSpeed rather than named in its JSON: naming one makes
DeepSpeed JIT-compile its fused kernel, which a CPU run does not need.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn


def build_optimizer(
    model: nn.Module, train_cfg: DictConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            # Norms, biases and embeddings-as-vectors are not weight-decayed.
            (no_decay if param.ndim < 2 else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": float(train_cfg.weight_decay)}, {"params": no_decay, "weight_decay": 0.0}],
        lr=float(train_cfg.lr),
        betas=(0.9, 0.98),
        eps=1e-6,
        amsgrad=bool(train_cfg.get("amsgrad", False)),
    )
    warmup, total = int(train_cfg.warmup_steps), int(train_cfg.max_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The learning rate's share of train.lr after `step` optimizer steps: linear warmup, then a
    cosine to 0 at `total` (train.max_steps)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
