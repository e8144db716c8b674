"""The fused detector: several fitted detectors of one line, their anomaly maps standardised on
the held-out normals and averaged.

Each part's map is turned into ``(map - mean) / std``, its pixels' mean and standard deviation
over the line's held-out normal images (the images that set the threshold, never fitted on), so
a part whose distances run on another scale weighs the same; the fused map is the mean of the
standardised maps and the image score comes from it as ReDi's does (``model.image_score``: by
default the mean of its top 1 % of pixels). ReDi and PatchCore make different errors
(feature reconstruction against a memory of normal patches), which the average can cancel.

It meets :class:`redi.methods.base.AnomalyDetector`; it sees its parts only through that protocol,
and its artifact holds each part's own payload, config and metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from redi.core.config import RediConfig, from_dict, to_dict
from redi.core.errors import WeightsError
from redi.core.maps import image_scores
from redi.methods.base import AnomalyDetector, DetectorOutput, get_method
from redi.methods.onnx import ExportError


@dataclass
class FusedOutput(DetectorOutput):
    """The fused output and each part's own (for its pictures)."""

    parts: list[DetectorOutput] = field(default_factory=list)


class FusedDetector(nn.Module):
    """Average of standardised part maps; see the module docstring."""

    method = "fused"

    def __init__(self, cfg: RediConfig, parts: Sequence[AnomalyDetector]) -> None:
        super().__init__()
        if len(parts) < 2:
            raise WeightsError("a fused detector needs at least two parts")
        sizes = {tuple(p.input_hw) for p in parts}
        aspects = {p.cfg.data.aspect for p in parts}
        if len(sizes) != 1 or len(aspects) != 1:
            raise WeightsError(f"fused parts must read images alike; got input sizes {sorted(sizes)} and aspects "
                               f"{sorted(aspects)}")
        ids = [sorted(p.fit_image_ids) for p in parts]
        if any(i != ids[0] for i in ids):
            raise WeightsError("fused parts were fitted on different training images (another seed or "
                               "data.val_fraction?); fit them on one split")
        self.cfg = cfg
        self.parts = nn.ModuleList(parts)  # type: ignore[arg-type]
        self.input_hw = sizes.pop()
        self.image_size = int(parts[0].image_size)
        self.register_buffer("map_mean", torch.zeros(len(parts)))
        self.register_buffer("map_std", torch.ones(len(parts)))
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.metadata: dict[str, Any] = {}

    @property
    def part_names(self) -> list[str]:
        return [p.method for p in self.parts]

    @property
    def fit_image_ids(self) -> list[str]:
        """The parts' common training images."""
        return list(self.parts[0].fit_image_ids)

    @property
    def backbone(self) -> nn.Module:
        """The first part's backbone (its pooled embedding is the fused detector's)."""
        return self.parts[0].backbone

    def set_standardisation(self, normal_maps: Sequence[torch.Tensor]) -> None:
        """Each part's pixel mean and standard deviation over its maps of the held-out normals."""
        for i, maps in enumerate(normal_maps):
            self.map_mean[i] = maps.float().mean()
            self.map_std[i] = maps.float().std().clamp_min(1e-6)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, image_ids: Sequence[str] | None = None) -> FusedOutput:
        """Every part's predict, standardised and averaged."""
        self.eval()
        outputs = [part.predict(x, image_ids=image_ids) for part in self.parts]
        device = self.threshold.device
        fused = sum((out.anomaly_map.float().to(device) - self.map_mean[i]) / self.map_std[i]
                    for i, out in enumerate(outputs)) / len(outputs)
        score = image_scores(fused, self.cfg.model.image_score, self.cfg.model.image_score_share)
        return FusedOutput(score, fused, outputs[0].embedding, parts=outputs)

    def pictures(self, output: DetectorOutput) -> dict[str, torch.Tensor]:
        """The parts' pictures, each named after its part."""
        if not isinstance(output, FusedOutput):
            return {}
        return {f"{part.method}: {name}": picture for part, out in zip(self.parts, output.parts)
                for name, picture in part.pictures(out).items()}

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """The parts' one preprocessing (they are checked to read images alike)."""
        return self.parts[0].preprocess(images)

    def is_anomalous(self, scores: torch.Tensor) -> torch.Tensor:
        """Decision: score above the calibrated threshold."""
        if math.isnan(float(self.threshold)):
            raise WeightsError("the detector has no calibrated threshold; finish training first")
        return scores > self.threshold.to(scores.device)

    def export_onnx(self, path: str | Path) -> Path:
        raise ExportError("a fused detector has no single-graph ONNX export yet; serve it with the torch runtime "
                          "(REDI_RUNTIME=torch, the default) or export its parts (`redi export` on each candidate)")

    def to_payload(self) -> dict[str, Any]:
        """Each part's payload, config and metadata; the standardisation and the threshold."""
        return {"parts": [{"method": p.method, "config": to_dict(p.cfg), "metadata": dict(p.metadata),
                           "payload": p.to_payload()} for p in self.parts],
                "map_mean": self.map_mean.detach().cpu(), "map_std": self.map_std.detach().cpu(),
                "threshold": self.threshold.detach().cpu()}

    @classmethod
    def from_payload(cls, payload: dict[str, Any], cfg: RediConfig, path: str | Path) -> "FusedDetector":
        """Rebuild every part with its own method, then the fused detector."""
        parts = []
        for entry in payload["parts"]:
            method = get_method(entry["method"])
            part_cfg = from_dict(method.upgrade_config(entry["config"]))
            part = method.detector_class.from_payload(entry["payload"], part_cfg, path)
            part.metadata = dict(entry["metadata"])
            parts.append(part.eval())
        detector = cls(cfg, parts)
        detector.map_mean.copy_(payload["map_mean"])
        detector.map_std.copy_(payload["map_std"])
        detector.threshold.fill_(float(payload["threshold"]))
        return detector
