"""The pretraining model: backbone + heads, returning its losses from one forward pass."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from pemt.model.backbone import AVBackbone
from pemt.model.objectives import info_nce, mismatch_mask, pair_loss


class AVPretrainingModel(nn.Module):
    def __init__(self, model_cfg: DictConfig, data_cfg: DictConfig, loss_cfg: DictConfig) -> None:
        super().__init__()
        self.backbone = AVBackbone(model_cfg, max_clips=data_cfg.clips)
        self.pair_head = nn.Linear(model_cfg.hidden_size, 1)
        self.temperature = float(loss_cfg.temperature)
        self.contrastive_weight = float(loss_cfg.contrastive_weight)
        self.pair_weight = float(loss_cfg.pair_weight)

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> dict[str, torch.Tensor]:
        backbone = self.backbone
        visual_tokens, audio_tokens = backbone.embed_clips(video, audio)
        visual_out = backbone.contextualise("visual", visual_tokens)
        audio_out = backbone.contextualise("audio", audio_tokens)
        contrastive = info_nce(visual_out[:, 0], audio_out[:, 0], self.temperature)

        mismatched = mismatch_mask(video.shape[0], video.device)
        paired_audio = torch.where(mismatched[:, None, None], audio_out.roll(1, dims=0), audio_out)
        fused = backbone.fuse(visual_out, paired_audio)
        pair, pair_accuracy = pair_loss(self.pair_head(fused[:, 0]).squeeze(-1), mismatched)

        loss = self.contrastive_weight * contrastive + self.pair_weight * pair
        return {"loss": loss, "loss_contrastive": contrastive.detach(), "loss_pair": pair.detach(),
                "pair_accuracy": pair_accuracy.detach()}


def build_pretraining_model(cfg: DictConfig) -> AVPretrainingModel:
    return AVPretrainingModel(cfg.model, cfg.data, cfg.loss)
