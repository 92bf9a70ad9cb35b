"""The audio-visual backbone: clip CNNs, projections, and the transformers of one fusion mode.

- mid (default): visual and audio transformers each read [BOS, clip tokens]; the multimodal
  transformer reads both of their outputs.
- early: only the multimodal transformer, over both modalities' clip tokens.
- late: only the visual and audio transformers; modalities meet in the heads.

With `cross` sharing one transformer stack serves every transformer of the mode and a modality
index selects its private parts (with `factorized`); embeddings stay per transformer.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from pemt.model.cnn import build_cnn
from pemt.model.factorized import Factorization
from pemt.model.sparse_attention import BlockSparsity
from pemt.model.transformer import SequenceEmbedding, TransformerStack

FUSION_TRANSFORMERS = {
    "mid": ("visual", "audio", "multimodal"),
    "early": ("multimodal",),
    "late": ("visual", "audio"),
}
SHARING_MODES = {"layer", "cross", "factorized"}


def sparsity(model_cfg: DictConfig) -> BlockSparsity | None:
    """`model.attention.kind`: dense (default) or block_sparse with its pattern."""
    attention = model_cfg.get("attention") or {"kind": "dense"}
    if attention["kind"] == "dense":
        return None
    if attention["kind"] != "block_sparse":
        raise ValueError(f"model.attention.kind={attention['kind']!r}: choose dense or block_sparse")
    return BlockSparsity(int(attention["block_size"]), int(attention["local_window"]), int(attention["random_blocks"]))


def factorization(model_cfg: DictConfig) -> Factorization | None:
    if "factorized" not in model_cfg.sharing:
        return None
    return Factorization(**model_cfg.factorized)


class AVBackbone(nn.Module):
    def __init__(self, model_cfg: DictConfig, max_clips: int) -> None:
        super().__init__()
        hidden = model_cfg.hidden_size
        sharing = set(model_cfg.sharing)
        self.fusion = model_cfg.get("fusion", "mid")
        self.names = FUSION_TRANSFORMERS[self.fusion]
        checkpointing = model_cfg.get("activation_checkpointing", {})
        self.checkpoint_cnns = bool(checkpointing.get("cnns", False))

        self.visual_cnn = build_cnn(3, 3, model_cfg.visual_cnn)
        self.audio_cnn = build_cnn(2, 1, model_cfg.audio_cnn)
        self.visual_proj = nn.Sequential(nn.Linear(self.visual_cnn.out_dim, hidden), nn.LayerNorm(hidden))
        self.audio_proj = nn.Sequential(nn.Linear(self.audio_cnn.out_dim, hidden), nn.LayerNorm(hidden))
        self.embeddings = nn.ModuleDict({
            name: SequenceEmbedding(hidden, max_clips, 2 if name == "multimodal" else 1, model_cfg.dropout)
            for name in self.names
        })
        self.cross = "cross" in sharing

        def stack(modalities: int) -> TransformerStack:
            return TransformerStack(
                model_cfg.num_layers, hidden, model_cfg.num_heads, model_cfg.ffn_size, model_cfg.dropout,
                share_layers="layer" in sharing, modalities=modalities,
                factorization=factorization(model_cfg),
                activation_checkpointing=bool(checkpointing.get("transformers", False)),
                sparsity=sparsity(model_cfg),
            )

        if self.cross:
            self.transformers = nn.ModuleDict({"shared": stack(len(self.names))})
        else:
            self.transformers = nn.ModuleDict({name: stack(1) for name in self.names})

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_cnns and self.training:
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def embed_clips(self, video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, 3, F, H, W) video and (B, T, 1, M, S) audio -> (B, T, hidden) each."""
        b, t = video.shape[:2]
        visual = self.visual_proj(self._run(self.visual_cnn, video.flatten(0, 1))).view(b, t, -1)
        sound = self.audio_proj(self._run(self.audio_cnn, audio.flatten(0, 1))).view(b, t, -1)
        return visual, sound

    def transformer(self, name: str) -> TransformerStack:
        return self.transformers["shared" if self.cross else name]

    def _modality(self, name: str) -> int:
        return self.names.index(name) if self.cross else 0

    def contextualise(self, name: str, tokens: torch.Tensor) -> torch.Tensor:
        """The visual or audio transformer over [BOS, tokens] -> (B, 1 + T, hidden)."""
        return self.transformer(name)(self.embeddings[name](tokens), self._modality(name))

    def fuse(self, visual: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """The multimodal transformer over [v_BOS, v_1..T, a_BOS, a_1..T] -> (B, 2 + 2T, hidden)."""
        tokens = self.embeddings["multimodal"](visual, audio)
        bos = (0, 1 + visual.shape[1])  # each modality's BOS is global in sparse attention
        return self.transformer("multimodal")(tokens, self._modality("multimodal"), bos)
