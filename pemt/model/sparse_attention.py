"""Block-sparse self-attention (edge sparsity): local blocks, random blocks, global tokens.

The non-global tokens are cut into blocks of `block_size` (the last one padded). Each query
block attends to the blocks within `local_window` of it, to `random_blocks` other blocks drawn
afresh on every forward pass (shared over the batch and heads, from torch's global generator, so
the trainer's seed fixes them and activation checkpointing replays them), and to every global
token; global tokens (each transformer's BOS) attend to all tokens. Keys are gathered per query
block and multiplied there, so the work (and what torch's FLOP counter sees) grows with
tokens x keys per block, not tokens squared. When the pattern reaches every pair the layer runs
dense attention, which it then equals. `flex_block_sparse_attention` computes the same pattern with
FlexAttention (a CUDA kernel that reads keys in place; `benchmarks/sparse_attention.py --flex`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class BlockSparsity:
    block_size: int = 16
    local_window: int = 1  # blocks on each side of a query block
    random_blocks: int = 1  # other blocks per query block, drawn each forward

    def __post_init__(self) -> None:
        for name in ("block_size", "local_window", "random_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "block_size" else 0):
                raise ValueError(
                    f"model.attention.{name}={value!r}: must be a whole number >= {1 if name == 'block_size' else 0}"
                )

    def covers_all(self, tokens: int) -> bool:
        """Whether every query block reaches every block (the edge blocks see the fewest local ones)."""
        blocks = -(-tokens // self.block_size)
        return self.random_blocks >= blocks - self.local_window - 1


def key_blocks(blocks: int, spec: BlockSparsity, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, K) indices of the key blocks of each query block and a mask of the valid ones."""
    window = torch.arange(-spec.local_window, spec.local_window + 1, device=device)
    local = torch.arange(blocks, device=device)[:, None] + window  # (blocks, 2w + 1)
    local_valid = (local >= 0) & (local < blocks)
    chosen, valid = [local.clamp(0, blocks - 1)], [local_valid]
    if spec.random_blocks:
        # Random scores, local blocks pushed last: the top r are r distinct non-local blocks
        # (fewer exist near small sequences: the surplus picks are masked out).
        scores = torch.rand(blocks, blocks, device=device)
        distance = (torch.arange(blocks, device=device)[:, None] - torch.arange(blocks, device=device)).abs()
        scores = scores.masked_fill(distance <= spec.local_window, -1.0)
        r = min(spec.random_blocks, blocks)
        top = scores.topk(r, dim=1)
        chosen.append(top.indices)
        valid.append(top.values >= 0)
    return torch.cat(chosen, 1), torch.cat(valid, 1)


def _local_index(n: int, global_index: list[int], device: torch.device) -> torch.Tensor:
    """Positions of the tokens that are not global, in order: the ones cut into blocks."""
    is_global = torch.zeros(n, dtype=torch.bool, device=device)
    is_global[global_index] = True
    return (~is_global).nonzero().squeeze(1)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    global_index: list[int],
    spec: BlockSparsity,
    dropout_p: float = 0.0,
    dense_when_full: bool = True,
) -> torch.Tensor:
    """(B, H, N, D) queries, keys, values -> (B, H, N, D). `global_index`: positions of the
    global tokens (BOS of each modality). A pattern that covers every pair runs dense attention
    unless `dense_when_full` is off."""
    batch, heads, n, dim = q.shape
    device = q.device
    local_index = _local_index(n, global_index, device)
    tokens = local_index.numel()
    if dense_when_full and spec.covers_all(tokens):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    size = spec.block_size
    blocks = -(-tokens // size)
    pad = blocks * size - tokens
    g = len(global_index)

    def blocked(x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, local_index]
        return F.pad(x, (0, 0, 0, pad)).view(batch, heads, blocks, size, dim)

    qb, kb, vb = blocked(q * dim**-0.5), blocked(k), blocked(v)  # scaled once, on the smaller tensor
    index, valid = key_blocks(blocks, spec, device)  # (blocks, K)
    gathered_k = kb[:, :, index].flatten(3, 4)  # (B, H, blocks, K*size, D)
    gathered_v = vb[:, :, index].flatten(3, 4)
    global_k = k[:, :, global_index].unsqueeze(2).expand(-1, -1, blocks, -1, -1)
    global_v = v[:, :, global_index].unsqueeze(2).expand(-1, -1, blocks, -1, -1)
    keys = torch.cat([global_k, gathered_k], 3)
    values = torch.cat([global_v, gathered_v], 3)
    # Key mask: valid blocks, and within them real tokens (not the padding of the last block).
    real = torch.arange(blocks * size, device=device).view(blocks, size) < tokens
    key_ok = (valid[:, :, None] & real[index]).flatten(1)  # (blocks, K*size)
    key_ok = torch.cat([torch.ones(blocks, g, dtype=torch.bool, device=device), key_ok], 1)
    # The mask as an additive bias, added in place: no second score-sized tensor per step.
    bias = torch.zeros(key_ok.shape, dtype=qb.dtype, device=device).masked_fill_(~key_ok, float("-inf"))
    scores = (qb @ keys.transpose(-1, -2)).add_(bias[:, None, :])  # (B, H, blocks, size, g + K*size)
    weights = F.dropout(scores.softmax(-1), dropout_p) if dropout_p else scores.softmax(-1)
    local_out = (weights @ values).view(batch, heads, blocks * size, dim)[:, :, :tokens]
    # Global queries attend to everything, densely (few of them).
    global_out = F.scaled_dot_product_attention(q[:, :, global_index], k, v, dropout_p=dropout_p)
    out = torch.empty_like(q)
    out[:, :, local_index] = local_out.to(q.dtype)
    out[:, :, global_index] = global_out
    return out


def attention_pairs(tokens: int, globals_: int, spec: BlockSparsity | None) -> int:
    """Query-key pairs one attention computes (for cost tables): dense, or this pattern's."""
    n = tokens + globals_
    if spec is None or spec.covers_all(tokens):
        return n * n
    size = spec.block_size
    blocks = -(-tokens // size)
    keys = (2 * spec.local_window + 1 + min(spec.random_blocks, blocks)) * size + globals_
    return blocks * size * keys + globals_ * n


def reached_blocks(tokens: int, spec: BlockSparsity, device: torch.device) -> torch.Tensor:
    """(blocks, blocks) bool: which key blocks each query block reaches, drawn as
    `block_sparse_attention` draws them (same generator calls, so the same seed gives the same pattern)."""
    blocks = -(-tokens // spec.block_size)
    index, valid = key_blocks(blocks, spec, device)
    reach = torch.zeros(blocks, blocks, dtype=torch.bool, device=device)
    rows = torch.arange(blocks, device=device)[:, None].expand_as(index)
    reach[rows[valid], index[valid]] = True
    return reach


def flex_block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, global_index: list[int], spec: BlockSparsity
) -> torch.Tensor:
    """The same attention as `block_sparse_attention` through torch's FlexAttention: a block mask at
    the pattern's block size, so a fused kernel reads the reached keys in place instead of gathering
    them. Compiled on CUDA; elsewhere torch runs its unfused reference, which has no backward on CPU
    (torch 2.13), so this is a CUDA kernel that CPU can only check. Block sizes under 128 set the
    kernel's tiles to match (they must divide the mask's blocks; 16 is the smallest)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n, device = q.shape[2], q.device
    local_index = _local_index(n, global_index, device)
    token_block = torch.full((n,), -1, dtype=torch.long, device=device)  # -1: a global token
    token_block[local_index] = torch.arange(local_index.numel(), device=device) // spec.block_size
    reach = reached_blocks(local_index.numel(), spec, device)

    def reaches(batch: torch.Tensor, head: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        query_block, key_block = token_block[query], token_block[key]
        return (query_block < 0) | (key_block < 0) | reach[query_block.clamp(min=0), key_block.clamp(min=0)]

    size = spec.block_size
    mask = create_block_mask(reaches, None, None, n, n, device=str(device), BLOCK_SIZE=size)
    if device.type != "cuda":
        return flex_attention(q, k, v, block_mask=mask)
    tile = min(64, size & -size)  # the largest power of two dividing the block, at most 64
    options = None if size >= 128 else {f"BLOCK_{d}": tile for d in ("M", "N", "M1", "N1", "M2", "N2")}
    out: torch.Tensor = _compiled_flex_attention()(q, k, v, block_mask=mask, kernel_options=options)
    return out


@functools.cache
def _compiled_flex_attention():  # type: ignore[no-untyped-def]
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)
