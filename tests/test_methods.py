"""A method is one folder behind the detector protocol: a toy method registered here (no file of
redi changes) trains through ``redi train``'s path, and evaluation, the report, prediction, the
drift reference and the gate take it like ReDi."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
import torch
from torch import nn

from redi.core.config import RediConfig, profile_config
from redi.core.errors import ConfigError, WeightsError
from redi.core.images import preprocess
from redi.data.demo import make_demo_line
from redi.methods.base import (METHOD_REGISTRY, AnomalyDetector, DetectorOutput, Method, get_method, load_detector,
                               method_names, read_artifact, register_method, save_detector)
from redi.methods.common import calibrate_threshold, open_line, training_split
from redi.data.dataset import load_images


class MeanImageDetector(nn.Module):
    """Toy method: the map is each pixel's distance to the mean normal training image."""

    method = "toy_mean"

    def __init__(self, cfg: RediConfig) -> None:
        super().__init__()
        self.cfg, self.image_size, self.metadata, self.ids = cfg, cfg.data.image_size, {}, []
        self.input_hw = cfg.data.input_hw()
        self.register_buffer("mean", torch.zeros(3, *self.input_hw))
        self.register_buffer("threshold", torch.tensor(float("nan")))

    @property
    def fit_image_ids(self) -> list[str]:
        return list(self.ids)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return preprocess(images, self.input_hw, self.cfg.data.aspect)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, image_ids: Sequence[str] | None = None) -> DetectorOutput:
        maps = (x.to(self.mean.device) - self.mean).abs().mean(dim=1)
        return DetectorOutput(maps.flatten(1).amax(dim=1), maps, x.mean(dim=(2, 3)))

    def is_anomalous(self, scores: torch.Tensor) -> torch.Tensor:
        return scores > self.threshold

    def pictures(self, output: DetectorOutput) -> dict[str, torch.Tensor]:
        return {"mean normal": self.mean.expand(output.score.shape[0], -1, -1, -1)}

    def to_payload(self) -> dict[str, Any]:
        return {"state": {k: v.cpu() for k, v in self.state_dict().items()}, "ids": self.ids}

    @classmethod
    def from_payload(cls, payload: dict[str, Any], cfg: RediConfig, path: str | Path) -> "MeanImageDetector":
        detector = cls(cfg)
        detector.load_state_dict(payload["state"])
        detector.ids = list(payload["ids"])
        return detector


class MeanImage(Method):
    detector_class = MeanImageDetector

    def fit(self, data_root, out_dir, cfg, line=""):
        category = open_line(data_root, cfg)
        fit_on, held_out = training_split(category, cfg)
        detector = MeanImageDetector(cfg)
        detector.mean.copy_(load_images(fit_on, cfg.data.input_hw(), cfg.data.aspect).mean(dim=0))
        detector.ids = [s.image_id for s in fit_on]
        calibration = calibrate_threshold(detector, load_images(held_out, cfg.data.input_hw(), cfg.data.aspect), cfg)
        path = save_detector(detector, Path(out_dir) / "detector.pt",
                             {"line": line, "calibration": calibration, "version": "toy-1"})
        return {"detector": path}


@pytest.fixture(scope="module")
def toy_method():
    if "toy_mean" not in METHOD_REGISTRY:
        register_method("toy_mean")(MeanImage)
    return "toy_mean"


@pytest.fixture(scope="module")
def toy_line(tmp_path_factory, toy_method):
    from redi.workflow.stages import evaluate, train_all

    root = tmp_path_factory.mktemp("toy")
    data = root / "data"
    make_demo_line(data, "bottle_caps", n_train=16, n_test_good=4, n_test_defect=6, size=64, seed=0)
    cfg = profile_config("tiny")
    cfg.model.method, cfg.data.image_size, cfg.train.device = toy_method, 64, "cpu"
    cfg.data.min_val_images = 4
    paths = train_all(data, root / "run", cfg, line="toy_line")
    metrics = evaluate(paths["detector"], data, root / "eval", cfg)
    return {"root": root, "data": data, "cfg": cfg, "paths": paths, "metrics": metrics}


def test_the_registry_lists_redi_and_refuses_an_unknown_method_by_name(toy_method):
    assert "redi" in method_names() and toy_method in method_names()
    with pytest.raises(ConfigError, match="model.method.*choose one of"):
        get_method("no_such_method")


def test_a_registered_method_trains_and_reloads_through_the_one_artifact_format(toy_line):
    path = toy_line["paths"]["detector"]
    payload = read_artifact(path)
    assert payload["method"] == "toy_mean" and payload["metadata"]["method"] == "toy_mean"
    detector = load_detector(path)
    assert isinstance(detector, MeanImageDetector) and isinstance(detector, AnomalyDetector)
    assert detector.cfg.model.method == "toy_mean" and np.isfinite(float(detector.threshold))
    assert (toy_line["paths"]["manifest"]).is_file()  # the data check ran before the method's fit


def test_evaluate_and_the_report_take_any_method(toy_line):
    metrics = json.loads(Path(toy_line["metrics"]).read_text())
    point = metrics["operating_point"]
    assert point["tp"] + point["fn"] == 6 and point["fp"] + point["tn"] == 4
    assert metrics["threshold_policy"] == toy_line["cfg"].eval.threshold_policy
    strips = sorted((toy_line["root"] / "eval" / "report" / "images").glob("strip_*.png"))
    assert strips, "the report drew no image strip"
    width = np.asarray(__import__("PIL.Image").Image.open(strips[0])).shape[1]
    assert width == 4 * 64 + 3 * 2  # input | ground truth | map | the method's one picture ("mean normal")
    scores = json.loads((toy_line["root"] / "eval" / "scores.json").read_text())
    assert len(scores) == 10 and all(row["threshold"] == metrics["threshold"] for row in scores)


def test_predict_and_the_drift_reference_take_any_method(toy_line):
    from redi.ops.monitoring import build_reference
    from redi.workflow.predict import predict_paths

    test_dir = toy_line["data"] / "test"
    rows = predict_paths(toy_line["paths"]["detector"], [test_dir], toy_line["root"] / "pred", device="cpu")
    assert len(rows) == 10 and all(np.isfinite(r["score"]) for r in rows)
    reference = build_reference(toy_line["paths"]["detector"], toy_line["data"], toy_line["root"] / "ref.csv",
                                toy_line["cfg"])
    assert Path(reference).is_file() and len(Path(reference).read_text().splitlines()) == 17  # header + 16 normals


def test_the_gate_judges_any_method_at_its_served_threshold(toy_line):
    from redi.ops.gate import GatePolicy, gate_model
    from redi.ops.model_registry import production_record
    from redi.ops.object_store import LocalStore

    store = LocalStore(toy_line["root"] / "store")
    policy = GatePolicy(**{**dataclasses.asdict(toy_line["cfg"].gate), "min_recall": 0.0, "max_false_call_rate": 1.0})
    decision = gate_model("toy_line", toy_line["paths"]["detector"], toy_line["metrics"], toy_line["data"],
                          toy_line["cfg"], policy, store, toy_line["root"] / "decision.json")
    assert decision["promote"], decision["reasons"]
    assert production_record(store, "toy_line")["version"] == decision["version"]
    # the line's own minimums: the toy catches too few defects at its served threshold
    metrics = json.loads(Path(toy_line["metrics"]).read_text())
    assert metrics["operating_point"]["recall"] < toy_line["cfg"].gate.min_recall
    refused = gate_model("toy_line", toy_line["paths"]["detector"], toy_line["metrics"], toy_line["data"],
                         toy_line["cfg"], GatePolicy(**dataclasses.asdict(toy_line["cfg"].gate)),
                         LocalStore(toy_line["root"] / "store2"), toy_line["root"] / "decision2.json")
    assert not refused["promote"]
    assert any("recall" in r and "served threshold" in r for r in refused["reasons"]), refused["reasons"]


def test_an_artifact_of_an_unknown_method_says_so(tmp_path, toy_line):
    payload = read_artifact(toy_line["paths"]["detector"])
    payload["method"] = "from_the_future"
    torch.save(payload, tmp_path / "detector.pt")
    with pytest.raises(WeightsError, match="from_the_future.*upgrade redi"):
        load_detector(tmp_path / "detector.pt")
