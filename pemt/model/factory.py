"""The one way to build the pretraining model from a config, to count it, and to load its export.

Training, fine-tuning's initialisation, preflight, `tools/count_params.py` and `tools/export.py`
all go through here, so they agree on every shape: the position tables hold the longest sequence
the run's curriculum reaches, not only `data.clips`. Counting builds on the meta device and
allocates nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pemt.config import ConfigError, detached, one_of, plain
from pemt.curriculum import largest
from pemt.model.pretraining import AVPretrainingModel


def sequence_shape(cfg: DictConfig) -> tuple[int, int]:
    """(clips, tokens per clip) the model's position tables hold: the largest curriculum stage."""
    return largest(cfg)


def build_pretraining_model(cfg: DictConfig) -> AVPretrainingModel:
    clips, tokens_per_clip = sequence_shape(cfg)
    return AVPretrainingModel(cfg.model, cfg.data, cfg.loss, clips, tokens_per_clip, cnn_warmup_steps(cfg))


def cnn_warmup_steps(cfg: DictConfig) -> int:
    """The steps in which only the InfoNCE trains: `loss.cnn_warmup_steps`, at most half of
    `train.max_steps`, so that a short run still trains every objective; none without the InfoNCE
    (`loss.contrastive_weight=0`: the paper's objectives from the first step)."""
    return warmup_of(cfg.loss, int(cfg.train.max_steps))


def warmup_of(loss: Any, max_steps: int) -> int:
    """`cnn_warmup_steps` of a `loss` section (a config or a checkpoint's saved dict; keys it lacks
    count as 0, what runs without them did) in a run of `max_steps`."""
    if not loss.get("contrastive_weight", 0):
        return 0
    return min(int(loss.get("cnn_warmup_steps", 0)), max_steps // 2)


def shape_only_model(cfg: DictConfig) -> AVPretrainingModel:
    """The model on the meta device: every parameter's shape, nothing allocated or initialised.

    An orthogonal inner matrix checks itself when it is registered, which needs values; a free one
    has the same parameters, so that is what is built here."""
    counted = detached(cfg)
    if "factorized" in counted.model.get("sharing", []):
        counted.model.factorized.inner = "free"
    with torch.device("meta"):
        return build_pretraining_model(counted)


def load_exported(weights: str | Path, config: str | Path | None = None) -> tuple[AVPretrainingModel, DictConfig]:
    """A model exported by tools/export.py (`model.safetensors` and its `model.yaml`), loaded
    strictly: every tensor the file holds has its place, and every place its tensor."""
    from safetensors.torch import load_file

    weights = Path(weights)
    config = config or weights.with_suffix(".yaml")
    cfg = OmegaConf.load(config)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{config}: not a model config (a mapping)")
    model = build_pretraining_model(cfg)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model, cfg


def parameter_count(cfg: DictConfig) -> int:
    return sum(p.numel() for p in shape_only_model(cfg).parameters())


def describe_counts(cfg: DictConfig) -> dict[str, Any]:
    """Parameters per component (pemt.model.params), counted on the meta device."""
    from pemt.model.params import count_parameters

    return dict(count_parameters(shape_only_model(cfg)))


def check_model(cfg: DictConfig) -> None:
    """The `model.*` and `loss.*` keys the model reads."""
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(
            f"model.hidden_size={cfg.model.hidden_size} is not divisible by model.num_heads={cfg.model.num_heads}"
        )
    unknown = set(cfg.model.sharing) - {"layer", "cross", "factorized"}
    if unknown:
        raise ConfigError(
            f"model.sharing={list(cfg.model.sharing)}: unknown {sorted(unknown)}; use any of layer, cross, factorized"
        )
    one_of(cfg, "model.fusion", ("mid", "early", "late"))
    one_of(cfg, "model.batchnorm", ("fused", "explicit"))
    if "factorized" in cfg.model.sharing:
        from pemt.model.factorized import Factorization

        try:
            Factorization(**plain(cfg.model.factorized))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model.{err}") from None
    one_of(cfg, "loss.sampling", ("content", "uniform"))
    one_of(cfg, "loss.pair_head", ("bos", "agreement"))
    one_of(cfg, "loss.contrastive_level", ("video", "clip"))
    one_of(cfg, "loss.mep_targets", ("fixed", "trained"))
    warmup = cfg.loss.cnn_warmup_steps
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"loss.cnn_warmup_steps={warmup!r}: give a number of steps >= 0")
    if not 0.0 < cfg.loss.mask_ratio < 1.0:
        raise ConfigError(f"loss.mask_ratio={cfg.loss.mask_ratio}: must be between 0 and 1")
