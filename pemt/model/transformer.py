"""Post-LayerNorm transformer layers and the stack that shares them.

Layer sharing (ALBERT style) applies one layer object through the whole depth. Cross-modal
sharing is decided one level up, by handing one stack to several transformers; each call then
passes its modality index, which selects the private parts of factorised dense layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pemt.model.factorized import Factorization, dense
from pemt.model.sparse_attention import BlockSparsity, block_sparse_attention


class TransformerLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float, modalities: int,
                 factorization: Factorization | None, sparsity: BlockSparsity | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.sparsity = sparsity
        self.query, self.key, self.value, self.attn_out = (
            dense(hidden, hidden, modalities, factorization) for _ in range(4))
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.ffn_in = dense(hidden, ffn, modalities, factorization)
        self.ffn_out = dense(ffn, hidden, modalities, factorization)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        return x.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, modality: int = 0, global_index: tuple[int, ...] = (0,)) -> torch.Tensor:
        """`global_index`: the positions of the BOS tokens (global in sparse attention)."""
        q, k, v = (self._heads(proj(x, modality)) for proj in (self.query, self.key, self.value))
        p = self.dropout.p if self.training else 0.0
        if self.sparsity is None:
            attended = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            attended = block_sparse_attention(q, k, v, list(global_index), self.sparsity, dropout_p=p)
        attended = attended.transpose(1, 2).flatten(2)
        x = self.attn_norm(x + self.dropout(self.attn_out(attended, modality)))
        inner = self.dropout(F.gelu(self.ffn_in(x, modality)))
        return self.ffn_norm(x + self.dropout(self.ffn_out(inner, modality)))


class TransformerStack(nn.Module):
    """`depth` layers, or one layer applied `depth` times when `share_layers`."""

    def __init__(self, depth: int, hidden: int, heads: int, ffn: int, dropout: float,
                 share_layers: bool, modalities: int = 1, factorization: Factorization | None = None,
                 activation_checkpointing: bool = False, sparsity: BlockSparsity | None = None) -> None:
        super().__init__()
        self.depth = depth
        self.activation_checkpointing = activation_checkpointing
        count = 1 if share_layers else depth
        self.layers = nn.ModuleList(
            TransformerLayer(hidden, heads, ffn, dropout, modalities, factorization, sparsity) for _ in range(count))

    def forward(self, x: torch.Tensor, modality: int = 0, global_index: tuple[int, ...] = (0,)) -> torch.Tensor:
        for i in range(self.depth):
            layer = self.layers[i % len(self.layers)]
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, modality, global_index, use_reentrant=False)
            else:
                x = layer(x, modality, global_index)
        return x


class SequenceEmbedding(nn.Module):
    """[BOS, x_1..x_T] per modality + learned positions (restarting per modality) + token types."""

    def __init__(self, hidden: int, max_tokens: int, modalities: int, dropout: float) -> None:
        super().__init__()
        self.bos = nn.Parameter(torch.randn(modalities, hidden) * 0.02)
        self.positions = nn.Embedding(max_tokens + 1, hidden)
        self.token_types = nn.Embedding(modalities, hidden) if modalities > 1 else None
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, *sequences: torch.Tensor) -> torch.Tensor:
        parts = []
        for m, seq in enumerate(sequences):
            bos = self.bos[m].expand(seq.shape[0], 1, -1)
            tokens = torch.cat([bos, seq], dim=1)
            tokens = tokens + self.positions.weight[: tokens.shape[1]]
            if self.token_types is not None:
                tokens = tokens + self.token_types.weight[m]
            parts.append(tokens)
        return self.dropout(self.norm(torch.cat(parts, dim=1)))
