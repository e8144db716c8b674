"""The ONNX contract every method's export meets, and the runtimes that run it.

One graph from the preprocessed batch to the answer: ``images`` (B, 3, H, W) float in [0, 1]
(:func:`redi.core.images.preprocess`, at the model's ``input_hw``) -> ``score`` (B,) and
``anomaly_map`` (B, H, W), fp32, with a dynamic batch axis. A method writes it with ``detector.export_onnx(path)`` (ReDi's:
:mod:`redi.methods.redi.export`); :func:`onnx_session` / :func:`run_onnx` run it in onnxruntime,
:func:`export_openvino` converts it to OpenVINO IR, :func:`compare_with_torch` checks parity.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from redi.core.errors import RediError
from redi.methods.base import AnomalyDetector

EXPORT_FORMATS = ("onnx", "openvino")
OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAMES = ("score", "anomaly_map")


class ExportError(RediError):
    """The detector cannot be exported as asked (a part with no graph form, a missing package)."""


def export_openvino(onnx_path: str | Path, xml_path: str | Path) -> Path:
    """Convert an exported ONNX file to OpenVINO IR (``.xml`` + ``.bin`` beside it), fp32 weights."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise ExportError("OpenVINO is not installed; `pip install openvino` (it installs from PyPI)") from exc
    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(xml_path), compress_to_fp16=False)  # the default would halve the weights
    return xml_path


def onnx_session(path: str | Path, threads: int = 0):
    """An onnxruntime CPU session for an exported file (``threads`` 0: onnxruntime's default)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("onnxruntime is not installed; `pip install 'redi[export]'`") from exc
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(scores (B,), maps (B, H, W)) of a preprocessed batch through an onnxruntime session."""
    score, anomaly_map = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.float().cpu().numpy()})
    return score, anomaly_map


def compare_with_torch(detector: AnomalyDetector, session, images: torch.Tensor) -> dict[str, float]:
    """Max absolute differences of scores and maps between onnxruntime and the fp32 torch detector."""
    with fp32(detector):
        expected = detector.predict(images)
    score, anomaly_map = run_onnx(session, images)
    return {"score": float(np.abs(score - expected.score.numpy()).max()),
            "anomaly_map": float(np.abs(anomaly_map - expected.anomaly_map.numpy()).max())}


def fp32(detector: AnomalyDetector) -> contextlib.AbstractContextManager:
    """The detector computing in fp32 inside the block, as its exported graph does (a method
    without a reduced-precision path needs nothing)."""
    return detector.fp32() if hasattr(detector, "fp32") else contextlib.nullcontext(detector)
