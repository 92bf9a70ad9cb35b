"""Pretraining objectives: negative sampling statistics and the global-batch pool."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from pemt.model.collectives import gather_rows
from pemt.model.objectives import (
    excluded_from_negatives,
    generator,
    masked_embedding_loss,
    negative_probabilities,
    random_mask,
    sample_negatives,
)


def _pool() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    anchor = torch.tensor([[1.0, 0.0, 0.0]])
    # Pool entry 0 is the positive itself; the rest grow steadily less similar to it.
    angles = torch.linspace(0.0, 2.5, 8)
    pool = torch.stack([torch.cos(angles), torch.sin(angles), torch.zeros(8)], dim=1)
    return anchor, pool


def _only_self(pool: torch.Tensor) -> torch.Tensor:
    """Pool entry 0 (the positive) left out of the negatives of the one anchor."""
    return torch.arange(len(pool))[None, :] == 0


@pytest.mark.parametrize("strategy", ["content", "uniform"])
def test_drawn_frequencies_match_the_target_distribution(strategy: str) -> None:
    anchor, pool = _pool()
    exclude = excluded_from_negatives(torch.tensor([0]), len(pool), clips=len(pool), exclude="self", nearby=0)
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
    drawn = sample_negatives(anchor, pool, _only_self(pool), 20_000, "content", temperature=0.5)[0]
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
    right, _ = masked_embedding_loss(targets, targets, mask, 8, "content", 0.1, 0.1)
    wrong, _ = masked_embedding_loss(torch.randn(2, 6, 16), targets, mask, 8, "content", 0.1, 0.1)
    assert right < wrong


def test_fixed_targets_take_no_gradient_from_masked_embedding_prediction() -> None:
    """loss.mep_targets=fixed: MEP trains what predicts, never the CNN embeddings it predicts
    (the positive and the negatives alike); trained, both move."""
    grads = {}
    for train_targets in (True, False):
        torch.manual_seed(0)
        predicted = torch.randn(2, 6, 16, requires_grad=True)
        targets = torch.randn(2, 6, 16, requires_grad=True)
        mask = random_mask(2, 6, 0.5, torch.device("cpu"))
        loss, _ = masked_embedding_loss(predicted, targets, mask, 8, "content", 0.1, 0.1, train_targets=train_targets)
        loss.backward()
        assert predicted.grad is not None and predicted.grad.abs().sum() > 0
        grads[train_targets] = targets.grad
    assert grads[True] is not None and grads[True].abs().sum() > 0
    assert grads[False] is None


def test_excluded_negatives_are_never_drawn_and_the_same_video_share_is_reported() -> None:
    # 4 videos of 5 clips; each video's clips are near copies of one another (one look per video),
    # the case where content-aware sampling draws mostly from the positive's own video.
    torch.manual_seed(0)
    looks = torch.randn(4, 1, 32)
    targets = looks + 0.05 * torch.randn(4, 5, 32)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[:, 2] = True
    positives = torch.arange(4) * 5 + 2
    shares = {}
    for exclude in ("self", "nearby", "video"):
        excluded = excluded_from_negatives(positives, 20, clips=5, exclude=exclude, nearby=1)
        same = (torch.arange(20)[None, :] // 5) == (positives[:, None] // 5)
        allowed_same = {"self": 4, "nearby": 2, "video": 0}[exclude]  # own-video clips left to draw
        assert int((same & ~excluded).sum(1).unique()) == allowed_same
        pool = targets.flatten(0, 1)
        drawn = sample_negatives(pool[positives], pool, excluded, 64, "content", 0.1)
        assert not excluded.gather(1, drawn).any(), f"{exclude}: an excluded entry was drawn"
        _, shares[exclude] = masked_embedding_loss(targets, targets, mask, 64, "content", 0.1, 0.1, exclude=exclude)
    assert shares["self"] > 0.9, "alike clips of one video are the likeliest content-aware draws"
    assert shares["video"] == 0
    with pytest.raises(ValueError, match="loss.exclude_negatives='clip'"):
        excluded_from_negatives(positives, 20, clips=5, exclude="clip", nearby=1)


def _gather_worker(rank: int, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    local = torch.full((3 - rank, 4), float(rank), requires_grad=True)  # unequal: 3 and 2 rows
    pool, offset = gather_rows(local)
    (pool * torch.arange(1, 6).view(5, 1)).sum().backward()
    results[rank] = (pool.detach().clone(), offset, local.grad.clone())
    dist.destroy_process_group()


def test_gathered_rows_span_every_rank_and_send_gradient_home() -> None:
    results = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(free_port(), results), nprocs=2)
    for rank in (0, 1):
        pool, offset, grad = results[rank]
        assert pool.shape == (5, 4)
        assert pool[:3].eq(0).all() and pool[3:].eq(1).all(), "rows of both ranks, in rank order"
        assert offset == 3 * rank
        # Row r is weighted r + 1 on both ranks: its owner gets 2 (r + 1), as in one process.
        expected = 2 * torch.arange(1 + offset, 1 + offset + (3 - rank)).view(-1, 1).float().expand(-1, 4)
        assert torch.equal(grad, expected)


def _cfg():
    from pemt.config import compose_config

    return compose_config("pretrain", overrides=["loss.mask_ratio=0.25"])


def _loss_and_grads(model, video, audio) -> tuple[float, list[torch.Tensor]]:
    out = model(video, audio, step_seed=1234)
    model.zero_grad()
    out["loss"].backward()
    return out["loss"].item(), [p.grad.clone() for p in model.parameters()]


def _invariance_worker(rank: int, port: int, video, audio, results: dict) -> None:
    from pemt.model.factory import build_pretraining_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = build_pretraining_model(_cfg())
    loss, grads = _loss_and_grads(model, video[2 * rank : 2 * rank + 2], audio[2 * rank : 2 * rank + 2])
    mean = torch.tensor([loss])
    dist.all_reduce(mean)
    for grad in grads:  # as DeepSpeed does: gradients averaged over ranks
        dist.all_reduce(grad)
        grad /= 2
    results[rank] = (mean.item() / 2, grads)
    dist.destroy_process_group()


def test_a_step_on_two_ranks_equals_one_process() -> None:
    from test_model import _batch

    from pemt.model.factory import build_pretraining_model

    cfg = _cfg()
    torch.manual_seed(5)
    video, audio = _batch(cfg, batch=4)
    torch.manual_seed(0)
    single_loss, single_grads = _loss_and_grads(build_pretraining_model(cfg), video, audio)
    results = mp.Manager().dict()
    mp.spawn(_invariance_worker, args=(free_port(), video, audio, results), nprocs=2)
    loss, grads = results[0]
    assert abs(loss - single_loss) < 1e-5, (loss, single_loss)
    worst = max((a - b).abs().max().item() for a, b in zip(grads, single_grads))
    # Relative to the largest gradient: the CNNs' global BatchNorm of the pooled features (out_norm)
    # divides by their small spread, which amplifies float32 summation-order differences to ~3e-5
    # of it (measured); a rank's missing contribution would be of the gradients' own size.
    scale = max(g.abs().max().item() for g in single_grads)
    assert worst < 1e-4 * scale, (worst, scale)


def test_keyed_draws_do_not_depend_on_global_rng() -> None:
    anchor, pool = _pool()
    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        draws.append(sample_negatives(anchor, pool, _only_self(pool), 50, "content", 0.5, [generator(7, 0)]))
    assert torch.equal(draws[0], draws[1])


def test_a_checkpoint_is_never_written_from_non_finite_statistics() -> None:
    from torch import nn

    from pemt.train.guard import NonFiniteError, StepGuard

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    guard = StepGuard(model, max_skipped_in_a_row=2, device=torch.device("cpu"))
    guard.check_finite(1)
    guard.before_forward()
    model[1].running_mean.fill_(float("nan"))  # a non-finite forward pass
    assert not guard.after_step(applied=False, step=2, loss_tensor=torch.tensor(float("nan")))
    assert torch.isfinite(model[1].running_mean).all(), "the statistics are put back"
    model[1].running_var.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="not finite at step 3"):
        guard.check_finite(3)
    with pytest.raises(NonFiniteError, match="2 steps in a row"):
        guard.after_step(applied=False, step=4, loss_tensor=torch.tensor(float("nan")))


def test_accumulated_micro_steps_are_warned_about_and_one_batch_per_step_is_not() -> None:
    """Accumulation splits the global batch BatchNorm normalises over: the run says so, with the
    numbers, before it trains; a run that is not split says nothing."""
    from pemt.config import compose_config
    from pemt.train.task import PretrainTask

    task = PretrainTask()
    assert task.config_warnings(compose_config("pretrain", overrides=["train.global_batch_size=32"])) == []
    split = compose_config("pretrain", overrides=["train.global_batch_size=32", "train.grad_accum_steps=4"])
    [line] = task.config_warnings(split)
    assert line.startswith("train.grad_accum_steps=4: each micro-step's 8 samples") and "global batch of 32" in line
