"""Block-sparse attention: equal to dense when the pattern covers every pair, equal to masked
dense attention otherwise, fresh random blocks every forward, cheaper by the counted FLOPs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO
from pemt.model.pretraining import build_pretraining_model
from pemt.model.sparse_attention import BlockSparsity, block_sparse_attention, key_blocks


def _qkv(n: int, batch: int = 2, heads: int = 3, dim: int = 8) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    return [torch.randn(batch, heads, n, dim, generator=generator) for _ in range(3)]


@pytest.mark.parametrize("global_index", [[0], [0, 13]])
@pytest.mark.parametrize("spec", [BlockSparsity(4, local_window=10, random_blocks=0),
                                  BlockSparsity(4, local_window=0, random_blocks=10),
                                  BlockSparsity(5, local_window=1, random_blocks=3)])
def test_full_pattern_equals_dense(spec: BlockSparsity, global_index: list[int]) -> None:
    q, k, v = _qkv(26)   # 24 or 25 tokens + BOS(es): 5 to 7 blocks, the last one padded
    assert spec.covers_all(26 - len(global_index))
    # through the gathered blocks, not the dense shortcut
    torch.testing.assert_close(block_sparse_attention(q, k, v, global_index, spec, dense_when_full=False),
                               F.scaled_dot_product_attention(q, k, v))
    assert not BlockSparsity(5, local_window=1, random_blocks=2).covers_all(25)


def _dense_mask(n: int, global_index: list[int], spec: BlockSparsity, index: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
    """The same pattern as an explicit boolean mask over the whole sequence."""
    local = [i for i in range(n) if i not in global_index]
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[global_index, :] = True
    mask[:, global_index] = True
    for position, token in enumerate(local):
        block = position // spec.block_size
        for key_block, ok in zip(index[block].tolist(), valid[block].tolist()):
            if ok:
                start = key_block * spec.block_size
                mask[token, local[start:start + spec.block_size]] = True
    return mask


@pytest.mark.parametrize("global_index", [[0], [0, 20]])
def test_sparse_pattern_equals_masked_dense(global_index: list[int]) -> None:
    n = 41                                     # 39 or 40 tokens: the last block is padded
    spec = BlockSparsity(block_size=4, local_window=1, random_blocks=2)
    q, k, v = _qkv(n)
    tokens = n - len(global_index)
    assert not spec.covers_all(tokens)
    torch.manual_seed(7)
    index, valid = key_blocks(-(-tokens // 4), spec, torch.device("cpu"))
    torch.manual_seed(7)
    sparse = block_sparse_attention(q, k, v, global_index, spec)
    mask = _dense_mask(n, global_index, spec, index, valid)
    assert 0.2 < mask.float().mean() < 0.6, "the pattern is really sparse"
    torch.testing.assert_close(sparse, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_random_blocks_are_fresh_each_forward_and_seedable() -> None:
    spec = BlockSparsity(block_size=4, local_window=0, random_blocks=2)
    torch.manual_seed(0)
    first, second = key_blocks(16, spec, torch.device("cpu"))[0], key_blocks(16, spec, torch.device("cpu"))[0]
    torch.manual_seed(0)
    again = key_blocks(16, spec, torch.device("cpu"))[0]
    assert torch.equal(first, again) and not torch.equal(first, second)
    random_part = first[:, 1:]
    assert (random_part != first[:, :1]).all(), "random blocks are other than the local one"
    assert (random_part[:, 0] != random_part[:, 1]).all(), "and distinct"


def test_counted_flops_fall_with_sparsity() -> None:
    q, k, v = _qkv(481, batch=1, heads=2, dim=32)   # 30 s x 16 tokens per clip + BOS
    spec = BlockSparsity(block_size=16, local_window=1, random_blocks=1)

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    # torch's CPU fused attention kernel is not counted: the dense reference is spelled out
    dense = flops(lambda: ((q @ k.transpose(-1, -2)) * 32 ** -0.5).softmax(-1) @ v)
    sparse = flops(lambda: block_sparse_attention(q, k, v, [0], spec))
    assert sparse < dense / 6, (sparse, dense)


@pytest.mark.parametrize("sharing", ["[]", "[layer,cross,factorized]"])
@pytest.mark.parametrize("fusion", ["mid", "early"])
def test_model_trains_with_sparse_attention(sharing: str, fusion: str) -> None:
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("pretrain", overrides=[f"model.sharing={sharing}", f"model.fusion={fusion}", "data.clips=12",
                                             "model.attention.kind=block_sparse", "model.attention.block_size=2"])
    torch.manual_seed(0)
    model = build_pretraining_model(cfg)
    video = torch.rand(2, 12, 3, cfg.data.frames_per_clip, 32, 32)
    audio = torch.randn(2, 12, 1, cfg.data.mel_bins, 51)
    out = model(video, audio, step_seed=1)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    grads = [p.grad for p in model.backbone.transformers.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
