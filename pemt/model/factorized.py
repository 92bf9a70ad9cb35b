"""Dense layers shared across modalities: plain, or factorised W_m = U S_m V_m.

A factorised layer maps in -> rank -> out. One side's projection is shared by every modality,
the other side's is private to each, and between them sits a private rank x rank inner matrix
(orthogonal through torch's matrix-exponential parametrisation, or free). Which side is shared
is configurable: `output` (the public fine-tuning code: private in->rank, shared rank->out with
bias) or `input` (shared in->rank, private rank->out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations


@dataclass(frozen=True)
class Factorization:
    rank: int = 128
    shared: str = "output"  # output | input: the side every modality shares
    inner: str = "orthogonal"  # orthogonal | free
    # After the first projection: "none" leaves the rank-r code as it is (the default: the pair head
    # learns and the probes match unshared transformers': benchmarks/results/
    # sharing_quality_digits_factorized.md); "rms" normalises it to unit RMS (its direction at a
    # dense layer's scale: there the pair head collapsed and few-shot probes fell 8-30 points);
    # "unit" L2-normalises it (the public code: each layer's output ~sqrt(rank) times smaller than a
    # dense layer's, crippling pretraining: factorized_normalize.md). true/false mean unit/none.
    normalize: bool | str = "none"

    def __post_init__(self) -> None:
        mode = self.normalize
        if isinstance(mode, bool):
            mode = "unit" if mode else "none"
        if mode not in ("unit", "rms", "none"):
            raise ValueError(f"factorized.normalize={self.normalize!r}: choose unit, rms or none (true: unit)")
        object.__setattr__(self, "normalize", mode)
        if self.shared not in ("output", "input"):
            raise ValueError(f"factorized.shared={self.shared!r}: choose output or input")
        if self.inner not in ("orthogonal", "free"):
            raise ValueError(f"factorized.inner={self.inner!r}: choose orthogonal or free")


class Dense(nn.Linear):
    """A plain dense layer that takes (and ignores) the modality index."""

    def forward(self, x: torch.Tensor, modality: int = 0) -> torch.Tensor:
        return super().forward(x)


class FactorizedDense(nn.Module):
    def __init__(self, in_features: int, out_features: int, modalities: int, spec: Factorization) -> None:
        super().__init__()
        self.spec = spec
        rank = spec.rank
        self.first: nn.Module
        self.last: nn.Module
        if spec.shared == "output":
            self.first = nn.ModuleList(nn.Linear(in_features, rank, bias=False) for _ in range(modalities))
            self.last = nn.Linear(rank, out_features)
        else:
            self.first = nn.Linear(in_features, rank, bias=False)
            self.last = nn.ModuleList(nn.Linear(rank, out_features) for _ in range(modalities))
        self.inner = nn.ModuleList(self._inner(rank) for _ in range(modalities))

    def _inner(self, rank: int) -> nn.Module:
        layer = nn.Linear(rank, rank, bias=False)
        if self.spec.inner == "orthogonal":
            return parametrizations.orthogonal(layer, orthogonal_map="matrix_exp")
        nn.init.eye_(layer.weight)
        return layer

    @staticmethod
    def _pick(part: nn.Module, modality: int) -> nn.Module:
        return part[modality] if isinstance(part, nn.ModuleList) else part

    def forward(self, x: torch.Tensor, modality: int = 0) -> torch.Tensor:
        hidden = self._pick(self.first, modality)(x)
        if self.spec.normalize != "none":
            hidden = F.normalize(hidden, dim=-1)
            if self.spec.normalize == "rms":
                hidden = hidden * math.sqrt(hidden.shape[-1])
        out: torch.Tensor = self._pick(self.last, modality)(self.inner[modality](hidden))
        return out


def dense(in_features: int, out_features: int, modalities: int, spec: Factorization | None) -> nn.Module:
    if spec is None:
        return Dense(in_features, out_features)
    return FactorizedDense(in_features, out_features, modalities, spec)
