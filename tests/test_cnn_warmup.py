"""The CNN warm-up's end: early once the InfoNCE has left its chance value, else at its longest."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from pemt.config import ConfigError
from pemt.train.cnn_warmup import WINDOW, CnnWarmup, check_cnn_warmup

AT_CHANCE = [1.02, 0.99, 1.0, 1.01, 0.98] * 4  # an InfoNCE on its plateau (a share of ln N)


def test_it_ends_once_the_average_of_the_last_steps_is_under_the_share() -> None:
    warmup = CnnWarmup(longest=300, until=0.9)
    assert warmup.end == 300
    # one step far under does not end it (step 21); the average of the last 10 does
    shares = [1.0] * 20 + [0.5] + [1.0] * 5 + [0.7] * 10
    said = {step: warmup.observe(step, share) for step, share in enumerate(shares, start=1)}
    assert [step for step, line in said.items() if line] == [28]  # steps 19-28: 8.9 / 10
    assert "over at step 28" in str(said[28]) and "loss.cnn_warmup_until=0.9" in str(said[28])
    assert warmup.end == 28 and warmup.learned
    assert not warmup.watching(29) and warmup.observe(29, 0.1) is None, "said once"


def test_a_start_far_above_chance_is_forgotten_within_the_window() -> None:
    """Random CNNs can start well above chance (the embedded default: 1.3); the warm-up ends as
    soon as the last 10 steps are under the share."""
    warmup = CnnWarmup(longest=300, until=0.9)
    shares = [2.0, 1.5] + [0.7] * 20
    ends = [step for step, share in enumerate(shares, start=1) if warmup.observe(step, share)]
    assert ends == [11]  # steps 1-10 average 0.91, steps 2-11 0.78
    assert WINDOW == 10


def test_at_its_longest_without_learning_it_ends_with_a_warning() -> None:
    warmup = CnnWarmup(longest=20, until=0.9)
    said = [warmup.observe(step, share) for step, share in enumerate(AT_CHANCE, start=1)]
    assert said[:19] == [None] * 19
    assert said[19] is not None and "ran its longest" in said[19] and "still at 1.000" in said[19]
    assert warmup.end == 20 and not warmup.learned and not warmup.watching(21)


def test_without_a_share_it_is_exactly_its_length() -> None:
    warmup = CnnWarmup(longest=30, until=None)
    assert not warmup.watching(1) and warmup.observe(1, 0.1) is None and warmup.end == 30
    none = CnnWarmup(longest=0, until=0.9)  # no InfoNCE, or a run too short: no warm-up at all
    assert not none.watching(1) and none.end == 0
    smoke = CnnWarmup(longest=WINDOW - 1, until=0.9)  # too short to average: not judged, nor warned about
    assert [smoke.observe(step, 1.0) for step in range(1, WINDOW)] == [None] * (WINDOW - 1) and smoke.end == WINDOW - 1


def test_a_restored_warmup_decides_where_the_uninterrupted_one_did() -> None:
    shares = [1.0 - 0.01 * i for i in range(40)]
    straight = CnnWarmup(longest=100, until=0.9)
    ends = [step for step, share in enumerate(shares, start=1) if straight.observe(step, share)]
    first = CnnWarmup(longest=100, until=0.9)
    for step, share in enumerate(shares[:7], start=1):
        first.observe(step, share)
    state = OmegaConf.to_container(OmegaConf.create(first.state_dict()))  # as the checkpoint's JSON has it
    resumed = CnnWarmup(longest=100, until=0.9)
    resumed.load_state_dict(state)  # type: ignore[arg-type]
    assert [s for s, share in enumerate(shares[7:], start=8) if resumed.observe(s, share)] == ends
    assert resumed.end == straight.end < 100
    fresh = CnnWarmup(longest=100, until=0.9)
    fresh.load_state_dict(None)  # a checkpoint from before the warm-up could end early
    assert fresh.end == 100 and fresh.recent == []


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.2, True, "half"])
def test_a_share_outside_0_1_is_refused(value: object) -> None:
    cfg = OmegaConf.create({"loss": {"cnn_warmup_until": value}})
    with pytest.raises(ConfigError, match=r"loss\.cnn_warmup_until="):
        check_cnn_warmup(cfg)
    check_cnn_warmup(OmegaConf.create({"loss": {"cnn_warmup_until": None}}))
    check_cnn_warmup(OmegaConf.create({"loss": {"cnn_warmup_until": 0.9}}))
    check_cnn_warmup(OmegaConf.create({"task": {}}))  # fine-tuning has no loss section


def test_the_model_reports_the_infonce_as_a_share_of_its_chance_value() -> None:
    from test_model import _batch, _cfg

    from pemt.model.factory import build_pretraining_model

    cfg = _cfg("loss.contrastive_weight=1.0", "loss.contrastive_level=clip")
    torch.manual_seed(0)
    model = build_pretraining_model(cfg)
    video, audio = _batch(cfg)
    out = model(video, audio, step_seed=0)
    candidates = video.shape[0] * int(cfg.data.clips)  # every clip of the batch
    assert out["contrastive_vs_chance"].item() == pytest.approx(out["loss_contrastive"].item() / math.log(candidates))
    without = build_pretraining_model(_cfg("loss.contrastive_weight=0"))
    assert "contrastive_vs_chance" not in without(video, audio, step_seed=0)
