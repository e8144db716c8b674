"""The PatchCore detector: the backbone's locally aware patch features against a memory bank of
normal patches (:mod:`redi.methods.patchcore.memory_bank`).

X -> backbone(X) -> levels ``model.patchcore.levels`` averaged 3x3, resized to the first one's
grid and concatenated -> each patch's distance to its nearest bank row is the patch score -> the
map is those scores resized to the image (bilinear) and Gaussian-smoothed (sigma
``model.gaussian_sigma``, 4 as in the paper); the image score is the reweighted maximum (eq. 7).
The bank rows remember which training image they came from, so a training image scored by name
(``predict(x, image_ids=...)``) is never matched with its own patches.

It meets :class:`redi.methods.base.AnomalyDetector`; its part of the artifact is the bank, its
sources and support sets (:meth:`PatchCoreDetector.to_payload`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from redi.core.backbones import build_backbone
from redi.core.config import RediConfig
from redi.core.errors import InputError, WeightsError
from redi.core.images import preprocess
from redi.core.maps import GaussianBlur
from redi.methods.base import DetectorOutput
from redi.methods.patchcore.memory_bank import locally_aware_features, nearest_neighbors, reweighted_scores


class PatchCoreDetector(nn.Module):
    """PatchCore inference module; see the module docstring for the data flow."""

    method = "patchcore"

    def __init__(self, cfg: RediConfig, bank_size: int = 0, support_size: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_size = cfg.data.image_size
        self.input_hw = cfg.data.input_hw()  # (H, W): (S, S), or the line's canvas for data.aspect=native
        self.backbone = build_backbone(cfg.model.backbone, cfg.model.backbone_weights or None)
        self.levels = tuple(cfg.model.patchcore.levels)
        dim = sum(self.backbone.channels[level] for level in self.levels)
        self.register_buffer("memory_bank", torch.zeros(bank_size, dim))
        self.register_buffer("bank_sources", torch.zeros(bank_size, dtype=torch.long))  # index into fit ids
        self.register_buffer("bank_support", torch.zeros(bank_size, support_size, dtype=torch.long))
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.blur = GaussianBlur(cfg.model.gaussian_sigma)
        self.image_ids: list[str] = []
        self.metadata: dict[str, Any] = {}

    @property
    def fit_image_ids(self) -> list[str]:
        """The training images whose patches the bank was drawn from."""
        return list(self.image_ids)

    def set_bank(self, bank: torch.Tensor, sources: torch.Tensor, support: torch.Tensor, image_ids: Sequence[str]) -> None:
        """Install the memory bank (K, D), each row's source image (K,), support sets (K, b) and the fit ids."""
        device = self.threshold.device
        self.memory_bank = bank.float().to(device)
        self.bank_sources = sources.long().to(device)
        self.bank_support = support.long().to(device)
        self.image_ids = list(image_ids)

    def patch_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, D, h, w) locally aware patch features, (B, E) pooled embedding) of a batch."""
        out = self.backbone(x)
        return locally_aware_features([out.features[level] for level in self.levels]), out.embedding

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse tensors the detector was not built for, with a message that says what to do."""
        expected = (3, *self.input_hw)
        if not torch.is_tensor(x) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise InputError(f"the detector takes a (B, 3, {self.input_hw[0]}, {self.input_hw[1]}) float batch in [0, 1], "
                             f"got {shape}; use detector.preprocess() to convert and resize images")
        if not x.dtype.is_floating_point:
            raise InputError(f"the detector takes float images in [0, 1], got {x.dtype}; divide uint8 by 255")

    def forward(self, x: torch.Tensor, exclude: torch.Tensor | None = None) -> DetectorOutput:
        """Score a batch; ``exclude[i]`` is image i's index in the fit ids (-1: none), whose patches it may not match."""
        self.check_input(x)
        if self.memory_bank.shape[0] == 0:
            raise WeightsError("the PatchCore detector has an empty memory bank; fit it first (`redi train`)")
        features, embedding = self.patch_features(x)
        batch, dim, h, w = features.shape
        flat = features.permute(0, 2, 3, 1).reshape(batch * h * w, dim)
        excluded = None
        if exclude is not None and bool((exclude >= 0).any()):
            per_patch = exclude.repeat_interleave(h * w)
            excluded = per_patch.unsqueeze(1) == self.bank_sources.unsqueeze(0)
        distances, nearest = nearest_neighbors(flat, self.memory_bank, 1, excluded)
        distances, nearest = distances.view(batch, h * w), nearest.view(batch, h * w)
        score = reweighted_scores(flat.view(batch, h * w, dim), distances, nearest, self.memory_bank,
                                  self.bank_support)
        maps = F.interpolate(distances.view(batch, 1, h, w), size=self.input_hw, mode="bilinear", align_corners=False)
        return DetectorOutput(score, self.blur(maps).squeeze(1), embedding.float())

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, image_ids: Sequence[str] | None = None) -> DetectorOutput:
        """Inference: eval mode, no autograd, input moved to the detector's device. A training image
        named in ``image_ids`` is never matched with its own patches."""
        self.eval()
        device = self.threshold.device
        exclude = None
        if image_ids is not None:
            index = {image_id: i for i, image_id in enumerate(self.image_ids)}
            exclude = torch.tensor([index.get(i, -1) for i in image_ids], dtype=torch.long, device=device)
        return self(x.to(device), exclude)

    def pictures(self, output: DetectorOutput) -> dict[str, torch.Tensor]:
        """No intermediate image: the patch-distance map is the anomaly map itself."""
        return {}

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 RGB arrays of any size -> ``(B, 3, H, W)`` float batch: :func:`redi.core.images.preprocess`."""
        return preprocess(images, self.input_hw, self.cfg.data.aspect)

    def is_anomalous(self, scores: torch.Tensor) -> torch.Tensor:
        """Decision: score above the calibrated threshold."""
        if math.isnan(float(self.threshold)):
            raise WeightsError("the detector has no calibrated threshold; finish training first")
        return scores > self.threshold.to(scores.device)

    def example_images(self, count: int) -> torch.Tensor:
        """Inputs for an export parity check: smooth random images (the bank keeps no pixels)."""
        generator = torch.Generator().manual_seed(0)
        coarse = torch.rand(count, 3, 8, 8, generator=generator)
        return F.interpolate(coarse, size=self.input_hw, mode="bilinear", align_corners=False)

    def export_onnx(self, path: str | Path) -> Path:
        """The whole detector as one fp32 ONNX graph (:func:`redi.methods.patchcore.export.export_onnx`)."""
        from redi.methods.patchcore.export import export_onnx

        return export_onnx(self, path)

    # -- the artifact file ----------------------------------------------------------------
    def to_payload(self) -> dict[str, Any]:
        """PatchCore's part of the artifact: the bank, its sources and support sets, the fit ids."""
        return {"backbone_channels": list(self.backbone.channels), "image_ids": self.image_ids,
                "memory_bank": self.memory_bank.detach().cpu(), "bank_sources": self.bank_sources.detach().cpu(),
                "bank_support": self.bank_support.detach().cpu(), "threshold": self.threshold.detach().cpu()}

    @classmethod
    def from_payload(cls, payload: dict[str, Any], cfg: RediConfig, path: str | Path) -> "PatchCoreDetector":
        """Rebuild a saved detector; the backbone's weights come from its package or file."""
        bank = payload["memory_bank"]
        detector = cls(cfg, bank.shape[0], payload["bank_support"].shape[1])
        if list(detector.backbone.channels) != list(payload["backbone_channels"]):
            raise WeightsError(f"{path} was fitted on backbone channels {payload['backbone_channels']}, "
                               f"but {cfg.model.backbone} gives {list(detector.backbone.channels)}")
        if bank.shape[1] != detector.memory_bank.shape[1]:
            raise WeightsError(f"{path} has {bank.shape[1]}-d bank rows but levels {list(detector.levels)} of "
                               f"{cfg.model.backbone} give {detector.memory_bank.shape[1]}; refit it")
        detector.set_bank(bank, payload["bank_sources"], payload["bank_support"], payload["image_ids"])
        detector.threshold.fill_(float(payload["threshold"]))
        return detector
