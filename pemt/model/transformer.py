"""Post-LayerNorm transformer layers and the stack that shares them.

Layer sharing (ALBERT style) applies one layer object through the whole depth; cross-modal
sharing is decided one level up, by handing the same stack to several transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TransformerLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.ffn_in = nn.Linear(hidden, ffn)
        self.ffn_out = nn.Linear(ffn, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout.p if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        attended = attended.transpose(1, 2).reshape(batch, length, hidden)
        x = self.attn_norm(x + self.dropout(self.attn_out(attended)))
        return self.ffn_norm(x + self.dropout(self.ffn_out(self.dropout(F.gelu(self.ffn_in(x))))))


class TransformerStack(nn.Module):
    """`depth` layers, or one layer applied `depth` times when `share_layers`."""

    def __init__(self, depth: int, hidden: int, heads: int, ffn: int, dropout: float,
                 share_layers: bool) -> None:
        super().__init__()
        self.depth = depth
        count = 1 if share_layers else depth
        self.layers = nn.ModuleList(TransformerLayer(hidden, heads, ffn, dropout) for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.depth):
            x = self.layers[i % len(self.layers)](x)
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
