"""AdamW (optionally its AMSGrad variant, as the paper trains) with linear warmup and cosine decay.

The clip encoders (the CNNs and their projections to the hidden size) train at `train.lr`; the
transformers, their embeddings and the objectives' heads at `train.lr * train.transformer_lr_scale`
at hidden size 256, and in proportion to 256 / `model.hidden_size` at other widths (Adam's rate for
hidden weights falls with their width, as muP has it: BERT-base trains at 1e-4 at 768). A rate that
teaches the CNNs from scratch makes the pair head of a 256-wide model answer every pair alike, while
the 64-wide tiny model learns slowly at 0.3 x 1e-3 and well at 1.2 x 1e-3 (docs/model.md, "Learning
defaults").

A torch optimizer is handed to DeepSpeed rather than named in its JSON: naming one makes
DeepSpeed JIT-compile its fused kernel, which a CPU run does not need.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn

from pemt.config import ConfigError
from pemt.model.backbone import AVBackbone

# The backbone's clip encoders: what `train.lr` itself trains.
ENCODERS = ("visual_cnn", "audio_cnn", "visual_proj", "audio_proj")
REFERENCE_HIDDEN = 256  # the width train.transformer_lr_scale is given for


def check_optimizer(cfg: DictConfig) -> None:
    """The `train.transformer_lr_scale` key."""
    scale = cfg.train.transformer_lr_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 10:
        raise ConfigError(f"train.transformer_lr_scale={scale!r}: give a number in (0, 10] (1: one rate for all)")


def transformer_lr_scale(model: nn.Module, train_cfg: DictConfig) -> tuple[set[int], float]:
    """The ids of the clip encoders' parameters, and the rate of every other parameter as a share of
    `train.lr`: `train.transformer_lr_scale` x 256 / the model's hidden size (1 and no encoders in a
    model without a pemt backbone, or with the scale at 1: one rate for all)."""
    scale = float(train_cfg.transformer_lr_scale)
    try:
        backbone = model.get_submodule("backbone")
    except AttributeError:
        return set(), 1.0
    if scale == 1.0 or not isinstance(backbone, AVBackbone):
        return set(), 1.0
    encoders = {id(p) for name in ENCODERS for p in getattr(backbone, name).parameters()}
    return encoders, scale * REFERENCE_HIDDEN / backbone.hidden


def build_optimizer(
    model: nn.Module, train_cfg: DictConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    lr = float(train_cfg.lr)
    encoders, scale = transformer_lr_scale(model, train_cfg)
    # (encoder?, decayed?) -> parameters; with one rate for all, the two groups of earlier versions,
    # so that their checkpoints still load. Encoders first: the logged `lr` is group 0's.
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {(e, d): [] for e in (True, False) for d in (True, False)}
    for param in model.parameters():
        if param.requires_grad:
            # Norms, biases and embeddings-as-vectors are not weight-decayed.
            groups[(not encoders or id(param) in encoders, param.ndim >= 2)].append(param)
    optimizer = torch.optim.AdamW(
        [
            {
                "params": params,
                "lr": lr if encoder else lr * scale,
                "weight_decay": float(train_cfg.weight_decay) if decayed else 0.0,
            }
            for (encoder, decayed), params in groups.items()
            if params
        ],
        lr=lr,
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
