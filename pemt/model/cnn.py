"""Clip encoders: a 3D ResNet over video clips and a 2D ResNet over log-mel spectrograms.

One residual network written once for both: `dims` picks 2D or 3D convolutions. Widths double
per stage and the spatial (and, for video, temporal) size halves from the second stage on.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv3d if dims == 3 else nn.Conv2d


def _norm(dims: int) -> type[nn.Module]:
    return nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d


class BasicBlock(nn.Module):
    def __init__(self, dims: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        conv, norm = _conv(dims), _norm(dims)
        self.body = nn.Sequential(
            conv(cin, cout, 3, stride=stride, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True),
            conv(cout, cout, 3, padding=1, bias=False), norm(cout),
        )
        self.skip = (nn.Identity() if stride == 1 and cin == cout
                     else nn.Sequential(conv(cin, cout, 1, stride=stride, bias=False), norm(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class ResNet(nn.Module):
    """Stem, `stages` residual stages, global average pool -> (N, out_dim)."""

    def __init__(self, dims: int, in_channels: int, width: int, stages: int, blocks_per_stage: int = 1) -> None:
        super().__init__()
        conv, norm = _conv(dims), _norm(dims)
        self.stem = nn.Sequential(conv(in_channels, width, 3, padding=1, bias=False), norm(width), nn.ReLU(inplace=True))
        layers, cin = [], width
        for stage in range(stages):
            cout = width * 2 ** stage
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(dims, cin, cout, stride))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).flatten(2).mean(-1)
