"""Pretraining objectives: negative sampling statistics and the global-batch pool."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pemt.model.objectives import (gather_pool, masked_embedding_loss, negative_probabilities,
                                   random_mask, sample_negatives)


def _pool() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    anchor = torch.tensor([[1.0, 0.0, 0.0]])
    # Pool entry 0 is the positive itself; the rest grow steadily less similar to it.
    angles = torch.linspace(0.0, 2.5, 8)
    pool = torch.stack([torch.cos(angles), torch.sin(angles), torch.zeros(8)], dim=1)
    return anchor, pool


@pytest.mark.parametrize("strategy", ["content", "uniform"])
def test_drawn_frequencies_match_the_target_distribution(strategy: str) -> None:
    anchor, pool = _pool()
    exclude = torch.tensor([0])
    target = negative_probabilities(anchor, pool, exclude, strategy, temperature=0.5)[0]
    draws = 40_000
    torch.manual_seed(1)
    drawn = sample_negatives(anchor, pool, exclude, draws, strategy, temperature=0.5)[0]
    counts = torch.bincount(drawn, minlength=len(pool)).double()
    assert counts[0] == 0, "the positive is never its own negative"
    expected = target.double() * draws
    # Pearson chi-square over the 7 possible negatives; 6 degrees of freedom, 99.9% point = 22.46.
    chi2 = ((counts[1:] - expected[1:]) ** 2 / expected[1:]).sum().item()
    assert chi2 < 22.46, (counts, expected)


def test_content_aware_draws_similar_instances_more_often() -> None:
    anchor, pool = _pool()
    torch.manual_seed(2)
    drawn = sample_negatives(anchor, pool, torch.tensor([0]), 20_000, "content", temperature=0.5)[0]
    counts = torch.bincount(drawn, minlength=len(pool))[1:]
    assert all(a > b for a, b in zip(counts[:-1], counts[1:])), counts


def test_masks_take_the_configured_fraction() -> None:
    mask = random_mask(batch=5, tokens=20, ratio=0.15, device=torch.device("cpu"))
    assert mask.sum(1).tolist() == [3] * 5
    assert random_mask(2, 4, 0.01, torch.device("cpu")).sum(1).tolist() == [1, 1], "at least one"


def test_masked_embedding_loss_prefers_the_right_prediction() -> None:
    torch.manual_seed(0)
    targets = torch.randn(2, 6, 16)
    mask = random_mask(2, 6, 0.5, torch.device("cpu"))
    right = masked_embedding_loss(targets, targets, mask, 8, "content", 0.1, 0.1)
    wrong = masked_embedding_loss(torch.randn(2, 6, 16), targets, mask, 8, "content", 0.1, 0.1)
    assert right < wrong


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    local = torch.full((3, 4), float(rank), requires_grad=True)
    pool, offset = gather_pool(local)
    pool.sum().backward()
    results[rank] = (pool.detach().clone(), offset, local.grad.clone())
    dist.destroy_process_group()


def test_negatives_pool_spans_every_rank_with_local_gradient() -> None:
    results = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(_free_port(), results), nprocs=2)
    for rank in (0, 1):
        pool, offset, grad = results[rank]
        assert pool.shape == (6, 4)
        assert pool[:3].eq(0).all() and pool[3:].eq(1).all(), "rows of both ranks, in rank order"
        assert offset == 3 * rank
        assert grad.eq(1).all(), "this rank's rows carry gradient"
