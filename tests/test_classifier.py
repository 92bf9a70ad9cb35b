"""The downstream classifier: each fusion routes the sequence through the transformers it names,
and what `task.freeze` (or a clip task) leaves frozen does not move in a training step."""

from __future__ import annotations

import pytest
import torch
from omegaconf import DictConfig

from pemt.config import compose_config
from pemt.downstream.models import Classifier
from pemt.train.optimizer import build_optimizer


def _cfg(*overrides: str) -> DictConfig:
    return compose_config("finetune", overrides=["model.sharing=[]", "model.dropout=0.0", *overrides])


def _classifier(cfg: DictConfig, task: str = "long_av", freeze: tuple[str, ...] = ()) -> Classifier:
    torch.manual_seed(0)
    return Classifier(cfg.model, int(cfg.data.clips), task, 5, False, list(freeze))


def _batch(cfg: DictConfig, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = cfg.data
    torch.manual_seed(1)
    frames = 1 + int(d.frames_per_clip / d.fps * 1000 / d.mel_hop_ms)
    video = torch.rand(batch, d.clips, 3, d.frames_per_clip, d.crop, d.crop)
    audio = torch.randn(batch, d.clips, 1, d.mel_bins, frames)
    return video, audio, torch.arange(batch) % 5


def _gradient_reaches(model: Classifier, prefix: str) -> bool:
    grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize(
    ("fusion", "visual", "multimodal"),
    [("early", False, True), ("mid", True, True), ("late", True, False)],
)
def test_each_fusion_runs_the_transformers_it_names(fusion: str, visual: bool, multimodal: bool) -> None:
    cfg = _cfg(f"model.fusion={fusion}")
    model = _classifier(cfg)
    video, audio, labels = _batch(cfg)
    out = model(video, audio, labels)
    assert out["scores"].shape == (4, 5) and torch.allclose(out["scores"].sum(1), torch.ones(4))
    out["loss"].backward()
    hidden = int(cfg.model.hidden_size)
    assert model.head.in_features == (2 * hidden if fusion == "late" else hidden)
    assert _gradient_reaches(model, "backbone.transformers.visual.") == visual
    assert _gradient_reaches(model, "backbone.transformers.audio.") == visual
    assert _gradient_reaches(model, "backbone.transformers.multimodal.") == multimodal
    assert _gradient_reaches(model, "head.") and _gradient_reaches(model, "clip_head.")


def _one_step(model: Classifier, cfg: DictConfig) -> dict[str, bool]:
    """Which parameters and BatchNorm statistics a training step changed, by name."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer, _ = build_optimizer(model, cfg.train)
    for group in optimizer.param_groups:
        group["lr"] = 1e-2
    model.train()
    video, audio, labels = _batch(cfg)
    model(video, audio, labels)["loss"].backward()
    optimizer.step()
    return {k: not torch.equal(v, before[k]) for k, v in model.state_dict().items() if v.is_floating_point()}


def _moved(changed: dict[str, bool], prefix: str) -> bool:
    return any(moved for name, moved in changed.items() if name.startswith(prefix))


@pytest.mark.parametrize(
    ("freeze", "cnns_move", "transformers_move"),
    [((), True, True), (("cnns",), False, True), (("transformers",), True, False), (("backbone",), False, False)],
)
def test_frozen_parts_keep_weights_and_statistics(
    freeze: tuple[str, ...], cnns_move: bool, transformers_move: bool
) -> None:
    cfg = _cfg()
    changed = _one_step(_classifier(cfg, freeze=freeze), cfg)
    for cnn in ("backbone.visual_cnn.", "backbone.audio_cnn."):
        assert _moved(changed, cnn) == cnns_move, (freeze, cnn)
    statistics = {k: v for k, v in changed.items() if k.startswith("backbone.visual_cnn.") and "running_" in k}
    assert statistics and any(statistics.values()) == cnns_move, "frozen BatchNorm keeps its statistics"
    for part in ("backbone.transformers.", "backbone.embeddings.", "backbone.visual_proj."):
        assert _moved(changed, part) == transformers_move, (freeze, part)
    assert _moved(changed, "head.") and _moved(changed, "clip_head.")


def test_visual_clip_trains_the_visual_cnn_and_its_head_only() -> None:
    cfg = _cfg()
    model = _classifier(cfg, task="visual_clip")
    video, audio, labels = _batch(cfg)
    out = model(video, audio, labels)
    assert out["scores"].shape == (4, 5), "clip scores averaged back to one row per video"
    changed = _one_step(model, cfg)
    assert _moved(changed, "backbone.visual_cnn.") and _moved(changed, "head.")
    for idle in ("backbone.audio_cnn.", "backbone.transformers.", "backbone.embeddings."):
        assert not _moved(changed, idle), idle
