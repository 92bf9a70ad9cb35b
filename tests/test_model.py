"""The tiny model is the real architecture: shapes, sharing, and that it learns."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from conftest import REPO
from pemt.model.pretraining import build_pretraining_model


def _cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("pretrain", overrides=list(overrides))


def _batch(cfg: DictConfig, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    d = cfg.data
    frames = 1 + int(d.frames_per_clip / d.fps * 1000 / d.mel_hop_ms)
    video = torch.rand(batch, d.clips, 3, d.frames_per_clip, d.crop, d.crop)
    audio = torch.randn(batch, d.clips, 1, d.mel_bins, frames)
    return video, audio


def _transformer_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.backbone.transformers.parameters())


@pytest.mark.parametrize("sharing", ["[]", "[layer]", "[cross]", "[layer,cross]"])
def test_every_sharing_mode_runs_forward_and_backward(sharing: str) -> None:
    cfg = _cfg(f"model.sharing={sharing}")
    model = build_pretraining_model(cfg)
    out = model(*_batch(cfg))
    assert out["loss"].shape == ()
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters()), "every parameter is used"


def test_sharing_divides_transformer_parameters() -> None:
    none = _transformer_params(build_pretraining_model(_cfg("model.sharing=[]")))
    layer = _transformer_params(build_pretraining_model(_cfg("model.sharing=[layer]")))
    both = _transformer_params(build_pretraining_model(_cfg("model.sharing=[layer,cross]")))
    layers = _cfg().model.num_layers
    assert layer * layers == none
    assert both * 3 == layer


def test_cross_shared_stack_gets_gradient_from_every_transformer() -> None:
    cfg = _cfg("model.sharing=[layer,cross]")
    model = build_pretraining_model(cfg)
    backbone = model.backbone
    assert backbone.transformer("visual") is backbone.transformer("audio") is backbone.transformer("multimodal")
    shared = backbone.transformer("visual").layers[0].qkv.weight
    video, audio = _batch(cfg)
    grads = []
    for name in ("visual", "audio"):
        model.zero_grad()
        tokens = backbone.embed_clips(video, audio)[0 if name == "visual" else 1]
        backbone.contextualise(name, tokens).sum().backward()
        grads.append(shared.grad.clone())
    model.zero_grad()
    v, a = backbone.embed_clips(video, audio)
    backbone.fuse(backbone.contextualise("visual", v).detach(), backbone.contextualise("audio", a).detach()).sum().backward()
    grads.append(shared.grad.clone())
    assert all(g.abs().sum() > 0 for g in grads)


def test_tiny_model_overfits_a_few_pairs() -> None:
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_pretraining_model(cfg)
    video, audio = _batch(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = model(video, audio)["loss"]
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3 * first
