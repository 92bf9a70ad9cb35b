"""`train.compile`: the model's compute blocks compiled with torch.compile, in place.

Compiled block by block, as torchtitan does: every transformer layer and each clip CNN. Whole-model
graphs would be cut anyway by what sits between the blocks (the masks' generators, the gathers over
ranks, the losses), and a block recompiles alone when its inputs change (a curriculum stage, another
modality of a shared layer). `nn.Module.compile` keeps each block the same module, so parameter
names, checkpoints, exports and resume are those of the eager model. The first step of a job pays
the compilation (tens of seconds on CPU); inductor's cache shortens it for later jobs on the node.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig
from torch import nn

from pemt.config import ConfigError, one_of
from pemt.model.cnn import ResNet
from pemt.model.transformer import TransformerLayer

log = logging.getLogger(__name__)

COMPILED_BLOCKS = (TransformerLayer, ResNet)
# A shared layer is called per modality, with and without pruning, at each curriculum stage's
# length, and a rank's batch shrinks when it drops a bad sample: more variants than dynamo's
# default of 8 before it gives up and runs the block eagerly.
RECOMPILE_LIMIT = 64
# `train.compile=auto` compiles runs of at least this many steps. Measured on 2 CPU cores: a
# compiled step takes ~0.8x as long, and compiling costs 30-120 s once per job, earned back after
# a few hundred steps of the mid-size model and ~1500 of the tiny one; short runs (the embedded
# default, tests) start at once.
AUTO_MIN_STEPS = 2000


def check_compile(cfg: DictConfig) -> None:
    one_of(cfg, "train.compile", ("auto", True, False))
    if cfg.train.compile is True and _zero_stage(cfg) == 3:
        raise ConfigError(
            "train.compile=true with deepspeed=zero3: ZeRO-3 gathers each layer's parameters in hooks "
            "that make compiled blocks recompile on every call (a step took 1.6x as long as eager); "
            "use deepspeed=zero1 or zero2, or train.compile=false"
        )


def _zero_stage(cfg: DictConfig) -> int:
    return int(cfg.deepspeed.zero_optimization.stage)


def compiles(cfg: DictConfig) -> bool:
    """Whether this run compiles: `true`, or `auto` on a run long enough to earn the compilation
    back (and not under ZeRO-3)."""
    if cfg.train.compile == "auto":
        return int(cfg.train.max_steps) >= AUTO_MIN_STEPS and _zero_stage(cfg) != 3
    return bool(cfg.train.compile)


def compile_blocks(model: nn.Module) -> int:
    """Compile every transformer layer and clip CNN of `model` in place; how many were compiled."""
    import torch._dynamo.config as dynamo
    import torch._inductor.config as inductor

    dynamo.recompile_limit = max(int(dynamo.recompile_limit), RECOMPILE_LIMIT)
    # Random draws inside compiled blocks (dropout, block-sparse attention's random blocks) from
    # torch's generator as in eager mode, so compiling changes no draw and a run may turn
    # `train.compile` on or off when it resumes.
    inductor.fallback_random = True
    blocks = [module for module in model.modules() if isinstance(module, COMPILED_BLOCKS)]
    for block in blocks:
        # Static shapes: each new shape compiles its own graph. Dynamic ones failed to lower the
        # CNNs' convolutions (the visual and audio CNNs share one forward, so the second CNN's
        # shapes looked like a changing shape), and shapes change only between stages.
        block.compile(dynamic=False)
    log.info("train.compile: %d blocks compiled on first use (transformer layers and clip CNNs)", len(blocks))
    return len(blocks)
