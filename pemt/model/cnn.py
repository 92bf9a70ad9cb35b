"""Clip encoders: a 3D ResNet over video clips and a 2D ResNet over log-mel spectrograms.

One residual network written once for both (`dims` picks 2D or 3D convolutions), from the
small basic-block network of the tiny model to the ResNet-50s of the paper: bottleneck stages
3-4-6-3, widths doubling per stage, spatial stride 2 from the second stage on. In 3D the time
axis is only strided in the stem; each stage's temporal kernel (on the bottleneck's first
convolution) comes from config, so the visual network is the paper's "slow" 3D ResNet-50.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from pemt.distributed import world
from pemt.model.collectives import sum_over_ranks

_recompute = threading.local()


@contextlib.contextmanager
def _recomputing() -> Iterator[None]:
    previous = getattr(_recompute, "active", False)
    _recompute.active = True
    try:
        yield
    finally:
        _recompute.active = previous


def checkpoint_contexts() -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
    """`context_fn` for torch.utils.checkpoint over a CNN: the forward pass repeated in the
    backward pass leaves BatchNorm's running statistics alone (the first pass updated them;
    a second update would apply the momentum twice per step)."""
    return contextlib.nullcontext(), _recomputing()


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv3d if dims == 3 else nn.Conv2d


class BatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch, computed in fp32.

    Training statistics are summed over all ranks (differentiably), so a step on W ranks
    normalises exactly as one process holding the whole batch would: resuming at another world
    size continues the same computation. fp32 whatever the input: DeepSpeed's bf16 mode casts
    parameters but not running statistics, and fp32 statistics are the accurate choice anyway.

    With `fused` (from `model.batchnorm`) torch's fused kernels compute the same statistics (one
    pass, fp32 accumulation, no fp32 copy of the activation): native batch norm on one rank (CPU
    or CUDA), SyncBatchNorm's kernels and collectives across CUDA ranks. Across CPU ranks only the
    explicit ops below work (torch's SyncBatchNorm kernels exist for CUDA only).
    """

    fused = True

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (4, 5):
            raise ValueError(f"expected a 4D or 5D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if self.fused and (x.is_cuda or world()[1] == 1):
            return self.fused_forward(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x32 = x.float()
        if not self.training:
            assert self.running_mean is not None and self.running_var is not None  # always tracked
            mean, var = self.running_mean, self.running_var
        else:
            dims = [0, *range(2, x.dim())]
            count = torch.tensor([x32.numel() // x32.shape[1]], dtype=torch.float32, device=x.device)
            totals = sum_over_ranks(torch.cat([x32.sum(dims), x32.square().sum(dims), count]))
            channels = x.shape[1]
            n = totals[-1]
            mean = totals[:channels] / n
            var = (totals[channels : 2 * channels] / n - mean.square()).clamp_min(0.0)
            if not getattr(_recompute, "active", False):
                self._track(mean, var, n)
        normalised = (x32 - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return (normalised * self.weight.float().view(shape) + self.bias.float().view(shape)).to(x.dtype)

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same normalisation through torch's kernels (CUDA; on one rank CPU too, which the tests
        compare with the explicit ops). Running statistics move as in `_track`: not again in a
        checkpointed recomputation."""
        assert self.running_mean is not None and self.running_var is not None and self.num_batches_tracked is not None
        weight, bias = self.weight.float(), self.bias.float()  # fp32 parameters: the kernels' mixed mode
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, False, 0.0, self.eps)
        recomputing = getattr(_recompute, "active", False)
        running_mean, running_var = self.running_mean, self.running_var
        if recomputing:  # copies, moved and dropped: the kernels save the same tensors as the first pass did
            running_mean, running_var = running_mean.clone(), running_var.clone()
        else:
            self.num_batches_tracked.add_(1)
        ranks = world()[1]
        if ranks == 1:
            return F.batch_norm(x, running_mean, running_var, weight, bias, True, self._momentum(), self.eps)
        from torch.nn.modules._functions import SyncBatchNorm as sync_batch_norm

        out = sync_batch_norm.apply(  # type: ignore[no-untyped-call]
            x, weight, bias, running_mean, running_var, self.eps, self._momentum(), dist.group.WORLD, ranks
        )
        return cast(torch.Tensor, out)

    def _momentum(self) -> float:
        """The running statistics' step toward each batch's (torch's default when unset)."""
        return float(self.momentum) if self.momentum is not None else 0.1

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        """Fold this batch into the running statistics (no tensors saved for backward: the
        checkpointed recomputation, which skips this, must save what the forward saved)."""
        assert self.running_mean is not None and self.running_var is not None and self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        self.running_mean.lerp_(mean, self._momentum())
        self.running_var.lerp_(var * n / (n - 1).clamp_min(1.0), self._momentum())


@contextlib.contextmanager
def kept_batchnorm_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm's running statistics as they were before the block (a pass that must not count)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    kept = [[b.clone() for b in m.buffers()] for m in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, buffers in zip(layers, kept):
                for now, before in zip(layer.buffers(), buffers):
                    now.copy_(before)


def _norm(dims: int) -> type[nn.Module]:
    return BatchNorm


def _kernel(dims: int, temporal: int, spatial: int) -> tuple[int, ...]:
    """(t, s, s) in 3D; (s, s) in 2D, where the audio network has no separate time axis."""
    return (temporal, spatial, spatial) if dims == 3 else (spatial, spatial)


def _stride(dims: int, spatial: int) -> tuple[int, ...]:
    return (1, spatial, spatial) if dims == 3 else (spatial, spatial)


def _padding(kernel: Sequence[int]) -> tuple[int, ...]:
    return tuple(k // 2 for k in kernel)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, dims: int, cin: int, width: int, stride: int, temporal: int) -> None:
        super().__init__()
        conv, norm = _conv(dims), _norm(dims)
        first, second = _kernel(dims, temporal, 3), _kernel(dims, 1, 3)
        self.body = nn.Sequential(
            conv(cin, width, first, stride=_stride(dims, stride), padding=_padding(first), bias=False),
            norm(width),
            nn.ReLU(inplace=True),
            conv(width, width, second, padding=_padding(second), bias=False),
            norm(width),
        )
        self.skip = _shortcut(dims, cin, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, dims: int, cin: int, width: int, stride: int, temporal: int) -> None:
        super().__init__()
        conv, norm = _conv(dims), _norm(dims)
        first, middle = _kernel(dims, temporal, 1), _kernel(dims, 1, 3)
        cout = width * self.expansion
        self.body = nn.Sequential(
            conv(cin, width, first, padding=_padding(first), bias=False),
            norm(width),
            nn.ReLU(inplace=True),
            conv(width, width, middle, stride=_stride(dims, stride), padding=_padding(middle), bias=False),
            norm(width),
            nn.ReLU(inplace=True),
            conv(width, cout, 1, bias=False),
            norm(cout),
        )
        self.skip = _shortcut(dims, cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def _shortcut(dims: int, cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(_conv(dims)(cin, cout, 1, stride=_stride(dims, stride), bias=False), _norm(dims)(cout))


class ResNet(nn.Module):
    """Stem, residual stages, average pool -> (N, out_dim), or a grid of cells (tokens per clip);
    with `out_norm`, the pooled features are normalised over the batch.

    `temporal_kernels` gives the stem's and each stage's temporal kernel (3D only).
    `separable_stem` replaces the stem's k x k kernel by k x 1 then 1 x k (the audio network).
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        width: int,
        layers: Sequence[int],
        block: str = "basic",
        stem_kernel: int = 3,
        stem_stride: int = 1,
        stem_pool: bool = False,
        temporal_kernels: Sequence[int] | None = None,
        separable_stem: bool = False,
        out_norm: bool = False,
    ) -> None:
        super().__init__()
        conv, norm = _conv(dims), _norm(dims)
        temporal = list(temporal_kernels or [1] * (len(layers) + 1))
        if len(temporal) != len(layers) + 1:
            raise ValueError(
                f"temporal_kernels={temporal}: need one for the stem and one per stage ({len(layers) + 1})"
            )
        stride = (stem_stride,) * dims
        if separable_stem:
            kernel_a, kernel_b = (stem_kernel, 1), (1, stem_kernel)
            stem = [
                conv(in_channels, width, kernel_a, stride=(stem_stride, 1), padding=_padding(kernel_a), bias=False),
                norm(width),
                nn.ReLU(inplace=True),
                conv(width, width, kernel_b, stride=(1, stem_stride), padding=_padding(kernel_b), bias=False),
            ]
        else:
            kernel = _kernel(dims, temporal[0], stem_kernel)
            stem = [conv(in_channels, width, kernel, stride=stride, padding=_padding(kernel), bias=False)]
        stem += [norm(width), nn.ReLU(inplace=True)]
        if stem_pool:
            pool = _kernel(dims, 1, 3)
            stem.append((nn.MaxPool3d if dims == 3 else nn.MaxPool2d)(pool, _stride(dims, 2), _padding(pool)))
        self.stem = nn.Sequential(*stem)
        block_types: dict[str, type[BasicBlock | Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}
        block_type = block_types[block]
        blocks, cin = [], width
        for stage, count in enumerate(layers):
            stage_width = width * 2**stage
            for index in range(count):
                stride_here = 2 if stage > 0 and index == 0 else 1
                blocks.append(block_type(dims, cin, stage_width, stride_here, temporal[stage + 1]))
                cin = stage_width * block_type.expansion
        self.stages = nn.Sequential(*blocks)
        self.out_dim = cin
        # A ReLU network's pooled features share a large positive offset that differs little
        # between inputs; normalising them over the batch centres and scales each channel, so the
        # projection sees mostly what tells clips apart.
        self.out_norm = norm(cin) if out_norm else None

    def forward(self, x: torch.Tensor, grid: int = 1) -> torch.Tensor:
        """(N, out_dim) pooled over the whole map, or with `grid` > 1 (N, grid^2, out_dim): the
        map average-pooled to grid x grid cells (over time too in 3D), row by row."""
        features: torch.Tensor = self.stages(self.stem(x))
        if grid == 1:
            return self._normalise(features.flatten(2).mean(-1))
        if features.dim() == 5:
            pooled = F.adaptive_avg_pool3d(features, (1, grid, grid))
        else:
            pooled = F.adaptive_avg_pool2d(features, (grid, grid))
        return self._normalise(pooled.flatten(2).transpose(1, 2))

    def _normalise(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features (..., C) through `out_norm`, if any: every cell of every clip is one
        sample of the batch (an M x C x 1 x 1 map to the BatchNorm)."""
        if self.out_norm is None:
            return pooled
        normalised: torch.Tensor = self.out_norm(pooled.reshape(-1, pooled.shape[-1], 1, 1))
        return normalised.view(pooled.shape)


def use_fused_batchnorm(model: nn.Module, fused: bool) -> None:
    """`model.batchnorm`: torch's fused kernels where they exist (`fused`: CUDA, and CPU on one
    rank) or the explicit ops everywhere."""
    for module in model.modules():
        if isinstance(module, BatchNorm):
            module.fused = fused


def build_cnn(dims: int, in_channels: int, cfg: DictConfig) -> ResNet:
    return ResNet(
        dims,
        in_channels,
        width=cfg.width,
        layers=list(cfg.layers),
        block=cfg.get("block", "basic"),
        stem_kernel=cfg.get("stem_kernel", 3),
        stem_stride=cfg.get("stem_stride", 1),
        stem_pool=cfg.get("stem_pool", False),
        temporal_kernels=cfg.get("temporal_kernels"),
        separable_stem=cfg.get("separable_stem", False),
        out_norm=bool(cfg.get("out_norm", False)),
    )
