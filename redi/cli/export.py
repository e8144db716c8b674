"""``redi export MODEL --format onnx|openvino [--out FILE]``: the whole detector for the edge.

Self-contained: ``redi/cli/main.py`` registers it with ``COMMANDS.update(add_export_commands(sub))``.
After writing, the file is run once on a few of the model's own prompt images (or random images
when it has none) and the largest difference to the fp32 torch detector is printed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from redi.methods.base import AnomalyDetector, load_detector
from redi.methods.onnx import EXPORT_FORMATS, compare_with_torch, export_openvino, fp32, onnx_session

Handler = Callable[[argparse.Namespace], int]
_SUFFIX = {"onnx": ".onnx", "openvino": ".xml"}


def _check_images(detector: AnomalyDetector, count: int = 2) -> torch.Tensor:
    """Inputs for the parity check: the method's own examples (ReDi: bank images) or random ones."""
    examples = detector.example_images(count) if hasattr(detector, "example_images") else None
    if examples is not None and len(examples):
        return examples
    return torch.rand(count, 3, *detector.input_hw, generator=torch.Generator().manual_seed(0))


def _openvino_difference(detector: AnomalyDetector, xml: Path, images: torch.Tensor) -> dict[str, float]:
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(images.numpy())
    with fp32(detector):
        expected = detector.predict(images)
    return {"score": float(np.abs(result[compiled.output(0)] - expected.score.numpy()).max()),
            "anomaly_map": float(np.abs(result[compiled.output(1)] - expected.anomaly_map.numpy()).max())}


def _export(args: argparse.Namespace) -> int:
    model = Path(args.model)
    model_file = model / "detector.pt" if model.is_dir() else model
    detector = load_detector(model_file)
    out = Path(args.out) if args.out else model_file.with_suffix(_SUFFIX[args.format])
    images = _check_images(detector)
    height, width = detector.input_hw
    report: dict[str, Any] = {"format": args.format, "model": str(model_file), "image_size": detector.image_size,
                              "input_hw": [height, width], "aspect": detector.cfg.data.aspect,
                              "threshold": float(detector.threshold), "batch": "dynamic",
                              "input": f"images (B, 3, {height}, {width}) float32 in [0, 1] from "
                                       "redi.core.images.preprocess",
                              "outputs": ["score (B,)", f"anomaly_map (B, {height}, {width})"]}
    if args.format == "onnx":
        path = detector.export_onnx(out)
        difference = compare_with_torch(detector, onnx_session(path), images)
        files = [path]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = export_openvino(detector.export_onnx(Path(tmp) / "detector.onnx"), out)
        difference = _openvino_difference(detector, path, images)
        files = [path, path.with_suffix(".bin")]
    report.update({"files": {str(f): f.stat().st_size for f in files},
                   "max_abs_difference_to_torch_fp32": difference, "checked_on_images": int(images.shape[0])})
    print(json.dumps(report, indent=2))
    return 0


def add_export_commands(subparsers: Any) -> dict[str, Handler]:
    """Register ``redi export`` on the CLI's sub-parsers; return ``{"export": handler}``."""
    p = subparsers.add_parser("export", help="the whole detector as one ONNX or OpenVINO IR file, for the edge",
                              description="Exports self-map, prompt retrieval (with the prompt bank), both networks, "
                                          "anomaly map and score: (B, 3, H, W) float in [0, 1] from "
                                          "redi.core.images.preprocess -> score (B,), anomaly_map (B, H, W); fp32, "
                                          "dynamic batch. Metadata: image_size, input_hw, aspect, threshold, line, "
                                          "version.")
    p.add_argument("model", help="detector.pt or a run folder holding it")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="onnx")
    p.add_argument("--out", help="output file (default: beside the model, .onnx or .xml)")
    return {"export": _export}
