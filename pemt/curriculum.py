"""Temporal sparse expansion: training in stages of growing clip count, tokens per clip and
sparsity, within one run.

`curriculum.stages` lists stages, each with `steps` and any of `clips`, `tokens_per_clip`,
`keep_rate` (node sparsity) and `attention` (a partial `model.attention`); what a stage leaves out
comes from the run's config. Stage i starts when the steps of the stages before it are done and
the last one runs to `train.max_steps` (a run may stop before the later stages and be trained
further into them with a larger `train.max_steps`). The stage follows from the step alone, so a resumed run
continues in the stage its checkpoint was in. The model is built once for the largest stage
(position tables); a stage change only changes how clips are decoded and tokens attended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from pemt.config import ConfigError, detached, plain
from pemt.model.sparse_attention import BlockSparsity


@dataclass(frozen=True)
class Stage:
    index: int
    start: int  # steps done when the stage begins
    clips: int
    tokens_per_clip: int
    keep_rate: float
    attention: dict[str, Any]

    def sparsity(self) -> BlockSparsity | None:
        if self.attention["kind"] == "dense":
            return None
        return BlockSparsity(
            int(self.attention["block_size"]), int(self.attention["local_window"]), int(self.attention["random_blocks"])
        )

    def describe(self) -> str:
        attention = self.attention["kind"]
        if attention != "dense":
            attention += (
                f" (block {self.attention['block_size']}, window {self.attention['local_window']}, "
                f"random {self.attention['random_blocks']})"
            )
        return (
            f"stage {self.index} from step {self.start}: {self.clips} clips x {self.tokens_per_clip} tokens, "
            f"keep {self.keep_rate:g}, {attention} attention"
        )


def stages(cfg: DictConfig) -> list[Stage]:
    """The run's stages (one when there is no curriculum); raises ConfigError naming the key."""
    attention_cfg = cfg.model.get("attention")
    base_attention: dict[str, Any] = plain(attention_cfg) if attention_cfg else {"kind": "dense"}
    base = {
        "clips": int(cfg.data.clips),
        "tokens_per_clip": int(cfg.model.get("tokens_per_clip", 1)),
        "keep_rate": float((cfg.model.get("node_sparsity") or {}).get("keep_rate", 1.0)),
    }
    listed_cfg = OmegaConf.select(cfg, "curriculum.stages")
    listed = cast(list[dict[str, Any]], OmegaConf.to_container(listed_cfg, resolve=True)) if listed_cfg else []
    if not listed:
        listed = [{"steps": int(cfg.train.max_steps)}]
    result, start = [], 0
    for index, entry in enumerate(listed):
        where = f"curriculum.stages[{index}]"
        unknown = set(entry) - {"steps", "clips", "tokens_per_clip", "keep_rate", "attention"}
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {sorted(unknown)}; use steps, clips, tokens_per_clip, keep_rate, attention"
            )
        steps = entry.get("steps")
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"{where}.steps={steps!r}: must be a whole number >= 1")
        values: dict[str, Any] = {
            **base,
            **{k: entry[k] for k in ("clips", "tokens_per_clip", "keep_rate") if k in entry},
        }
        attention = {**base_attention, **(entry.get("attention") or {})}
        stage = Stage(
            index, start, int(values["clips"]), int(values["tokens_per_clip"]), float(values["keep_rate"]), attention
        )
        _check(stage, where)
        result.append(stage)
        start += steps
    return result


def _check(stage: Stage, where: str) -> None:
    if stage.clips < 1:
        raise ConfigError(f"{where}.clips={stage.clips}: must be >= 1")
    if stage.tokens_per_clip < 1 or math.isqrt(stage.tokens_per_clip) ** 2 != stage.tokens_per_clip:
        raise ConfigError(
            f"{where}.tokens_per_clip={stage.tokens_per_clip}: must be a square (1, 4, 16 ...): "
            "the cells of a grid over the CNN's feature map"
        )
    if not 0.0 < stage.keep_rate <= 1.0:
        raise ConfigError(f"{where}.keep_rate={stage.keep_rate}: must be in (0, 1]")
    if stage.attention.get("kind") not in ("dense", "block_sparse"):
        raise ConfigError(f"{where}.attention.kind={stage.attention.get('kind')!r}: choose dense or block_sparse")
    if stage.attention["kind"] == "block_sparse":
        try:
            stage.sparsity()
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{where}.attention: {err}") from None


def stage_at(all_stages: list[Stage], step: int) -> Stage:
    """The stage that trains step `step + 1` (after `step` steps)."""
    return [s for s in all_stages if s.start <= step][-1]


def largest(cfg: DictConfig) -> tuple[int, int]:
    """(clips, tokens per clip) the model's position tables must hold."""
    found = stages(cfg)
    return max(s.clips for s in found), max(s.tokens_per_clip for s in found)


def stage_data_config(data_cfg: DictConfig, stage: Stage) -> DictConfig:
    data = detached(data_cfg, resolve=True)
    data.clips = stage.clips
    return data
