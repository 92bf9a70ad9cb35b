"""Gradient accumulation draws from the whole step's batch: each micro-step's MEP negatives, pair
partners and InfoNCE negatives are those one batch of the step's size would have."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from pemt.config import compose_config
from pemt.model.cnn import kept_batchnorm_statistics
from pemt.model.collectives import micro_step, micro_steps
from pemt.model.factory import build_pretraining_model

BATCH, MICRO_STEPS = 8, 2


def _model(*overrides: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    cfg = compose_config("pretrain", overrides=["loss.cnn_warmup_steps=0", *overrides])
    torch.manual_seed(0)
    model = build_pretraining_model(cfg)
    # BatchNorm from its running statistics and no dropout: nothing else depends on the batch's size
    model.eval()
    d = cfg.data
    frames = 1 + int(d.frames_per_clip / d.fps * 1000 / d.mel_hop_ms)
    video = torch.rand(BATCH, d.clips, 3, d.frames_per_clip, d.crop, d.crop)
    audio = torch.randn(BATCH, d.clips, 1, d.mel_bins, frames)
    return model, video, audio


def _accumulated(model: nn.Module, video: torch.Tensor, audio: torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
    """Each micro-step's output, its loss backpropagated over MICRO_STEPS as DeepSpeed does."""
    parts = list(zip(video.chunk(MICRO_STEPS), audio.chunk(MICRO_STEPS)))
    with micro_steps(MICRO_STEPS):
        with torch.no_grad():
            for i, (v, a) in enumerate(parts):
                with micro_step(i, replay=False):
                    model(v, a, step_seed=5)
        for i, (v, a) in enumerate(parts):
            with micro_step(i, replay=True):
                out = model(v, a, step_seed=5)
            (out["loss"] / MICRO_STEPS).backward()
            yield out


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_micro_steps_compute_the_losses_of_the_whole_batch() -> None:
    model, video, audio = _model()
    whole = model(video, audio, step_seed=5)
    outs = list(_accumulated(model, video, audio))
    for key in ("loss", "loss_mep_visual", "loss_mep_audio", "loss_pair", "loss_contrastive"):
        mean = sum(out[key] for out in outs) / MICRO_STEPS  # the halves mask as many clips (checked below)
        assert torch.allclose(mean, whole[key], rtol=1e-4, atol=1e-5), key
    # what one micro-batch alone computes is another objective: fewer, easier negatives
    alone = model(video[: BATCH // MICRO_STEPS], audio[: BATCH // MICRO_STEPS], step_seed=5)
    assert not torch.allclose(alone["loss_contrastive"], whole["loss_contrastive"], rtol=1e-2)


def test_accumulated_infonce_steps_as_the_whole_batch_does() -> None:
    """Its gradient is the whole batch's too: each micro-step computes it in full, reaching its own
    rows, and the micro-steps' gradients are averaged."""
    model, video, audio = _model("loss.mep_weight=0", "loss.pair_weight=0")
    model(video, audio, step_seed=5)["loss"].backward()
    whole = _grads(model)
    model.zero_grad()
    for _ in _accumulated(model, video, audio):
        pass
    accumulated = _grads(model)
    assert whole.keys() == accumulated.keys() and whole
    for name, grad in whole.items():
        assert torch.allclose(accumulated[name], grad, rtol=1e-4, atol=1e-7), name


def test_the_recording_pass_leaves_batchnorm_statistics_as_they_were() -> None:
    model, video, audio = _model()
    model.train()
    before = [b.clone() for b in model.buffers()]
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(kept_batchnorm_statistics(model))
        model(video, audio, step_seed=5)
        assert any(not torch.equal(a, b) for a, b in zip(before, model.buffers())), "the pass moved them"
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
