"""Post-LayerNorm transformer layers and the stack that shares them.

Layer sharing (ALBERT style) applies one layer object through the whole depth. Cross-modal
sharing is decided one level up, by handing one stack to several transformers; each call then
passes its modality index, which selects the private parts of factorised dense layers.

Node sparsity: after chosen layers the stack keeps only the top fraction of a set of candidate
tokens (the visual ones), ranked by one BOS token's attention to them (mean over heads), in
their original order; their positions were added at embedding, so they carry them. A dropped
token leaves the computation and keeps the value it had, so the output has every position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pemt.model.factorized import Factorization, dense
from pemt.model.sparse_attention import BlockSparsity, block_sparse_attention


class TransformerLayer(nn.Module):
    def __init__(
        self,
        hidden: int,
        heads: int,
        ffn: int,
        dropout: float,
        modalities: int,
        factorization: Factorization | None,
        sparsity: BlockSparsity | None = None,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.sparsity = sparsity
        self.query, self.key, self.value, self.attn_out = (
            dense(hidden, hidden, modalities, factorization) for _ in range(4)
        )
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.ffn_in = dense(hidden, ffn, modalities, factorization)
        self.ffn_out = dense(ffn, hidden, modalities, factorization)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        return x.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, modality: int = 0, global_index: tuple[int, ...] = (0,), rank_by: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's output and, given `rank_by`, that token's attention to every token (B, N),
        averaged over heads. `global_index`: the BOS positions (global in sparse attention)."""
        q, k, v = (self._heads(proj(x, modality)) for proj in (self.query, self.key, self.value))
        ranking = None
        if rank_by is not None:
            logits = q[:, :, rank_by : rank_by + 1] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            ranking = logits.softmax(-1).mean(1).squeeze(1).detach()
        p = self.dropout.p if self.training else 0.0
        if self.sparsity is None:
            attended = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            attended = block_sparse_attention(q, k, v, list(global_index), self.sparsity, dropout_p=p)
        attended = attended.transpose(1, 2).flatten(2)
        x = self.attn_norm(x + self.dropout(self.attn_out(attended, modality)))
        inner = self.dropout(F.gelu(self.ffn_in(x, modality)))
        return self.ffn_norm(x + self.dropout(self.ffn_out(inner, modality))), ranking


@dataclass(frozen=True)
class Pruning:
    """Which tokens node sparsity may drop (`first` to `last`, inclusive), ranked by which token,
    keeping `keep_rate` of the candidates after each of `after_layers` (1-based)."""

    first: int
    last: int
    rank_by: int
    keep_rate: float
    after_layers: tuple[int, ...]


class TransformerStack(nn.Module):
    """`depth` layers, or one layer applied `depth` times when `share_layers`."""

    def __init__(
        self,
        depth: int,
        hidden: int,
        heads: int,
        ffn: int,
        dropout: float,
        share_layers: bool,
        modalities: int = 1,
        factorization: Factorization | None = None,
        activation_checkpointing: bool = False,
        sparsity: BlockSparsity | None = None,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.activation_checkpointing = activation_checkpointing
        count = 1 if share_layers else depth
        self.layers = nn.ModuleList(
            TransformerLayer(hidden, heads, ffn, dropout, modalities, factorization, sparsity) for _ in range(count)
        )

    def forward(
        self, x: torch.Tensor, modality: int = 0, global_index: tuple[int, ...] = (0,), pruning: Pruning | None = None
    ) -> torch.Tensor:
        if pruning is not None and (pruning.keep_rate >= 1.0 or not pruning.after_layers):
            pruning = None
        batch, length, hidden = x.shape
        alive = torch.arange(length, device=x.device).expand(batch, -1)  # original position of each row
        result = torch.zeros_like(x) if pruning else None
        for i in range(self.depth):
            layer = self.layers[i % len(self.layers)]
            prune_here = pruning is not None and i + 1 in pruning.after_layers
            rank_by = int((alive[0] == pruning.rank_by).nonzero()) if prune_here and pruning else None
            if self.activation_checkpointing and self.training:
                x, ranking = checkpoint(layer, x, modality, global_index, rank_by, use_reentrant=False)
            else:
                x, ranking = layer(x, modality, global_index, rank_by)
            if prune_here and pruning and result is not None:
                x, alive, result, global_index = _prune(x, alive, result, ranking, pruning, global_index)
        if result is None:
            return x
        return result.scatter(1, alive[..., None].expand(-1, -1, hidden), x)


def _prune(
    x: torch.Tensor,
    alive: torch.Tensor,
    result: torch.Tensor,
    ranking: torch.Tensor,
    pruning: Pruning,
    global_index: tuple[int, ...],
) -> tuple[Any, ...]:
    """Keep the top candidates by `ranking` and every other token, in order; dropped rows go to
    `result` at their original positions. Every sample keeps the same count, so the BOS rows
    move to the same places in all of them."""
    hidden = x.shape[-1]
    candidate = (alive >= pruning.first) & (alive <= pruning.last)  # same in every row
    count = int(candidate[0].sum())
    keep = max(1, math.ceil(pruning.keep_rate * count))
    if keep >= count:
        return x, alive, result, global_index
    score = ranking.masked_fill(~candidate, float("-inf"))
    top = score.topk(keep, dim=1).indices
    kept = ~candidate
    kept = kept.scatter(1, top, True)
    dropped_rows = (~kept).nonzero()[:, 1].view(x.shape[0], -1)
    kept_rows = kept.nonzero()[:, 1].view(x.shape[0], -1)  # ascending: original order
    expand = (-1, -1, hidden)
    result = result.scatter(
        1,
        alive.gather(1, dropped_rows)[..., None].expand(*expand),
        x.gather(1, dropped_rows[..., None].expand(*expand)),
    )
    new_alive = alive.gather(1, kept_rows)
    new_globals = tuple(int((new_alive[0] == alive[0, g]).nonzero()) for g in global_index)
    return x.gather(1, kept_rows[..., None].expand(*expand)), new_alive, result, new_globals


class SequenceEmbedding(nn.Module):
    """[BOS, x_1..x_T] per modality + learned positions (restarting per modality) + token types.

    With several tokens per clip (`max_tokens_per_clip` > 1) a token's position is its clip's
    plus its cell's within the clip, so a run can change tokens per clip between stages.
    """

    def __init__(
        self, hidden: int, max_clips: int, modalities: int, dropout: float, max_tokens_per_clip: int = 1
    ) -> None:
        super().__init__()
        self.bos = nn.Parameter(torch.randn(modalities, hidden) * 0.02)
        self.positions = nn.Embedding(max_clips + 1, hidden)
        self.cells = nn.Embedding(max_tokens_per_clip, hidden) if max_tokens_per_clip > 1 else None
        self.token_types = nn.Embedding(modalities, hidden) if modalities > 1 else None
        # BERT's N(0, 0.02): at torch's N(0, 1) each table is as large as the content it is added
        # to, and the LayerNorm after them leaves the content a third of the multimodal input
        for table in (self.positions, self.cells, self.token_types):
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, *sequences: torch.Tensor, tokens_per_clip: int = 1) -> torch.Tensor:
        parts = []
        for m, seq in enumerate(sequences):
            bos = self.bos[m].expand(seq.shape[0], 1, -1)
            tokens = torch.cat([bos, seq], dim=1)
            index = torch.arange(seq.shape[1], device=seq.device)
            clip = torch.cat([index.new_zeros(1), index // tokens_per_clip + 1])
            tokens = tokens + self.positions(clip)
            if self.cells is not None:
                tokens = tokens + self.cells(torch.cat([index.new_zeros(1), index % tokens_per_clip]))
            if self.token_types is not None:
                tokens = tokens + self.token_types.weight[m]
            parts.append(tokens)
        embedded: torch.Tensor = self.dropout(self.norm(torch.cat(parts, dim=1)))
        return embedded
