"""The HIP recover network: Y = Dec(cat(N1(H), N2(X+))) (paper Sec. 3.1, Eq. 1-3).

Two independent UNet encoders at half the usual width (N1 for the self-generated map H, N2 for
the prompt image X+); their features are concatenated per scale (the Feature Fusion Block) and a
UNet decoder recovers the image. Choices the paper leaves open (documented in docs/method.md):
- depth and base width are parameters (paper-like: depth 5, base 32, i.e. 32-64-128-256-512 per
  encoder, so the fused features have the usual UNet's 64-...-1024 channels);
- skip connections carry the fused features (``fused_skips``; off = only the bottleneck is fused);
- the output is a sigmoid, since images live in [0, 1];
- ``work_size`` lets the net run at a lower resolution than the image (inputs are resized, the
  output is upsampled back): the main lever of the ``fast`` configuration on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DoubleConv(nn.Sequential):
    """Two 3x3 conv + BatchNorm + ReLU, the UNet building block."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNetEncoder(nn.Module):
    """A UNet encoder returning the feature map of every level (finest first)."""

    def __init__(self, in_channels: int, widths: list[int]) -> None:
        super().__init__()
        blocks = [DoubleConv(in_channels, widths[0])]
        blocks += [DoubleConv(widths[i - 1], widths[i]) for i in range(1, len(widths))]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for index, block in enumerate(self.blocks):
            if index > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            features.append(x)
        return features


class UNetDecoder(nn.Module):
    """A UNet decoder from fused multi-scale features to an RGB image in [0, 1]."""

    def __init__(self, fused_widths: list[int], out_channels: int = 3, use_skips: bool = True) -> None:
        super().__init__()
        self.use_skips = use_skips
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for level in range(len(fused_widths) - 1, 0, -1):
            coarse, fine = fused_widths[level], fused_widths[level - 1]
            self.ups.append(nn.ConvTranspose2d(coarse, fine, 2, stride=2))
            self.blocks.append(DoubleConv(fine * 2 if use_skips else fine, fine))
        self.head = nn.Conv2d(fused_widths[0], out_channels, 1)

    def forward(self, fused: list[torch.Tensor]) -> torch.Tensor:
        x = fused[-1]
        for step, (up, block) in enumerate(zip(self.ups, self.blocks)):
            x = up(x)
            if self.use_skips:
                x = torch.cat([x, fused[-2 - step]], dim=1)
            x = block(x)
        return torch.sigmoid(self.head(x))


class RecoverNet(nn.Module):
    """HIP: recover the image from its self-generated map and a normal prompt image.

    Args:
        selfmap_channels: channels of the self-generated map H (1 for HOG / edges).
        base_width: width of the first encoder level (paper: half of UNet's 64).
        depth: encoder levels; level i has ``base_width * 2**i`` channels.
        work_size: 0 to run at the input resolution, else the side the net runs at (the short side
            of a non-square input, the long one scaled alike to a multiple of 32).
        fused_skips: whether the decoder's skip connections carry the fused features.
    """

    def __init__(self, selfmap_channels: int = 1, base_width: int = 32, depth: int = 5,
                 work_size: int = 0, fused_skips: bool = True) -> None:
        super().__init__()
        widths = [base_width * 2**i for i in range(depth)]
        self.work_size = work_size
        self.downsampling = 2 ** (depth - 1)
        self.selfmap_encoder = UNetEncoder(selfmap_channels, widths)  # N1
        self.prompt_encoder = UNetEncoder(3, widths)  # N2
        self.decoder = UNetDecoder([2 * w for w in widths], out_channels=3, use_skips=fused_skips)
        self.to(memory_format=torch.channels_last)

    def work_hw(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (H, W) the net runs at for an input of ``size``: ``size`` itself without a work size."""
        height, width = int(size[0]), int(size[1])  # constants when traced for export (the size is fixed)
        if not self.work_size:
            return height, width
        if height == width:
            return self.work_size, self.work_size
        scale = self.work_size / min(height, width)
        return max(32, round(height * scale / 32) * 32), max(32, round(width * scale / 32) * 32)

    def forward(self, selfmap: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """Return the recovered image Y (B, 3, H, W) in [0, 1] at the input's resolution."""
        size = selfmap.shape[-2:]
        if selfmap.shape[-2:] != prompt.shape[-2:]:
            raise ValueError(f"self-map {tuple(selfmap.shape)} and prompt {tuple(prompt.shape)} differ in size")
        work = self.work_hw(tuple(size))
        if work != (int(size[0]), int(size[1])):
            selfmap = F.interpolate(selfmap, size=work, mode="bilinear", align_corners=False, antialias=True)
            prompt = F.interpolate(prompt, size=work, mode="bilinear", align_corners=False, antialias=True)
        if selfmap.shape[-1] % self.downsampling or selfmap.shape[-2] % self.downsampling:
            raise ValueError(f"recover net input side must be a multiple of {self.downsampling}, "
                             f"got {tuple(selfmap.shape[-2:])}")
        # channels-last is several times faster for these convolutions on CPU (oneDNN) and GPU
        selfmap = selfmap.contiguous(memory_format=torch.channels_last)
        prompt = prompt.contiguous(memory_format=torch.channels_last)
        fused = [torch.cat(pair, dim=1) for pair in zip(self.selfmap_encoder(selfmap), self.prompt_encoder(prompt))]
        recovered = self.decoder(fused).float().contiguous()
        if recovered.shape[-2:] != size:
            recovered = F.interpolate(recovered, size=size, mode="bilinear", align_corners=False)
        return recovered
