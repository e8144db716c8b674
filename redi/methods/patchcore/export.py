"""Export the PatchCore detector as one ONNX graph (the contract of :mod:`redi.methods.onnx`).

Inside: the backbone, the locally aware patch features, the distances to the memory bank (one
matmul, the bank a constant of the graph), the nearest row of each patch, the reweighted image
score (support sets gathered from a constant) and the resized, smoothed map. The distance matrix
of a batch is B x patches x bank floats (8 x 1024 x 4700 = 154 MB at the dev sets' size): serve
large banks in small batches. TorchScript exporter (``dynamo=False``), as ReDi's export.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from redi.core.utils import atomic_write
from redi.methods.onnx import INPUT_NAME, OPSET, OUTPUT_NAMES
from redi.methods.patchcore.memory_bank import squared_distances

if TYPE_CHECKING:
    from redi.methods.patchcore.detector import PatchCoreDetector


class ExportablePatchCore(nn.Module):
    """The detector's forward pass written without chunking or exclusion (what a served image needs)."""

    def __init__(self, detector: PatchCoreDetector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.detector
        features, _ = d.patch_features(x)
        batch, dim, h, w = features.shape
        flat = features.permute(0, 2, 3, 1).reshape(-1, dim)
        d2 = squared_distances(flat, d.memory_bank)
        nearest_d2, nearest = d2.min(dim=1)
        distances = nearest_d2.sqrt().view(batch, h * w)
        nearest = nearest.view(batch, h * w)
        worst = distances.argmax(dim=1, keepdim=True)  # (B, 1)
        s_star = distances.gather(1, worst).squeeze(1)
        m_test = features.permute(0, 2, 3, 1).reshape(batch, h * w, dim)
        m_test = m_test.gather(1, worst.unsqueeze(-1).expand(batch, 1, dim))  # (B, 1, D)
        support = d.bank_support[nearest.gather(1, worst).squeeze(1)]  # (B, b)
        neighbours = d.memory_bank[support]  # (B, b, D)
        distance = (neighbours - m_test).pow(2).sum(dim=-1).sqrt()
        score = (1.0 - torch.softmax(distance, dim=1)[:, 0]) * s_star
        maps = F.interpolate(distances.view(batch, 1, h, w), size=d.input_hw, mode="bilinear", align_corners=False)
        return score, d.blur(maps).squeeze(1)


def export_onnx(detector: PatchCoreDetector, path: str | Path, opset: int = OPSET) -> Path:
    """Write the detector as one ONNX file with a dynamic batch axis (metadata as ReDi's export)."""
    import onnx

    module = ExportablePatchCore(detector.cpu().eval())
    height, width = detector.input_hw
    example = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    dynamic = {INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"}, OUTPUT_NAMES[1]: {0: "batch"}}
    meta = detector.metadata
    properties = {"redi_format": "redi-detector-onnx", "method": "patchcore", "image_size": str(detector.image_size),
                  "input_hw": f"{height}x{width}", "aspect": detector.cfg.data.aspect,
                  "threshold": repr(float(detector.threshold)), "line": str(meta.get("line", "")),
                  "version": str(meta.get("version", "")), "backbone": str(meta.get("backbone", ""))}

    def write(tmp: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(tmp), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_axes=dynamic, opset_version=opset, dynamo=False, do_constant_folding=True)
        model = onnx.load(str(tmp))
        for key, value in properties.items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(tmp))

    return atomic_write(Path(path), write)
