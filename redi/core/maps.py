"""Anomaly-map post-processing every method shares: Gaussian smoothing of (B, 1, H, W) maps and
the image score read from a map."""

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


IMAGE_SCORES = ("max", "top_mean")  # model.image_score


def image_scores(maps: torch.Tensor, how: str = "max", share: float = 0.01) -> torch.Tensor:
    """(B,) image scores of (B, H, W) maps: the maximum, or the mean of the top ``share`` of pixels
    (``top_mean``: one hot pixel of noise no longer decides alone; a defect of that many pixels does)."""
    flat = maps.flatten(1)
    if how == "max":
        return flat.amax(dim=1)
    if how == "top_mean":
        k = max(1, int(share * flat.shape[1]))
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ValueError(f"image score {how!r} is not one of {IMAGE_SCORES}")
