"""The discriminate network's trainable part (paper Sec. 3.2, Eq. 5).

The frozen backbone gives R_Y = {R_Y^1..n} of the recovered image. Each level is brought down to
one common, smaller scale (half the deepest level's resolution, as in Reverse Distillation's
one-class bottleneck) by stride-2 3x3 convolutions + BatchNorm + ReLU, the results are
concatenated and fused by a 1x1 convolution. The Feature Recovery Block (FRB) then decodes that
bottleneck with transposed convolutions back to F_Y = {F_Y^1..n}, each of the shape of the
reference feature F_X^i. Works for any backbone's channel widths and any number of levels whose
strides double from one to the next.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class FeatureAggregation(nn.Module):
    """Down-sample every level to half the deepest level's resolution and fuse them."""

    def __init__(self, channels: tuple[int, ...], bottleneck_channels: int) -> None:
        super().__init__()
        per_level = max(bottleneck_channels // 2, 8)
        self.branches = nn.ModuleList()
        for level, in_channels in enumerate(channels):
            steps = len(channels) - level  # stride-2 convs to reach 2x the deepest stride
            layers, width = [], in_channels
            for _ in range(steps):
                layers.append(_conv_bn_relu(width, per_level, stride=2))
                width = per_level
            self.branches.append(nn.Sequential(*layers))
        self.fuse = nn.Sequential(
            nn.Conv2d(per_level * len(channels), bottleneck_channels, 1, bias=False),
            nn.BatchNorm2d(bottleneck_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.fuse(torch.cat([branch(f) for branch, f in zip(self.branches, features)], dim=1))


class FeatureRecoveryBlock(nn.Module):
    """Decode the bottleneck back to the reference feature shapes, deepest level first."""

    def __init__(self, channels: tuple[int, ...], bottleneck_channels: int) -> None:
        super().__init__()
        self.ups = nn.ModuleList()
        self.refines = nn.ModuleList()
        self.heads = nn.ModuleList()
        width = bottleneck_channels
        for out_channels in reversed(channels):
            self.ups.append(nn.Sequential(
                nn.ConvTranspose2d(width, out_channels, 2, stride=2, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ))
            self.refines.append(_conv_bn_relu(out_channels, out_channels))
            # A linear head: backbone features can be negative (e.g. EfficientNet's linear blocks).
            self.heads.append(nn.Conv2d(out_channels, out_channels, 3, padding=1))
            width = out_channels

    def forward(self, bottleneck: torch.Tensor) -> list[torch.Tensor]:
        outputs, x = [], bottleneck
        for up, refine, head in zip(self.ups, self.refines, self.heads):
            x = refine(up(x))
            outputs.append(head(x))
        return outputs[::-1]  # finest level first, like the backbone


class DiscriminateHead(nn.Module):
    """R_Y -> F_Y. With ``use_frb=False`` (paper Table 11) F_Y is R_Y itself and nothing trains.

    ``dropout`` (``model.bottleneck_dropout``) drops bottleneck features while training only.
    """

    def __init__(self, channels: tuple[int, ...], bottleneck_channels: int = 0, use_frb: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.use_frb = use_frb
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        bottleneck_channels = bottleneck_channels or channels[-1]
        if use_frb:
            self.aggregate = FeatureAggregation(channels, bottleneck_channels)
            self.recover_features = FeatureRecoveryBlock(channels, bottleneck_channels)

    def forward(self, recovered_features: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.use_frb:
            return list(recovered_features)
        return self.recover_features(self.dropout(self.aggregate(recovered_features)))
