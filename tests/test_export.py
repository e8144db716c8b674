"""Export for the edge: the whole detector as ONNX equals the fp32 torch detector (onnxruntime)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from redi.core.config import profile_config
from redi.data.dataset import load_images
from redi.data.mvtec import MVTecCategory
from redi.methods.onnx import ExportError, onnx_session, run_onnx
from redi.methods.redi.export import ExportableHOG, export_onnx, exportable_selfmap, torch_fp32
from redi.methods.base import load_detector
from redi.methods.redi.detector import Detector
from redi.core.selfmaps import CannyMap, TorchHOG

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(trained_line, tmp_path_factory) -> dict:
    """The trained demo line's detector, its ONNX export and its test images (preprocessed)."""
    detector = load_detector(trained_line["detector"])
    path = export_onnx(detector, tmp_path_factory.mktemp("export") / "detector.onnx")
    category = MVTecCategory(trained_line["data"])
    images = load_images(category.test, detector.image_size)
    return {"detector": detector, "path": path, "session": onnx_session(path), "images": images}


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_scores_and_maps_equal_torch_fp32(exported, batch):
    detector, session, images = exported["detector"], exported["session"], exported["images"]
    trained_with = detector.cfg.model.recover.precision  # resolved at training: "bf16" or "fp32"
    for begin in range(0, images.shape[0] - batch + 1, max(batch, 7)):  # good and defective images
        x = images[begin:begin + batch]
        with torch_fp32(detector):
            expected = detector.predict(x)
        score, anomaly_map = run_onnx(session, x)
        assert score.shape == (batch,) and anomaly_map.shape == (batch, detector.image_size, detector.image_size)
        assert np.abs(score - expected.score.numpy()).max() < TOLERANCE
        assert np.abs(anomaly_map - expected.anomaly_map.numpy()).max() < TOLERANCE
    assert detector.cfg.model.recover.precision == trained_with  # torch_fp32 restored it


@pytest.mark.slow
def test_onnx_file_carries_threshold_size_and_line(exported):
    import onnx

    model = onnx.load(str(exported["path"]), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    detector = exported["detector"]
    assert float(meta["threshold"]) == float(detector.threshold)
    assert int(meta["image_size"]) == detector.image_size and meta["line"] == "bottle_caps"
    dims = model.graph.input[0].type.tensor_type.shape.dim
    size = detector.image_size
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, size, size]


@pytest.mark.slow
def test_redi_export_command_writes_a_checked_onnx_file(trained_line, tmp_path: Path, capsys):
    from redi.cli.main import main

    out = tmp_path / "caps.onnx"
    assert main(["export", str(trained_line["run"]), "--format", "onnx", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.is_file() and report["files"][str(out)] == out.stat().st_size
    assert report["max_abs_difference_to_torch_fp32"]["score"] < TOLERANCE


@pytest.mark.parametrize("batch, size", [(1, 128), (3, 128), (5, 100)])
def test_exportable_hog_equals_torch_hog(batch, size):
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    assert torch.equal(ExportableHOG()(x), TorchHOG()(x))


def test_canny_self_map_is_refused_with_the_fix():
    with pytest.raises(ExportError, match="selfmap.kind=hog"):
        exportable_selfmap(CannyMap())


@pytest.mark.parametrize("setting", ["recover off", "prompt none", "recover at 64 px"])
def test_other_configurations_export_and_match(setting, tmp_path: Path):
    """Recover net off (RD + L_S), the 'Free' zero prompt, and a recover net at a reduced
    input_size (antialiased resize, as the fast profile) export too (random weights)."""
    cfg = profile_config("tiny")
    if setting == "recover off":
        cfg.model.recover.enabled = False
    elif setting == "prompt none":
        cfg.model.prompt = "none"
    else:
        cfg.model.recover.input_size = 64
    detector = Detector(cfg, num_prompts=3)
    size = cfg.data.image_size
    detector.set_prompts(torch.randn(3, detector.backbone.embedding_dim), torch.rand(3, 3, size, size), ["a", "b", "c"])
    detector.threshold.fill_(0.5)
    session = onnx_session(export_onnx(detector.eval(), tmp_path / "d.onnx"))
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch_fp32(detector):
        expected = detector.predict(x)
    score, anomaly_map = run_onnx(session, x)
    assert np.abs(score - expected.score.numpy()).max() < TOLERANCE
    assert np.abs(anomaly_map - expected.anomaly_map.numpy()).max() < TOLERANCE
