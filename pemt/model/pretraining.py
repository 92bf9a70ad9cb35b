"""The pretraining model: backbone + heads, returning its losses from one forward pass.

Objectives (weights in `loss.*`):
- masked embedding prediction: a fraction of each modality's clip embeddings is replaced by a
  learned mask token; the transformer output at each masked position must pick out the
  original embedding among negatives drawn from the global batch (content-aware or uniform);
- correct pair prediction: every second sample of the global batch gets the previous sample's
  audio; a binary head on the fused output says whether audio and video belong together;
- optional audio-visual InfoNCE between the pooled outputs (off by default, not in the paper).
"""

from __future__ import annotations

import math
from typing import cast

import torch
from omegaconf import DictConfig
from torch import nn

from pemt.model.backbone import AVBackbone
from pemt.model.collectives import gather_rows, global_rows, reaching_every_micro_step, sum_over_ranks
from pemt.model.objectives import generator, info_nce, masked_embedding_loss, mismatch_mask, pair_loss, random_mask

MODALITIES = ("visual", "audio")


class AVPretrainingModel(nn.Module):
    def __init__(
        self,
        model_cfg: DictConfig,
        data_cfg: DictConfig,
        loss_cfg: DictConfig,
        max_clips: int | None = None,
        max_tokens_per_clip: int | None = None,
        cnn_warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        self.cnn_warmup_steps = cnn_warmup_steps
        hidden = model_cfg.hidden_size
        self.backbone = AVBackbone(model_cfg, max_clips or data_cfg.clips, max_tokens_per_clip)
        self.fusion = self.backbone.fusion
        self.mask_tokens = nn.Parameter(torch.randn(len(MODALITIES), hidden) * 0.02)
        # MEP on the multimodal transformer's outputs too (mid fusion: the only place a masked clip
        # can be told from the other modality at the same time)
        self.mep_fused = bool(loss_cfg.get("mep_fused", False)) and self.fusion == "mid"
        targets = [*MODALITIES, *(f"fused_{m}" for m in MODALITIES if self.mep_fused)]
        self.mep_heads = nn.ModuleDict({t: nn.Linear(hidden, hidden) for t in targets})
        self.pair_kind = str(loss_cfg.get("pair_head", "bos"))
        if self.pair_kind == "agreement":
            self.pair_head: nn.Module = PairAgreement(hidden)
        else:
            self.pair_head = nn.Linear(2 * hidden if self.fusion == "late" else hidden, 1)
        self.loss_cfg = loss_cfg

    def _mask(self, tokens: torch.Tensor, index: int, first: int, step_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, _ = tokens.shape
        if not self.loss_cfg.mep_weight:
            return tokens, torch.zeros(batch, length, dtype=torch.bool, device=tokens.device)
        generators = [generator(step_seed, 0, index, first + b) for b in range(batch)]
        mask = random_mask(batch, length, float(self.loss_cfg.mask_ratio), tokens.device, generators)
        return torch.where(mask[..., None], self.mask_tokens[index].to(tokens.dtype), tokens), mask

    @staticmethod
    def _pair(audio: torch.Tensor, mismatched: torch.Tensor, first: int) -> torch.Tensor:
        """Each mismatched sample takes the audio of the previous sample of the global batch."""
        everyone, _ = gather_rows(audio)
        previous = everyone[torch.arange(first, first + len(audio), device=audio.device).clamp_min(1) - 1]
        return torch.where(mismatched[:, None, None], previous, audio)

    def _contextual(
        self, visual: torch.Tensor, audio: torch.Tensor, mismatched: torch.Tensor, first: int
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per-position outputs for each modality (B, T, H), and the visual and the audio BOS
        the pair head reads: the multimodal transformer's (late fusion: each modality's own)."""
        backbone = self.backbone
        length = visual.shape[1]
        if self.fusion == "early":
            fused = backbone.fuse(visual, self._pair(audio, mismatched, first))
            outputs = {"visual": fused[:, 1 : 1 + length], "audio": fused[:, 2 + length :]}
            return outputs, fused[:, 0], fused[:, 1 + length]
        visual_out = backbone.contextualise("visual", visual)
        audio_out = backbone.contextualise("audio", audio)
        paired = self._pair(audio_out, mismatched, first)
        outputs = {"visual": visual_out[:, 1:], "audio": audio_out[:, 1:]}
        if self.fusion == "late":
            return outputs, visual_out[:, 0], paired[:, 0]
        fused = backbone.fuse(visual_out[:, 1:], paired[:, 1:])
        if self.mep_fused:
            outputs.update(fused_visual=fused[:, 1 : 1 + length], fused_audio=fused[:, 2 + length :])
        return outputs, fused[:, 0], fused[:, 1 + length]

    @property
    def warmup_reads_clips_only(self) -> bool:
        """Whether the CNN warm-up's one objective is the clip-level InfoNCE, which reads the clip
        embeddings alone: the transformers and heads are then not run until it ends."""
        cfg = self.loss_cfg
        return bool(cfg.contrastive_weight) and str(cfg.get("contrastive_level", "video")) == "clip"

    def _infonce(self, per_clip: dict[str, torch.Tensor], clip_level: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The audio-visual InfoNCE over the global batch, and its share of the chance value ln N (N
        candidates per clip): ~1 until the CNNs learn (pemt.train.cnn_warmup ends the warm-up on it).
        `clip_level`: each visual clip against the audio clip of the same second, the batch's other
        clips the negatives; else each video's pooled outputs against the other videos'."""
        rows = (per_clip[m].flatten(0, 1) if clip_level else per_clip[m].mean(1) for m in MODALITIES)
        visual, audio = (gather_rows(r)[0] for r in rows)
        # over the whole step's batch when accumulating (pemt.model.collectives.micro_steps)
        loss = reaching_every_micro_step(info_nce(visual, audio, float(self.loss_cfg.temperature)))
        return loss, loss.detach() / math.log(max(2, len(visual)))

    def _clip_infonce(self, embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The CNN warm-up's losses and health figures where the transformers are not run. The
        parameters it does not reach get no gradient; under ZeRO their share of the flat gradient
        is zero, so the optimizer steps exactly as with the zero gradients of a full forward."""
        contrastive, share = self._infonce(embeddings, clip_level=True)
        spreads, _ = batch_spreads([embeddings["visual"], embeddings["audio"]])
        return {
            "loss": float(self.loss_cfg.contrastive_weight) * contrastive,
            "loss_contrastive": contrastive.detach(),
            "contrastive_vs_chance": share,
            **dict(zip(("spread_visual", "spread_audio"), spreads)),
        }

    def _pair_logits(self, visual_bos: torch.Tensor, audio_bos: torch.Tensor) -> torch.Tensor:
        """The paper's head reads the visual BOS of the fused sequence (late fusion: both BOS)."""
        if self.pair_kind == "agreement":
            logits: torch.Tensor = self.pair_head(visual_bos, audio_bos)
        elif self.fusion == "late":
            logits = self.pair_head(torch.cat([visual_bos, audio_bos], dim=-1)).squeeze(-1)
        else:
            logits = self.pair_head(visual_bos).squeeze(-1)
        return logits

    def forward(
        self, video: torch.Tensor, audio: torch.Tensor, step_seed: int | None = None, step: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch. Masks and negatives are drawn from generators keyed by
        (`step_seed`, global sample), so a step gives the same result at any world size; without
        `step_seed` one is drawn from torch's global generator. `step` (optimizer steps done) keeps
        MEP and the pair out of the total while `step < self.cnn_warmup_steps` (the CNN warm-up: its
        longest from `pemt.model.factory.cnn_warmup_steps`, moved earlier by `pemt.train.cnn_warmup`);
        None: every objective."""
        cfg = self.loss_cfg
        warming = step is not None and step < self.cnn_warmup_steps
        # While warming up MEP and the pair count for nothing: the transformers get zero gradients.
        context = 0.0 if warming else 1.0
        if step_seed is None:
            step_seed = int(torch.randint(2**31 - 1, ()).item())
        first, rows = global_rows(video.shape[0], video.device)
        embeddings = dict(zip(MODALITIES, self.backbone.embed_clips(video, audio)))
        if warming and self.warmup_reads_clips_only:
            return self._clip_infonce(embeddings)
        masked = {m: self._mask(embeddings[m], i, first, step_seed) for i, m in enumerate(MODALITIES)}
        mismatched = mismatch_mask(first, video.shape[0], rows, video.device)
        outputs, visual_bos, audio_bos = self._contextual(masked["visual"][0], masked["audio"][0], mismatched, first)

        losses: dict[str, torch.Tensor] = {}
        health_extra: dict[str, torch.Tensor] = {}
        same_video: dict[str, torch.Tensor] = {}
        if cfg.mep_weight:
            # The fused outputs of a mismatched sample hold another video's sound: only matched
            # samples' masked positions are predicted there.
            mep_targets = [(m, m, masked[m][1]) for m in MODALITIES]
            mep_targets += [
                (f"fused_{m}", m, masked[m][1] & ~mismatched[:, None]) for m in MODALITIES if self.mep_fused
            ]
            for i, (target, m, mask) in enumerate(mep_targets):
                losses[f"loss_mep_{target}"], same_video[target] = masked_embedding_loss(
                    self.mep_heads[target](outputs[target]),
                    embeddings[m],
                    mask,
                    int(cfg.negatives),
                    str(cfg.sampling),
                    float(cfg.sampling_temperature),
                    float(cfg.temperature),
                    draw_key=(step_seed, 1, i),
                    exclude=str(cfg.get("exclude_negatives", "self")),
                    nearby=int(cfg.get("nearby_clips", 1)),
                    train_targets=str(cfg.get("mep_targets", "trained")) == "trained",
                )
        pair_logits = self._pair_logits(visual_bos, audio_bos)
        pair, pair_accuracy = pair_loss(pair_logits, mismatched)
        losses["loss_pair"] = pair
        if cfg.contrastive_weight:
            clip_level = str(cfg.get("contrastive_level", "video")) == "clip"
            losses["loss_contrastive"], share = self._infonce(embeddings if clip_level else outputs, clip_level)
            health_extra = {"contrastive_vs_chance": share}
        mep = cast(torch.Tensor, sum(v for k, v in losses.items() if k.startswith("loss_mep_")))
        total: torch.Tensor = (
            context * float(cfg.mep_weight) * mep
            + context * float(cfg.pair_weight) * pair
            + float(cfg.contrastive_weight) * losses.get("loss_contrastive", 0.0)
        )
        fused = torch.cat([visual_bos, audio_bos], -1) if self.pair_kind == "agreement" else visual_bos
        spreads, deviations = batch_spreads([embeddings["visual"], embeddings["audio"], fused, pair_logits[:, None]])
        health = {
            "pair_accuracy": pair_accuracy.detach(),
            # How much each representation differs between the videos of the global batch: near 0,
            # every video looks alike to what reads it (the collapse `pemt.train.collapse` watches).
            **dict(zip(("spread_visual", "spread_audio", "spread_fused"), spreads)),
            # ... and the pair head's answer (its logit's standard deviation): near 0, it says the
            # same for every pair, whatever the other objectives' gradients do
            "pair_logit_spread": deviations[3],
            **{f"mep_same_video_{m}": share for m, share in same_video.items()},
            **health_extra,
        }
        return {"loss": total, **{k: v.detach() for k, v in losses.items()}, **health}


def batch_spreads(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each tensor's standard deviation across the global batch's samples (samples first),
    averaged over features: relative to the RMS (0 when every sample gives the same output), and
    as it is. One all-reduce of per-feature sums for all of them, not a gather of the rows: it
    runs every step."""
    with torch.no_grad():
        flat = [x.detach().flatten(1).float() for x in tensors]
        local = torch.cat([torch.cat([f.sum(0), f.square().sum(0), f.new_tensor([len(f)])]) for f in flat])
        totals, spreads, deviations, offset = sum_over_ranks(local), [], [], 0
        for f in flat:
            width = f.shape[1]
            total, squares, n = (
                totals[offset : offset + width],
                totals[offset + width : offset + 2 * width],
                totals[offset + 2 * width],
            )
            offset += 2 * width + 1
            if n < 2:
                spreads.append(torch.zeros((), device=f.device))
                deviations.append(torch.zeros((), device=f.device))
                continue
            variance = ((squares - total.square() / n) / (n - 1)).clamp_min(0.0)  # unbiased, as Tensor.std
            deviations.append(variance.sqrt().mean())
            spreads.append(deviations[-1] / (squares.sum() / (n * width)).sqrt().clamp_min(1e-12))
        return spreads, deviations


class PairAgreement(nn.Module):
    """A correct-pair head that compares: the scaled dot product of the two BOS outputs, each
    through its own projection, plus a bias. The paper's linear head on one BOS has to learn the
    comparison inside the transformers; this one has it built in, as InfoNCE does."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.visual = nn.Linear(hidden, hidden)
        self.audio = nn.Linear(hidden, hidden)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, visual_bos: torch.Tensor, audio_bos: torch.Tensor) -> torch.Tensor:
        agreement: torch.Tensor = (self.visual(visual_bos) * self.audio(audio_bos)).sum(-1)
        scaled: torch.Tensor = agreement / visual_bos.shape[-1] ** 0.5 + self.bias
        return scaled
