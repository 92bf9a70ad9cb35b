"""The audio-visual backbone: clip CNNs, projections, and three transformers (mid fusion).

Visual and audio transformers each read [BOS, clip tokens]; the multimodal transformer reads
both of their outputs, concatenated. With `cross` sharing, one transformer stack serves all
three, and only the embeddings stay per transformer.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from pemt.model.cnn import ResNet
from pemt.model.transformer import SequenceEmbedding, TransformerStack

TRANSFORMERS = ("visual", "audio", "multimodal")


class AVBackbone(nn.Module):
    def __init__(self, model_cfg: DictConfig, max_clips: int) -> None:
        super().__init__()
        hidden = model_cfg.hidden_size
        sharing = set(model_cfg.sharing)
        self.visual_cnn = ResNet(3, 3, model_cfg.visual_cnn.width, model_cfg.visual_cnn.stages)
        self.audio_cnn = ResNet(2, 1, model_cfg.audio_cnn.width, model_cfg.audio_cnn.stages)
        self.visual_proj = nn.Sequential(nn.Linear(self.visual_cnn.out_dim, hidden), nn.LayerNorm(hidden))
        self.audio_proj = nn.Sequential(nn.Linear(self.audio_cnn.out_dim, hidden), nn.LayerNorm(hidden))
        self.embeddings = nn.ModuleDict({
            name: SequenceEmbedding(hidden, max_clips, 2 if name == "multimodal" else 1, model_cfg.dropout)
            for name in TRANSFORMERS
        })

        def stack() -> TransformerStack:
            return TransformerStack(model_cfg.num_layers, hidden, model_cfg.num_heads,
                                    model_cfg.ffn_size, model_cfg.dropout, "layer" in sharing)

        names = ("shared",) if "cross" in sharing else TRANSFORMERS
        self.transformers = nn.ModuleDict({name: stack() for name in names})

    def transformer(self, name: str) -> TransformerStack:
        return self.transformers["shared" if "shared" in self.transformers else name]

    def embed_clips(self, video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, 3, F, H, W) video and (B, T, 1, M, S) audio -> (B, T, hidden) each."""
        b, t = video.shape[:2]
        visual = self.visual_proj(self.visual_cnn(video.flatten(0, 1))).view(b, t, -1)
        sound = self.audio_proj(self.audio_cnn(audio.flatten(0, 1))).view(b, t, -1)
        return visual, sound

    def contextualise(self, name: str, sequence: torch.Tensor) -> torch.Tensor:
        """One unimodal transformer over [BOS, tokens] -> (B, 1 + T, hidden)."""
        return self.transformer(name)(self.embeddings[name](sequence))

    def fuse(self, visual_out: torch.Tensor, audio_out: torch.Tensor) -> torch.Tensor:
        """The multimodal transformer over both unimodal outputs (their BOS dropped; fresh ones added)."""
        tokens = self.embeddings["multimodal"](visual_out[:, 1:], audio_out[:, 1:])
        return self.transformer("multimodal")(tokens)
