"""The audio-visual backbone: clip CNNs, projections, and the transformers of one fusion mode.

- mid (default): visual and audio transformers each read [BOS, clip tokens]; the multimodal
  transformer reads both of their outputs.
- early: only the multimodal transformer, over both modalities' clip tokens.
- late: only the visual and audio transformers; modalities meet in the heads.

With `cross` sharing one transformer stack serves every transformer of the mode and a modality
index selects its private parts (with `factorized`); embeddings stay per transformer.

Long sequences: `tokens_per_clip` cells of each CNN's last feature map per clip (1, 4, 16 ...),
block-sparse attention (`attention`), and node sparsity (`node_sparsity`: visual tokens ranked
by the visual BOS in the visual transformer, by the audio BOS in the multimodal one). The three
are runtime settings (`set_sparsity`), so a curriculum can change them between stages.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from pemt.model.cnn import build_cnn, checkpoint_contexts, use_fused_batchnorm
from pemt.model.factorized import Factorization
from pemt.model.sparse_attention import BlockSparsity
from pemt.model.transformer import Pruning, SequenceEmbedding, TransformerLayer, TransformerStack

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
    def __init__(self, model_cfg: DictConfig, max_clips: int, max_tokens_per_clip: int | None = None) -> None:
        super().__init__()
        self.hidden = hidden = model_cfg.hidden_size
        self.tokens_per_clip = int(model_cfg.get("tokens_per_clip", 1))
        node = model_cfg.get("node_sparsity") or {}
        self.keep_rate = float(node.get("keep_rate", 1.0))
        self.prune_after = tuple(int(i) for i in node.get("after_layers", ()))
        sharing = set(model_cfg.sharing)
        self.fusion = model_cfg.get("fusion", "mid")
        self.names = FUSION_TRANSFORMERS[self.fusion]
        checkpointing = model_cfg.get("activation_checkpointing", {})
        self.checkpoint_cnns = bool(checkpointing.get("cnns", False))

        self.visual_cnn = build_cnn(3, 3, model_cfg.visual_cnn)
        self.audio_cnn = build_cnn(2, 1, model_cfg.audio_cnn)
        use_fused_batchnorm(self, model_cfg.get("batchnorm", "fused") == "fused")
        self.visual_proj = nn.Sequential(nn.Linear(self.visual_cnn.out_dim, hidden), nn.LayerNorm(hidden))
        self.audio_proj = nn.Sequential(nn.Linear(self.audio_cnn.out_dim, hidden), nn.LayerNorm(hidden))
        self.embeddings = nn.ModuleDict(
            {
                name: SequenceEmbedding(
                    hidden,
                    max_clips,
                    2 if name == "multimodal" else 1,
                    model_cfg.dropout,
                    max_tokens_per_clip or self.tokens_per_clip,
                )
                for name in self.names
            }
        )
        self.cross = "cross" in sharing

        def stack(modalities: int) -> TransformerStack:
            return TransformerStack(
                model_cfg.num_layers,
                hidden,
                model_cfg.num_heads,
                model_cfg.ffn_size,
                model_cfg.dropout,
                share_layers="layer" in sharing,
                modalities=modalities,
                factorization=factorization(model_cfg),
                activation_checkpointing=bool(checkpointing.get("transformers", False)),
                sparsity=sparsity(model_cfg),
            )

        if self.cross:
            self.transformers = nn.ModuleDict({"shared": stack(len(self.names))})
        else:
            self.transformers = nn.ModuleDict({name: stack(1) for name in self.names})

    def set_sparsity(self, tokens_per_clip: int, keep_rate: float, attention: BlockSparsity | None) -> None:
        """Change the sequence settings between curriculum stages; the weights are unchanged."""
        self.tokens_per_clip, self.keep_rate = tokens_per_clip, keep_rate
        for stack in self.transformers.values():
            for layer in cast(TransformerStack, stack).layers:
                cast(TransformerLayer, layer).sparsity = attention

    def _cells(self, cnn: nn.Module, clips: torch.Tensor) -> torch.Tensor:
        grid = math.isqrt(self.tokens_per_clip)
        if self.checkpoint_cnns and self.training:
            cells: torch.Tensor = checkpoint(cnn, clips, grid, use_reentrant=False, context_fn=checkpoint_contexts)
        else:
            cells = cnn(clips, grid)
        return cells

    def embed_clips(self, video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, 3, F, H, W) video and (B, T, 1, M, S) audio -> (B, T x tokens_per_clip, hidden) each."""
        b, t = video.shape[:2]
        visual = self.visual_proj(self._cells(self.visual_cnn, video.flatten(0, 1))).reshape(b, -1, self.hidden)
        sound = self.audio_proj(self._cells(self.audio_cnn, audio.flatten(0, 1))).reshape(b, -1, self.hidden)
        return visual, sound

    def _pruning(self, first: int, last: int, rank_by: int) -> Pruning:
        return Pruning(first, last, rank_by, self.keep_rate, self.prune_after)

    def transformer(self, name: str) -> TransformerStack:
        return cast(TransformerStack, self.transformers["shared" if self.cross else name])

    def _modality(self, name: str) -> int:
        return self.names.index(name) if self.cross else 0

    def contextualise(self, name: str, tokens: torch.Tensor) -> torch.Tensor:
        """The visual or audio transformer over [BOS, tokens] -> (B, 1 + T, hidden)."""
        embedded = self.embeddings[name](tokens, tokens_per_clip=self.tokens_per_clip)
        pruning = self._pruning(1, tokens.shape[1], 0) if name == "visual" else None
        contextualised: torch.Tensor = self.transformer(name)(embedded, self._modality(name), (0,), pruning)
        return contextualised

    def fuse(self, visual: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """The multimodal transformer over [v_BOS, v_1..T, a_BOS, a_1..T] -> (B, 2 + 2T, hidden)."""
        tokens = self.embeddings["multimodal"](visual, audio, tokens_per_clip=self.tokens_per_clip)
        length = visual.shape[1]
        bos = (0, 1 + length)  # each modality's BOS is global in sparse attention
        pruning = self._pruning(1, length, 1 + length)  # visual tokens, by the audio BOS
        fused: torch.Tensor = self.transformer("multimodal")(tokens, self._modality("multimodal"), bos, pruning)
        return fused
