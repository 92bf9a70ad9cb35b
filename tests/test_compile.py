"""`train.compile`: compiled blocks compute what the eager model computes, under every feature that
changes the blocks' inputs between calls (shared layers over modalities, node pruning, block-sparse
attention, activation checkpointing), and leave parameter names as they were."""

from __future__ import annotations

import copy

import torch

from pemt.config import compose_config
from pemt.model.factory import build_pretraining_model
from pemt.train.compilation import AUTO_MIN_STEPS, check_compile, compile_blocks, compiles


def test_compiled_blocks_train_as_the_eager_model_does() -> None:
    cfg = compose_config(
        "pretrain",
        overrides=[
            "model.sharing=[layer,cross,factorized]",
            "model.attention.kind=block_sparse",
            "model.attention.block_size=2",
            "model.node_sparsity.keep_rate=0.5",
            "model.activation_checkpointing.cnns=true",  # its recomputation must not update BatchNorm twice
            "model.activation_checkpointing.transformers=true",
            "data.clips=6",
            # The pooled features' BatchNorm (on by default) divides by their small spread over these
            # 4 videos and amplifies fp32 reassociation past the bounds below, run to run; compiled
            # against eager with it is measured over 100 steps in benchmarks/results/converging.md
            "model.visual_cnn.out_norm=false",
            "model.audio_cnn.out_norm=false",
        ],
    )
    torch.manual_seed(0)
    eager = build_pretraining_model(cfg)
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled) == 3  # one shared transformer layer, two CNNs
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints and exports unchanged

    d = cfg.data
    frames = 1 + int(d.frames_per_clip / d.fps * 1000 / d.mel_hop_ms)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled)]
    for step in range(2):  # the second step runs what the first compiled, on updated weights
        torch.manual_seed(100 + step)
        video = torch.rand(4, d.clips, 3, d.frames_per_clip, d.crop, d.crop)
        audio = torch.randn(4, d.clips, 1, d.mel_bins, frames)
        losses = []
        for model in (eager, compiled):
            torch.manual_seed(step)  # the same random attention blocks: compiled draws as eager does
            out = model(video, audio, step_seed=step)
            out["loss"].backward()
            losses.append(out)
        for key in ("loss", "loss_mep_visual", "loss_mep_audio", "loss_pair"):
            torch.testing.assert_close(
                losses[1][key], losses[0][key], rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}"
            )
        # fp32 reassociation: the visual CNN's gradients move by up to ~1% of their largest entry
        # between any two kernels (eager and compiled are equally far from a float64 reference);
        # a wrong graph moves them by their own size.
        grads = {n: p.grad for n, p in compiled.named_parameters()}
        largest = max(float(p.grad.abs().max()) for p in eager.parameters())
        for name, param in eager.named_parameters():
            scale = float(param.grad.abs().max())
            if scale > 1e-6 * largest:  # not one that is zero in exact arithmetic (the keys' bias)
                error = float((grads[name] - param.grad).abs().max()) / scale
                assert error < 0.05, f"{name}: compiled gradient differs by {error:.1%} of its largest entry"
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    buffers = dict(compiled.named_buffers())
    for name, buffer in eager.named_buffers():
        torch.testing.assert_close(buffers[name], buffer, rtol=1e-3, atol=1e-4, msg=name)
    assert int(buffers["backbone.visual_cnn.stem.1.num_batches_tracked"]) == 2  # once per step, not per pass


def test_auto_compiles_runs_long_enough_to_earn_the_compilation_back() -> None:
    def compiled(*overrides: str) -> bool:
        cfg = compose_config("pretrain", overrides=list(overrides))
        check_compile(cfg)
        return compiles(cfg)

    assert not compiled()  # the embedded default: 30 steps start at once
    assert compiled(f"train.max_steps={AUTO_MIN_STEPS}")
    assert not compiled(f"train.max_steps={AUTO_MIN_STEPS}", "deepspeed=zero3")  # recompiles on every call
    assert compiled("train.compile=true") and not compiled(f"train.max_steps={AUTO_MIN_STEPS}", "train.compile=false")
