"""The CNNs' global-batch BatchNorm: torch's fused kernels (`model.batchnorm=fused`: on CUDA, and
on CPU at one rank) normalise as the explicit ops do. On CPU the fused path runs on one rank, which
is what is compared here; SyncBatchNorm's kernels for several ranks exist on CUDA only (the GPU
suite times both)."""

from __future__ import annotations

import pytest
import torch

from pemt.config import ConfigError, compose_config
from pemt.model import cnn
from pemt.model.cnn import BatchNorm, _recomputing
from pemt.model.factory import build_pretraining_model, check_model


def _pair(channels: int) -> tuple[BatchNorm, BatchNorm]:
    torch.manual_seed(0)
    explicit = BatchNorm(channels)
    with torch.no_grad():
        explicit.weight.uniform_(0.5, 1.5)
        explicit.bias.uniform_(-0.5, 0.5)
        explicit.running_mean.uniform_(-1.0, 1.0)
        explicit.running_var.uniform_(0.5, 2.0)
    fused = BatchNorm(channels)
    fused.load_state_dict(explicit.state_dict())
    return explicit, fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 5, 7, 7), (3, 5, 2, 6, 6)])  # audio (2D) and video (3D) maps
def test_fused_kernels_give_the_explicit_outputs_gradients_and_running_statistics(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    explicit, fused = _pair(shape[1])
    # Far from zero mean: E[x^2] - E[x]^2 and a one-pass variance must still agree.
    x = (torch.randn(shape) * 2.0 + 3.0).to(dtype)
    grad = torch.randn(shape).to(dtype)
    x_explicit, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_explicit, out_fused = explicit(x_explicit), fused.fused_forward(x_fused)
    assert out_fused.dtype == out_explicit.dtype == dtype
    out_explicit.backward(grad)
    out_fused.backward(grad)
    # fp32: rounding only; bf16: the output's own rounding (8 bits of mantissa) dominates.
    close = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out_fused, out_explicit, **close)
    torch.testing.assert_close(x_fused.grad, x_explicit.grad, **close)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(fused, name).grad, getattr(explicit, name).grad, **close)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(fused, name), getattr(explicit, name), rtol=1e-4, atol=1e-5, msg=name)
    assert int(fused.num_batches_tracked) == int(explicit.num_batches_tracked) == 1

    explicit.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused.fused_forward(x), explicit(x), **close)


def test_fused_kernels_leave_running_statistics_alone_in_a_checkpointed_recomputation() -> None:
    _, fused = _pair(4)
    before = {name: buffer.clone() for name, buffer in fused.named_buffers()}
    with _recomputing():
        fused.fused_forward(torch.randn(4, 4, 3, 3) + 2.0)
    for name, buffer in fused.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_the_fused_kernels_run_on_one_rank_the_explicit_ops_across_cpu_ranks_and_the_config_picks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fused_on: list[str] = []
    kernels = BatchNorm.fused_forward

    def recording(self: BatchNorm, x: torch.Tensor) -> torch.Tensor:
        fused_on.append(x.device.type)
        return kernels(self, x)

    monkeypatch.setattr(BatchNorm, "fused_forward", recording)
    model = build_pretraining_model(compose_config("pretrain", overrides=[]))
    norms = [m for m in model.modules() if isinstance(m, BatchNorm)]
    assert norms and all(m.fused for m in norms), "fused is the default"
    x = torch.randn(2, norms[0].num_features, 3, 3)
    norms[0](x)
    assert fused_on == ["cpu"], "one CPU rank: torch's kernels"
    explicit = build_pretraining_model(compose_config("pretrain", overrides=["model.batchnorm=explicit"]))
    explicit_norms = [m for m in explicit.modules() if isinstance(m, BatchNorm)]
    assert not any(m.fused for m in explicit_norms)
    explicit_norms[0](x)
    assert fused_on == ["cpu"], "model.batchnorm=explicit: the explicit ops"
    monkeypatch.setattr(cnn, "world", lambda: (0, 2))
    norms[0](x)
    assert fused_on == ["cpu"], "several CPU ranks: the explicit ops (SyncBatchNorm's kernels are CUDA's only)"
    with pytest.raises(ConfigError, match="model.batchnorm='cudnn': choose 'fused' or 'explicit'"):
        check_model(compose_config("pretrain", overrides=["model.batchnorm=cudnn"]))
