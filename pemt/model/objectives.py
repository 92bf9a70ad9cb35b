"""Loss functions of audio-visual pretraining and the sampling of their negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pemt.model.collectives import gather_rows


def info_nce(visual: torch.Tensor, audio: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: each video's audio is its positive, the batch's other audio the negatives."""
    visual = F.normalize(visual.float(), dim=-1)
    audio = F.normalize(audio.float(), dim=-1)
    logits = visual @ audio.T / temperature
    targets = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by integers (step, global sample, ...): the same draw on any
    rank, at any world size, for the same sample of the same step."""
    seed = 0
    for part in key:
        seed = (seed * 1_000_003 + int(part)) % (2**61 - 1)
    return torch.Generator().manual_seed(seed)


def mismatch_mask(first: int, batch: int, total: int, device: torch.device) -> torch.Tensor:
    """Which samples get another sample's audio for correct-pair prediction: every second one of
    the global batch (`first` is this rank's first global index, `total` the global batch)."""
    if total < 2:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    return (torch.arange(first, first + batch, device=device) % 2) == 1


def pair_loss(logits: torch.Tensor, mismatched: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary cross-entropy of matched-vs-mismatched logits, and the accuracy."""
    target = (~mismatched).float()
    loss = F.binary_cross_entropy_with_logits(logits.float(), target)
    accuracy = ((logits > 0).float() == target).float().mean()
    return loss, accuracy


def random_mask(
    batch: int, tokens: int, ratio: float, device: torch.device, generators: list[torch.Generator] | None = None
) -> torch.Tensor:
    """(B, T) bool, exactly max(1, round(ratio * T)) masked positions per sample; with
    `generators`, sample b's positions come from generators[b]."""
    count = max(1, round(ratio * tokens))
    if generators is None:
        noise = torch.rand(batch, tokens)
    else:
        noise = torch.stack([torch.rand(tokens, generator=g) for g in generators])
    return noise.to(device).argsort(dim=1) < count


EXCLUSIONS = ("self", "nearby", "video")


def excluded_from_negatives(
    positive: torch.Tensor, pool_size: int, clips: int, exclude: str, nearby: int
) -> torch.Tensor:
    """(N, P) bool: which pool entries may not be drawn as negatives of each positive.

    The pool holds `clips` consecutive embeddings per video. `self`: only the positive itself;
    `nearby`: also the clips of its video within `nearby` positions of it; `video`: every clip of
    its video (in a video whose clips look alike, they are the likeliest content-aware draws and
    cannot be told from the positive)."""
    if exclude not in EXCLUSIONS:
        raise ValueError(f"loss.exclude_negatives={exclude!r}: choose one of {', '.join(EXCLUSIONS)}")
    entries = torch.arange(pool_size, device=positive.device)
    if exclude == "self":
        return entries[None, :] == positive[:, None]
    same_video = (entries[None, :] // clips) == (positive[:, None] // clips)
    if exclude == "video":
        return same_video
    return same_video & ((entries[None, :] - positive[:, None]).abs() <= nearby)


def negative_probabilities(
    anchors: torch.Tensor, pool: torch.Tensor, excluded: torch.Tensor, strategy: str, temperature: float
) -> torch.Tensor:
    """(N, P) sampling distribution over the pool for each anchor, the `excluded` entries ((N, P)
    bool; at least the anchor's own positive) left out.

    `content`: proportional to exp(cosine similarity / temperature), so negatives that look
    like the positive are drawn more often; `uniform`: every other pool entry alike.
    """
    uniform = torch.zeros(len(anchors), len(pool), device=pool.device)
    if strategy == "content":
        scores = F.normalize(anchors.float(), dim=-1) @ F.normalize(pool.float(), dim=-1).T / temperature
    elif strategy == "uniform":
        scores = uniform
    else:
        raise ValueError(f"loss.sampling={strategy!r}: choose content or uniform")
    scores = scores.masked_fill(excluded, float("-inf"))
    probs = scores.softmax(dim=-1)
    if strategy == "content":
        # Non-finite embeddings (a diverging step) make no distribution: draw uniformly there, so
        # the step reaches its non-finite loss and is skipped instead of failing in the sampler.
        uniform = uniform.masked_fill(excluded, float("-inf"))
        probs = torch.where(torch.isfinite(probs).all(-1, keepdim=True), probs, uniform.softmax(dim=-1))
    return probs


def sample_negatives(
    anchors: torch.Tensor,
    pool: torch.Tensor,
    excluded: torch.Tensor,
    count: int,
    strategy: str,
    temperature: float,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """(N, count) pool indices drawn with replacement from `negative_probabilities`; with
    `generators`, anchor i draws from generators[i]."""
    with torch.no_grad():
        probs = negative_probabilities(anchors, pool, excluded, strategy, temperature)
        if generators is None:
            return torch.multinomial(probs, count, replacement=True)
        rows = probs.float().cpu()
        drawn = [torch.multinomial(row, count, replacement=True, generator=g) for row, g in zip(rows, generators)]
        return (
            torch.stack(drawn).to(pool.device) if drawn else torch.empty(0, count, dtype=torch.long, device=pool.device)
        )


def masked_embedding_loss(
    predicted: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    negatives: int,
    strategy: str,
    sampling_temperature: float,
    temperature: float,
    draw_key: tuple[int, ...] | None = None,
    exclude: str = "self",
    nearby: int = 1,
    train_targets: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of each masked position's prediction against its own CNN embedding (positive) and
    `negatives` CNN embeddings drawn from the global batch (gathered over ranks, differentiably),
    leaving out what `exclude` names (`excluded_from_negatives`); and the share of the drawn
    negatives that came from the positive's own video.

    predicted, targets: (B, T, D); mask: (B, T) bool. With `draw_key`, the negatives of the
    position at global row r come from generator(*draw_key, r): the same at any world size. With
    `train_targets` false the targets are fixed points for the prediction: no gradient reaches
    them (or the CNNs that made them) from this loss.
    """
    clips = targets.shape[1]
    pool, offset = gather_rows((targets if train_targets else targets.detach()).flatten(0, 1))
    positions = mask.flatten().nonzero().squeeze(1)
    if not len(positions):  # nothing masked here (fused MEP of a micro-batch of mismatched samples)
        nothing = predicted.sum() * 0.0
        return nothing, nothing.detach()
    query = F.normalize(predicted.flatten(0, 1)[positions].float(), dim=-1)
    positive_index = positions + offset
    generators = None if draw_key is None else [generator(*draw_key, int(r)) for r in positive_index]
    drawn = sample_negatives(
        pool[positive_index].detach(),
        pool.detach(),
        excluded_from_negatives(positive_index, len(pool), clips, exclude, nearby),
        negatives,
        strategy,
        sampling_temperature,
        generators,
    )
    keys = F.normalize(pool.float(), dim=-1)
    positive = (query * keys[positive_index]).sum(-1, keepdim=True)
    negative = torch.einsum("nd,nkd->nk", query, keys[drawn])
    logits = torch.cat([positive, negative], dim=1) / temperature
    loss = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
    same_video = (drawn // clips == positive_index[:, None] // clips).float().mean()
    return loss, same_video
