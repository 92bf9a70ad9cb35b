"""Block-sparse attention: equal to dense when the pattern covers every pair, equal to masked
dense attention otherwise, fresh random blocks every forward, cheaper by the counted FLOPs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pemt.config import compose_config
from pemt.model.factory import build_pretraining_model
from pemt.model.sparse_attention import BlockSparsity, block_sparse_attention, flex_block_sparse_attention, key_blocks


def _qkv(n: int, batch: int = 2, heads: int = 3, dim: int = 8) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    return [torch.randn(batch, heads, n, dim, generator=generator) for _ in range(3)]


@pytest.mark.parametrize("global_index", [[0], [0, 13]])
@pytest.mark.parametrize(
    "spec",
    [
        BlockSparsity(4, local_window=10, random_blocks=0),
        BlockSparsity(4, local_window=0, random_blocks=10),
        BlockSparsity(5, local_window=1, random_blocks=3),
    ],
)
def test_full_pattern_equals_dense(spec: BlockSparsity, global_index: list[int]) -> None:
    q, k, v = _qkv(26)  # 24 or 25 tokens + BOS(es): 5 to 7 blocks, the last one padded
    assert spec.covers_all(26 - len(global_index))
    # through the gathered blocks, not the dense shortcut
    torch.testing.assert_close(
        block_sparse_attention(q, k, v, global_index, spec, dense_when_full=False),
        F.scaled_dot_product_attention(q, k, v),
    )
    assert not BlockSparsity(5, local_window=1, random_blocks=2).covers_all(25)


def _dense_mask(
    n: int, global_index: list[int], spec: BlockSparsity, index: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
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
                mask[token, local[start : start + spec.block_size]] = True
    return mask


@pytest.mark.parametrize("global_index", [[0], [0, 20]])
def test_sparse_pattern_equals_masked_dense(global_index: list[int]) -> None:
    n = 41  # 39 or 40 tokens: the last block is padded
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


@pytest.mark.parametrize(
    ("n", "global_index", "spec"),
    [(41, [0, 20], BlockSparsity(4, local_window=1, random_blocks=2)), (62, [0, 31], BlockSparsity(16, 1, 1))],
)
def test_flex_attention_computes_the_same_pattern(n: int, global_index: list[int], spec: BlockSparsity) -> None:
    """The FlexAttention kernel (CUDA's path; forward only on CPU) draws the same random blocks
    from the same seed and reaches the same keys: its output equals the gathered kernel's."""
    q, k, v = _qkv(n)
    assert not spec.covers_all(n - len(global_index))
    torch.manual_seed(11)
    gathered = block_sparse_attention(q, k, v, global_index, spec)
    torch.manual_seed(11)
    flex = flex_block_sparse_attention(q, k, v, global_index, spec)
    torch.testing.assert_close(flex, gathered)
    torch.manual_seed(12)  # another draw reaches other keys
    assert not torch.allclose(flex_block_sparse_attention(q, k, v, global_index, spec), gathered)


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
    q, k, v = _qkv(481, batch=1, heads=2, dim=32)  # 30 s x 16 tokens per clip + BOS
    spec = BlockSparsity(block_size=16, local_window=1, random_blocks=1)

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    # torch's CPU fused attention kernel is not counted: the dense reference is spelled out
    dense = flops(lambda: ((q @ k.transpose(-1, -2)) * 32**-0.5).softmax(-1) @ v)
    sparse = flops(lambda: block_sparse_attention(q, k, v, [0], spec))
    assert sparse < dense / 6, (sparse, dense)


@pytest.mark.parametrize("sharing", ["[]", "[layer,cross,factorized]"])
@pytest.mark.parametrize("fusion", ["mid", "early"])
def test_model_trains_with_sparse_attention(sharing: str, fusion: str) -> None:
    cfg = compose_config(
        "pretrain",
        overrides=[
            f"model.sharing={sharing}",
            f"model.fusion={fusion}",
            "data.clips=12",
            "model.attention.kind=block_sparse",
            "model.attention.block_size=2",
        ],
    )
    torch.manual_seed(0)
    model = build_pretraining_model(cfg)
    video = torch.rand(2, 12, 3, cfg.data.frames_per_clip, 32, 32)
    audio = torch.randn(2, 12, 1, cfg.data.mel_bins, 51)
    out = model(video, audio, step_seed=1)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    grads = [p.grad for p in model.backbone.transformers.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def _cfg(*overrides: str):
    return compose_config("pretrain", overrides=list(overrides))


def test_tokens_per_clip_are_cells_of_the_cnn_map() -> None:
    from pemt.model.backbone import AVBackbone

    cfg = _cfg("model.tokens_per_clip=4", "data.clips=3")
    torch.manual_seed(0)
    backbone = AVBackbone(cfg.model, max_clips=3).eval()
    video = torch.rand(2, 3, 3, cfg.data.frames_per_clip, 32, 32)
    audio = torch.randn(2, 3, 1, cfg.data.mel_bins, 52)
    visual, sound = backbone.embed_clips(video, audio)
    assert visual.shape == (2, 12, 64) and sound.shape == (2, 12, 64)
    # the 2 x 2 cells of an evenly divisible map average to the whole-map pool
    cells = backbone.visual_cnn(video.flatten(0, 1), 2)
    torch.testing.assert_close(cells.mean(1), backbone.visual_cnn(video.flatten(0, 1)), rtol=1e-5, atol=1e-5)
    # the tokens of clip c are tokens c*4 ... c*4+3: changing clip 1 changes those four and no other
    changed = video.clone()
    changed[:, 1] = 0.0
    moved = (backbone.embed_clips(changed, audio)[0] - visual).abs().amax(-1)  # (batch, 12 tokens)
    assert (moved[:, 4:8] > 1e-4).all(), moved
    assert moved[:, :4].max() < 1e-6 and moved[:, 8:].max() < 1e-6, moved
    out = backbone.contextualise("visual", visual)
    assert out.shape == (2, 13, 64)  # one BOS and the 12 tokens


def _stack(depth: int = 2):
    from pemt.model.transformer import TransformerStack

    torch.manual_seed(0)
    return TransformerStack(depth, 16, 2, 32, 0.0, share_layers=False).eval()


def test_node_sparsity_keeps_the_top_tokens_by_bos_attention() -> None:
    from pemt.model.transformer import Pruning

    stack = _stack()
    x = torch.randn(2, 11, 16)  # BOS + 10 candidate tokens
    pruning = Pruning(first=1, last=10, rank_by=0, keep_rate=0.6, after_layers=(1,))
    out = stack(x, 0, (0,), pruning)
    after_first, ranking = stack.layers[0](x, 0, (0,), rank_by=0)
    kept = ranking[:, 1:].topk(6, dim=1).indices.sort(1).values + 1
    for b in range(2):
        dropped = sorted(set(range(1, 11)) - set(kept[b].tolist()))
        # dropped tokens keep the value they had when dropped
        torch.testing.assert_close(out[b, dropped], after_first[b, dropped])
        # the rest went on through layer 2 together, in their original order
        rows = [0, *kept[b].tolist()]
        expected, _ = stack.layers[1](after_first[b : b + 1, rows], 0, (0,))
        torch.testing.assert_close(out[b, rows], expected[0])
    # keep_rate 1 is the plain stack
    whole = Pruning(1, 10, 0, 1.0, (1,))
    torch.testing.assert_close(stack(x, 0, (0,), whole), stack(x))


def test_multimodal_node_sparsity_ranks_visual_tokens_by_the_audio_bos() -> None:
    from pemt.model.transformer import Pruning

    stack = _stack()
    x = torch.randn(1, 12, 16)  # [v_BOS, v1..v5, a_BOS, a1..a5]
    out = stack(x, 0, (0, 6), Pruning(first=1, last=5, rank_by=6, keep_rate=0.4, after_layers=(1,)))
    after_first, ranking = stack.layers[0](x, 0, (0, 6), rank_by=6)
    kept = sorted((ranking[0, 1:6].topk(2).indices + 1).tolist())
    rows = [0, *kept, *range(6, 12)]
    expected, _ = stack.layers[1](after_first[:, rows], 0, (0, 3))  # the audio BOS moved to row 3
    torch.testing.assert_close(out[0, rows], expected[0])


def test_curriculum_stages_and_their_errors() -> None:
    from pemt.config import ConfigError
    from pemt.curriculum import largest, stage_at, stages

    cfg = _cfg("curriculum=expand", "train.max_steps=40")
    found = stages(cfg)
    assert [(s.start, s.clips, s.tokens_per_clip, s.keep_rate) for s in found] == [
        (0, 4, 1, 1.0),
        (10, 8, 4, 0.7),
        (20, 8, 16, 0.6),
    ]
    assert found[1].sparsity().block_size == 8 and found[0].sparsity() is None
    assert [stage_at(found, step).index for step in (0, 9, 10, 19, 20, 39)] == [0, 0, 1, 1, 2, 2]
    assert largest(cfg) == (8, 16)
    for stage, message in (
        ("{steps:5,tokens_per_clip:3}", r"curriculum.stages\[0\].tokens_per_clip=3: must be a square"),
        ("{steps:0}", r"curriculum.stages\[0\].steps=0"),
        ("{steps:5,frames:2}", r"unknown key\(s\) \['frames'\]"),
        ("{steps:5,keep_rate:0}", r"keep_rate=0.0: must be in \(0, 1\]"),
    ):
        with pytest.raises(ConfigError, match=message):
            stages(_cfg(f"curriculum.stages=[{stage}]"))


@pytest.mark.slow
def test_curriculum_moves_through_stages_resumes_into_the_right_one_and_fine_tunes_from_the_last(
    tmp_path, data_cache
) -> None:
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from conftest import SMALL_DATA, describe, run_launch, run_pretrain

    stages = (
        "curriculum.stages=[{steps:2,clips:2},{steps:2,clips:4,tokens_per_clip:4,keep_rate:0.5,"
        "attention:{kind:block_sparse,block_size:4}},"
        "{steps:1,tokens_per_clip:4,attention:{kind:block_sparse,block_size:4,random_blocks:0}}]"
    )
    common = ["gpus_per_node=1", stages, "train.log_every=1", "train.checkpoint_every=1", "mlflow.system_metrics=false"]
    first = run_pretrain(tmp_path, data_cache, *common, "train.max_steps=3")
    assert first.returncode == 0, describe(first)
    assert "curriculum stage 1 from step 2: 4 clips x 4 tokens, keep 0.5, block_sparse" in first.stderr
    # counted in the CNN warm-up (its first step here), again where it ends, and for the new stage
    assert first.stderr.count("GFLOP per sample") == 3, "FLOPs are counted again for the new stage"
    second = run_pretrain(tmp_path, data_cache, *common, "train.max_steps=5")
    assert second.returncode == 0, describe(second)
    assert "resumed from" in second.stderr and "curriculum stage 1 from step 2" in second.stderr, (
        "a resumed run re-enters the stage its checkpoint was in"
    )
    assert "curriculum stage 2 from step 4" in second.stderr

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("pemt-pretrain").experiment_id])
    stage = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "stage"))
    assert stage == [(1, 0.0), (3, 1.0), (4, 1.0), (5, 2.0)], stage
    tokens = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "visual_tokens_per_s")}
    samples = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "samples_per_s")}
    assert tokens[1] == pytest.approx(2 * samples[1]) and tokens[5] == pytest.approx(16 * samples[5])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3, 4, 5]

    # Its export loads strictly with the documented call (position tables of the largest stage).
    from pemt.model.factory import load_exported
    from pemt.train.export import export_run

    run_dir = Path(run.data.tags["pemt.run_dir"])
    weights, _ = export_run(run_dir, tmp_path / "export" / "model.safetensors")
    model, config = load_exported(weights)
    assert model.backbone.embeddings["visual"].positions.num_embeddings == 5 and config.train.max_steps == 5

    # Fine-tuning starts from the sequence the curriculum ended with: its tokens and sparsity.
    tuned = run_launch(
        "finetune.py",
        tmp_path,
        data_cache,
        *SMALL_DATA,
        "gpus_per_node=1",
        f"task.init='{run_dir}'",
        "train.max_steps=2",
        "eval.synthetic_videos=4",
        "mlflow.system_metrics=false",
    )
    assert tuned.returncode == 0, describe(tuned)
    [finetuned] = client.search_runs([client.get_experiment_by_name("pemt-finetune").experiment_id])
    params = finetuned.data.params
    assert (params["model.tokens_per_clip"], params["model.attention.kind"]) == ("4", "block_sparse")
    assert params["model.attention.random_blocks"] == "0" and params["model.node_sparsity.keep_rate"] == "1.0"
    assert finetuned.data.metrics["test_samples"] == 4
