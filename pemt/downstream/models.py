"""Classifiers on the pretrained backbone, one per downstream protocol.

- `visual_clip` (UCF-101): the visual CNN and a linear head, trained on single clips (every clip
  of a video carries its label); a video's score is the mean softmax over its clips.
- `audio_linear` (ESC-50): the audio CNN frozen, a linear head on its pooled features, scored
  per clip and averaged likewise.
- `long_av` (Charades, Kinetics-Sounds): CNNs and transformers over the whole clip sequence; a
  head on the fused sequence output plus, as in the public fine-tuning code, one on the mean of
  the projected clip embeddings; their losses are summed and their probabilities too.

`freeze` lists what does not train: `cnns`, `transformers`, or `backbone` (everything but the
heads: a linear probe). Frozen parts also keep their BatchNorm statistics.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from pemt.model.backbone import AVBackbone

TASKS = ("visual_clip", "audio_linear", "long_av")
FREEZABLE = ("cnns", "transformers", "backbone")


class Classifier(nn.Module):
    def __init__(
        self,
        model_cfg: DictConfig,
        max_clips: int,
        task: str,
        classes: int,
        multi_label: bool,
        freeze: list[str],
        loss: str = "cross_entropy",
        max_tokens_per_clip: int | None = None,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task.name={task!r}: choose one of {', '.join(TASKS)}")
        self.task, self.classes, self.multi_label, self.loss_name = task, classes, multi_label, loss
        self.backbone = AVBackbone(model_cfg, max_clips, max_tokens_per_clip)
        hidden = int(model_cfg.hidden_size)
        if task == "visual_clip":
            self.head = nn.Linear(self.backbone.visual_cnn.out_dim, classes)
        elif task == "audio_linear":
            self.head = nn.Linear(self.backbone.audio_cnn.out_dim, classes)
        else:
            fused = 2 * hidden if self.backbone.fusion == "late" else hidden
            self.head = nn.Linear(fused, classes)
            self.clip_head = nn.Linear(hidden, classes)
        self.frozen = self._frozen_modules(freeze)
        for module in self.frozen:
            module.requires_grad_(False)
        self.train()  # modules start in training mode: put the frozen ones in eval now

    def _frozen_modules(self, freeze: list[str]) -> list[nn.Module]:
        unknown = set(freeze) - set(FREEZABLE)
        if unknown:
            raise ValueError(
                f"task.freeze={list(freeze)}: unknown {sorted(unknown)}; use any of {', '.join(FREEZABLE)}"
            )
        b = self.backbone
        used = {"visual_clip": [b.visual_cnn], "audio_linear": [b.audio_cnn]}.get(self.task)
        if used is not None:  # the parts a clip task never runs are frozen so no optimizer holds them
            frozen = [m for m in b.children() if all(m is not u for u in used)]
            if self.task == "audio_linear" or {"cnns", "backbone"} & set(freeze):
                frozen += used
            return frozen
        cnns = [b.visual_cnn, b.audio_cnn]
        transformers = [b.visual_proj, b.audio_proj, b.embeddings, b.transformers]
        frozen = []
        if {"cnns", "backbone"} & set(freeze):
            frozen += cnns
        if {"transformers", "backbone"} & set(freeze):
            frozen += transformers
        return frozen

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        for module in self.frozen:  # frozen parts keep their statistics and run without dropout
            module.eval()
        return self

    def forward(
        self, video: torch.Tensor, audio: torch.Tensor, targets: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Video-level probabilities ("scores", B x classes) and, given targets, the loss."""
        b, t = video.shape[:2]
        if self.task == "long_av":
            visual, sound = self.backbone.embed_clips(video, audio)
            logits = [self.head(self._sequence(visual, sound)), self.clip_head((visual + sound).mean(1) / 2)]
            per_video = True
        else:
            cnn = self.backbone.visual_cnn if self.task == "visual_clip" else self.backbone.audio_cnn
            clips = (video if self.task == "visual_clip" else audio).flatten(0, 1)
            logits = [self.head(cnn(clips))]
            per_video = False
        scores = cast(torch.Tensor, sum(self._probabilities(x) for x in logits)) / len(logits)
        if not per_video:
            scores = scores.view(b, t, -1).mean(1)
        out = {"scores": scores.detach()}
        if targets is not None:
            if not per_video:
                targets = targets.repeat_interleave(t, dim=0)
            out["loss"] = cast(torch.Tensor, sum(self._loss(x, targets) for x in logits))
        return out

    def _sequence(self, visual: torch.Tensor, sound: torch.Tensor) -> torch.Tensor:
        backbone = self.backbone
        if backbone.fusion == "early":
            return backbone.fuse(visual, sound)[:, 0]
        visual_out = backbone.contextualise("visual", visual)
        audio_out = backbone.contextualise("audio", sound)
        if backbone.fusion == "late":
            return torch.cat([visual_out[:, 0], audio_out[:, 0]], dim=-1)
        return backbone.fuse(visual_out[:, 1:], audio_out[:, 1:])[:, 0]

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float()) if self.multi_label else logits.float().softmax(-1)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits.float(), targets.float())
        if self.loss_name == "multi_margin":  # the public ESC-50 protocol
            return F.multi_margin_loss(logits.float(), targets)
        return F.cross_entropy(logits.float(), targets)
