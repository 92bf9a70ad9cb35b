"""Loss functions of audio-visual pretraining."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(visual: torch.Tensor, audio: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: each video's audio is its positive, the batch's other audio the negatives."""
    visual = F.normalize(visual.float(), dim=-1)
    audio = F.normalize(audio.float(), dim=-1)
    logits = visual @ audio.T / temperature
    targets = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def mismatch_mask(batch: int, device: torch.device) -> torch.Tensor:
    """Which samples get another sample's audio for correct-pair prediction: every second one."""
    if batch < 2:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    return torch.arange(batch, device=device) % 2 == 1


def pair_loss(logits: torch.Tensor, mismatched: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary cross-entropy of matched-vs-mismatched logits, and the accuracy."""
    target = (~mismatched).float()
    loss = F.binary_cross_entropy_with_logits(logits.float(), target)
    accuracy = ((logits > 0).float() == target).float().mean()
    return loss, accuracy
