"""Anomaly-map post-processing every method shares: Gaussian smoothing of (B, 1, H, W) maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GaussianBlur(nn.Module):
    """Separable Gaussian smoothing of (B, 1, H, W) maps with reflect padding."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma
        radius = max(1, int(4 * sigma + 0.5))
        coords = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-coords**2 / (2 * sigma**2)) if sigma > 0 else (coords == 0).float()
        self.register_buffer("kernel", (kernel / kernel.sum()).view(1, 1, 1, -1), persistent=False)
        self.radius = radius

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if self.sigma <= 0:
            return maps
        # Reflect padding needs pad < size; clamp for tiny maps.
        pad = min(self.radius, maps.shape[-1] - 1, maps.shape[-2] - 1)
        kernel = self.kernel.to(maps.dtype)
        if pad < self.radius:
            kernel = kernel[..., self.radius - pad:self.radius + pad + 1]
            kernel = kernel / kernel.sum()
        maps = F.conv2d(F.pad(maps, (pad, pad, 0, 0), mode="reflect"), kernel)
        return F.conv2d(F.pad(maps, (0, 0, pad, pad), mode="reflect"), kernel.transpose(-1, -2))
