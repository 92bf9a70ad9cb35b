"""Where the CNN warm-up ends: at `loss.cnn_warmup_steps`, or earlier, once the CNNs have learned.

During the warm-up only the audio-visual InfoNCE trains (pemt.model.pretraining): MEP and the pair
read the CNNs' clip embeddings, and a pair head trained on features that say nothing yet learns to
ignore them and does not come back. When the CNNs start to learn varies by hundreds of steps with
the data order alone (docs/model.md, "Learning defaults"), so a fixed length either wastes steps or
ends too soon. With `loss.cnn_warmup_until` set, the warm-up ends after the first step at which the
InfoNCE's share of its chance value ln N (N: the candidates each clip is matched against; the model
reports it as `contrastive_vs_chance`), averaged over the last 10 steps and over ranks, is under that
share. `loss.cnn_warmup_steps` (at most half the run) is then its longest. Where it ended is kept in
the checkpoint, so a resumed run goes on as the uninterrupted one did.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pemt.config import ConfigError
from pemt.distributed import all_reduce

WINDOW = 10  # steps the share is averaged over: one step's is noisy, and a start far above chance is soon forgotten
METRIC = "contrastive_vs_chance"
TAG = "pemt.cnn_warmup"  # set where the warm-up ran its longest without the CNNs learning


def check_cnn_warmup(cfg: DictConfig) -> None:
    """The `loss.cnn_warmup_until` key."""
    until = OmegaConf.select(cfg, "loss.cnn_warmup_until", default=None)
    if until is None:
        return
    if isinstance(until, bool) or not isinstance(until, (int, float)) or not 0 < until < 1:
        raise ConfigError(
            f"loss.cnn_warmup_until={until!r}: give a share of the InfoNCE's chance value in (0, 1), "
            "or null for a warm-up of exactly loss.cnn_warmup_steps"
        )


class CnnWarmup:
    """The warm-up of one run. `end`: the optimizer steps done from which MEP and the pair count."""

    def __init__(self, longest: int, until: float | None) -> None:
        self.longest, self.until = longest, until
        self.recent: list[float] = []  # the last WINDOW steps' shares
        self.ended_at: int | None = None  # where it ended, once it has
        self.learned = False  # ... because the InfoNCE fell under `until`

    @classmethod
    def from_config(cls, cfg: DictConfig, longest: int) -> CnnWarmup:
        until = OmegaConf.select(cfg, "loss.cnn_warmup_until", default=None)
        return cls(longest, None if until is None else float(until))

    @property
    def end(self) -> int:
        return self.longest if self.ended_at is None else min(self.ended_at, self.longest)

    def watching(self, step: int) -> bool:
        """Whether the share is wanted after `step` optimizer steps (the warm-up may still end early).
        A warm-up shorter than the window (a smoke run's) is not judged: it lasts its length."""
        return self.until is not None and self.ended_at is None and WINDOW <= self.longest and step <= self.longest

    def observe(self, step: int, share: float) -> str | None:
        """After `step` optimizer steps, this step's share (the same on every rank). A line to log
        where the warm-up ends here: early, or at its longest without the CNNs having learned."""
        if not self.watching(step):
            return None
        assert self.until is not None
        self.recent = [*self.recent, share][-WINDOW:]
        average = sum(self.recent) / len(self.recent)
        if len(self.recent) == WINDOW and average < self.until:
            self.ended_at, self.learned = step, True
            return (
                f"CNN warm-up over at step {step}: the InfoNCE is at {average:.3f} of its chance value "
                f"(< loss.cnn_warmup_until={self.until}); MEP and the pair train from here"
            )
        if step == self.longest:
            self.ended_at = step
            return (
                f"CNN warm-up ran its longest (loss.cnn_warmup_steps, at most half of train.max_steps: {step} steps) "
                f"with the InfoNCE still at {average:.3f} of its chance value (loss.cnn_warmup_until="
                f"{self.until}): the CNNs have barely learned to match sound and picture, and MEP and the pair "
                "now train on features that say little. A longer loss.cnn_warmup_steps (and train.max_steps) "
                "gives them more time"
            )
        return None

    def observe_step(self, step: int, outs: list[dict[str, torch.Tensor]], device: torch.device) -> str | None:
        """Collective while the warm-up may still end early: `observe` on this step's share, the
        mean over its micro-batches and ranks (one host read), so every rank decides alike."""
        if not self.watching(step) or any(METRIC not in out for out in outs):
            return None
        local = torch.stack([out[METRIC].float() for out in outs]).mean().item()
        return self.observe(step, all_reduce({METRIC: local}, device)[METRIC])

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "ended_at": self.ended_at, "learned": self.learned}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """A checkpoint's state (None: one written before the warm-up could end early)."""
        if state:
            self.recent, self.ended_at, self.learned = list(state["recent"]), state["ended_at"], state["learned"]
