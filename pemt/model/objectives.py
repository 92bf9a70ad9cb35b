"""Loss functions of audio-visual pretraining and the sampling of their negatives."""

from __future__ import annotations

import torch
import torch.distributed as dist
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


def random_mask(batch: int, tokens: int, ratio: float, device: torch.device) -> torch.Tensor:
    """(B, T) bool, exactly max(1, round(ratio * T)) masked positions per sample."""
    count = max(1, round(ratio * tokens))
    order = torch.rand(batch, tokens, device=device).argsort(dim=1)
    return order < count


def negative_probabilities(anchors: torch.Tensor, pool: torch.Tensor, exclude: torch.Tensor,
                           strategy: str, temperature: float) -> torch.Tensor:
    """(N, P) sampling distribution over the pool for each anchor, its own positive excluded.

    `content`: proportional to exp(cosine similarity / temperature), so negatives that look
    like the positive are drawn more often; `uniform`: every other pool entry alike.
    """
    if strategy == "content":
        scores = F.normalize(anchors.float(), dim=-1) @ F.normalize(pool.float(), dim=-1).T / temperature
    elif strategy == "uniform":
        scores = torch.zeros(len(anchors), len(pool), device=pool.device)
    else:
        raise ValueError(f"loss.sampling={strategy!r}: choose content or uniform")
    scores[torch.arange(len(anchors), device=pool.device), exclude] = float("-inf")
    return scores.softmax(dim=-1)


def sample_negatives(anchors: torch.Tensor, pool: torch.Tensor, exclude: torch.Tensor, count: int,
                     strategy: str, temperature: float) -> torch.Tensor:
    """(N, count) pool indices drawn with replacement from `negative_probabilities`."""
    with torch.no_grad():
        probs = negative_probabilities(anchors, pool, exclude, strategy, temperature)
        return torch.multinomial(probs, count, replacement=True)


def gather_pool(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's (N, D) rows; this rank's rows keep their gradient.

    Returns the pool and the offset of this rank's rows in it.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local, 0
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.detach().contiguous())
    rank = dist.get_rank()
    parts[rank] = local
    return torch.cat(parts), rank * len(local)


def masked_embedding_loss(predicted: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                          negatives: int, strategy: str, sampling_temperature: float,
                          temperature: float) -> torch.Tensor:
    """InfoNCE of each masked position's prediction against its own CNN embedding (positive) and
    `negatives` CNN embeddings drawn from the global batch.

    predicted, targets: (B, T, D); mask: (B, T) bool.
    """
    pool, offset = gather_pool(targets.flatten(0, 1))
    positions = mask.flatten().nonzero().squeeze(1)
    query = F.normalize(predicted.flatten(0, 1)[positions].float(), dim=-1)
    positive_index = positions + offset
    drawn = sample_negatives(pool[positive_index].detach(), pool.detach(), positive_index, negatives,
                             strategy, sampling_temperature)
    keys = F.normalize(pool.float(), dim=-1)
    positive = (query * keys[positive_index]).sum(-1, keepdim=True)
    negative = torch.einsum("nd,nkd->nk", query, keys[drawn])
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
