"""Representation collapse, watched at every log step of a pretraining run.

A pretraining run can go on for days with nothing learned: the fused output the pair head reads
stops depending on the video (its spread across the batch falls to ~0), the pair loss sits at
ln 2 and the gradient vanishes, while the loss curve looks merely flat. The watch reads what the
model reports at each log step (`spread_fused`, `pair_logit_spread`, `pair_accuracy`,
`grad_norm`, reduced over ranks, so every rank decides alike without a collective) and calls the
run collapsed when, after the warm-up, for `train.collapse.patience` log steps in a row:

- the fused output's spread is under `train.collapse.min_spread`, or
- the pair head's logit varies across the batch by less than `train.collapse.min_pair_logit_spread`
  (it gives every pair the same answer: the pair objective learns nothing, even while other
  objectives keep the gradient large), or
- pair accuracy is within `train.collapse.chance_margin` of 0.5 and the gradient norm is under
  `train.collapse.min_grad_norm`.

It says so once, in one warning line and an MLflow tag (`pemt.collapse`); with
`train.stop_on_collapse=true` the trainer then writes a checkpoint and stops the run. Runs that
report no such figures (fine-tuning) are never judged, nor is a run before its CNN warm-up
(`loss.cnn_warmup_steps`, ended early by `loss.cnn_warmup_until`: pemt.train.cnn_warmup) and the
learning-rate warm-up after it are over.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from pemt.config import ConfigError

TAG = "pemt.collapse"
WATCHED = ("spread_fused", "pair_logit_spread", "pair_accuracy", "grad_norm")


class CollapseError(RuntimeError):
    """The run collapsed and `train.stop_on_collapse` stopped it (after its checkpoint)."""

    @classmethod
    def stopped(cls, verdict: str, step: int) -> CollapseError:
        return cls(
            f"{verdict}. Stopped (train.stop_on_collapse=true): the checkpoint at step {step} is kept; "
            "change what the message suggests and start a new run, or resume this one with "
            "train.allow_config_change=[...]"
        )


@dataclass(frozen=True)
class CollapseLimits:
    min_spread: float
    min_pair_logit_spread: float
    chance_margin: float
    min_grad_norm: float
    patience: int

    @classmethod
    def from_config(cls, train_cfg: DictConfig) -> CollapseLimits:
        section = train_cfg.collapse
        limits = cls(
            float(section.min_spread),
            float(section.min_pair_logit_spread),
            float(section.chance_margin),
            float(section.min_grad_norm),
            int(section.patience),
        )
        for key in ("min_spread", "min_pair_logit_spread", "chance_margin", "min_grad_norm"):
            if getattr(limits, key) < 0:
                raise ConfigError(f"train.collapse.{key}={getattr(limits, key)}: give a value >= 0")
        if limits.patience < 1:
            raise ConfigError(f"train.collapse.patience={limits.patience}: give a number of log steps >= 1")
        return limits


def check_collapse(cfg: DictConfig) -> None:
    """The `train.collapse.*` and `train.stop_on_collapse` keys."""
    CollapseLimits.from_config(cfg.train)
    if not isinstance(cfg.train.stop_on_collapse, bool):
        raise ConfigError(f"train.stop_on_collapse={cfg.train.stop_on_collapse!r}: give true or false")


class CollapseWatch:
    def __init__(self, limits: CollapseLimits, warmup_steps: int) -> None:
        self.limits, self.warmup_steps = limits, warmup_steps
        self.in_a_row = 0
        self.verdict: str | None = None  # set once, when the run is first called collapsed

    def symptoms(self, metrics: dict[str, float]) -> list[str]:
        """What in these log-step metrics looks collapsed (empty: healthy, or not judged)."""
        found = []
        spread = metrics.get("spread_fused")
        if spread is not None and spread < self.limits.min_spread:
            found.append(
                f"the fused output's spread is {spread:.4f} (< train.collapse.min_spread={self.limits.min_spread})"
            )
        logit_spread = metrics.get("pair_logit_spread")
        if logit_spread is not None and logit_spread < self.limits.min_pair_logit_spread:
            found.append(
                f"the pair head's logit varies by {logit_spread:.4f} across the batch "
                f"(< train.collapse.min_pair_logit_spread={self.limits.min_pair_logit_spread}): "
                "it gives every pair the same answer"
            )
        accuracy, grad_norm = metrics.get("pair_accuracy"), metrics.get("grad_norm")
        if (
            accuracy is not None
            and grad_norm is not None
            and abs(accuracy - 0.5) <= self.limits.chance_margin
            and grad_norm < self.limits.min_grad_norm
        ):
            found.append(
                f"pair accuracy is {accuracy:.3f} (chance) with a gradient norm of {grad_norm:.2g} "
                f"(< train.collapse.min_grad_norm={self.limits.min_grad_norm})"
            )
        return found

    def observe(self, step: int, metrics: dict[str, float]) -> str | None:
        """The collapse message the first time the run is called collapsed at `step`, else None."""
        if self.verdict is not None or step <= self.warmup_steps:
            return None
        found = self.symptoms(metrics)
        self.in_a_row = self.in_a_row + 1 if found else 0
        if self.in_a_row < self.limits.patience:
            return None
        self.verdict = (
            f"representation collapse at step {step}: for {self.in_a_row} log steps in a row {'; '.join(found)}. "
            "The pair objective learns nothing more. Try a lower train.transformer_lr_scale (the transformers' "
            "rate; the CNNs keep train.lr) or a lower train.lr (or a longer train.warmup_steps), "
            "check that the CNN features differ between videos (spread_visual, spread_audio), or "
            "model.*_cnn.out_norm=true; where a pair can only be told by content the CNNs have not learned "
            "yet, let loss.contrastive_weight > 0 teach them first for longer (loss.cnn_warmup_steps)"
        )
        return self.verdict
