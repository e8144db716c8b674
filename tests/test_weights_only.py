"""Detector files are data, never code (issue 18, item 11): every torch file redi reads is loaded
weights-only, so a file crafted to run code when unpickled (placed in the store by anyone who can
write to it) is refused unread, and the sha256 check stays. Real artifacts of every method (redi,
patchcore, fused) still round-trip, and a trusted file from an older redi converts with one command."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from redi.core.errors import WeightsError
from redi.core.utils import atomic_torch_save, load_torch_file, plain_data
from redi.methods.base import load_detector, read_artifact, save_detector
from redi.ops.model_registry import fetch_production_detector, promote, publish_version
from redi.ops.object_store import LocalStore

REDI = Path(sys.executable).parent / "redi"


class WritesMarker:
    """What an attacker pickles: unpickling it calls ``exec``, which writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def _malicious_artifact(path: Path, marker: Path, like: Path) -> Path:
    """A real detector file with one object that runs code when unpickled, in its metadata."""
    payload = torch.load(like, weights_only=True)
    payload["metadata"]["note"] = WritesMarker(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)  # plain torch.save: what a hostile writer to the store does
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, demo_line_root):
    """redi, patchcore and fused candidates fitted once (tiny profile) on the demo line."""
    from redi.core.config import load_config
    from redi.workflow.stages import train_all

    out = tmp_path_factory.mktemp("weights-only")
    cfg = load_config(profile="tiny", overrides=["model.candidates=[redi,patchcore,fused]", "data.val_fraction=0.3"])
    paths = train_all(demo_line_root, out, cfg, line="caps")
    return {"cfg": cfg, "data": demo_line_root,
            "detectors": {m: Path(paths[f"candidate_{m}"]) for m in ("redi", "patchcore", "fused")}}


@pytest.mark.parametrize("method", ["redi", "patchcore", "fused"])
def test_every_method_round_trips_through_a_weights_only_file(fitted, method, tmp_path):
    from redi.data.dataset import load_images
    from redi.data.mvtec import MVTecCategory

    path = fitted["detectors"][method]
    payload = torch.load(path, weights_only=True)  # torch's own safe loader reads the whole file
    assert payload["method"] == method
    detector = load_detector(path)
    images = load_images(MVTecCategory(fitted["data"]).test[:4], detector.image_size)
    before = detector.predict(images)
    again = load_detector(save_detector(detector, tmp_path / "again.pt"))
    after = again.predict(images)
    assert torch.equal(before.score, after.score) and torch.equal(before.anomaly_map, after.anomaly_map)
    assert float(again.threshold) == float(detector.threshold) and again.metadata == detector.metadata


def test_a_malicious_detector_in_the_store_is_refused_and_never_runs(fitted, tmp_path):
    """The service's and the gate's path: fetch the production detector (sha256 checked), load it."""
    marker = tmp_path / "code-ran"
    evil = _malicious_artifact(tmp_path / "evil" / "detector.pt", marker, fitted["detectors"]["patchcore"])
    store = LocalStore(tmp_path / "store")
    # whoever can write to the store can also write a matching index: the hash alone cannot stop this
    publish_version(store, "caps", "v-evil", {"detector.pt": evil}, {"promote": True, "metrics": {}})
    promote(store, "caps", "v-evil", reason="a hostile writer")
    fetched, _ = fetch_production_detector(store, "caps", tmp_path / "fetched.pt")
    with pytest.raises(WeightsError, match="redi refused to load it, because loading such a file can run any code"):
        load_detector(fetched)
    with pytest.raises(WeightsError, match="convert-artifact"):
        read_artifact(fetched)
    assert not marker.exists()


def test_the_gate_refuses_a_malicious_production_model_without_running_it(fitted, tmp_path):
    """The gate scores production again on the candidate's data: that load must not run code either."""
    from redi.ops.gate import GatePolicy, gate_model
    from redi.workflow.stages import evaluate

    marker = tmp_path / "code-ran"
    evil = _malicious_artifact(tmp_path / "evil" / "detector.pt", marker, fitted["detectors"]["patchcore"])
    store = LocalStore(tmp_path / "store")
    publish_version(store, "caps", "v-evil", {"detector.pt": evil}, {"promote": True, "metrics": {}})
    promote(store, "caps", "v-evil", reason="a hostile writer")
    candidate = fitted["detectors"]["patchcore"]
    metrics = evaluate(candidate, fitted["data"], tmp_path / "eval", fitted["cfg"], write_report=False)
    with pytest.raises(WeightsError, match="refused to load it"):
        gate_model("caps", candidate, metrics, fitted["data"], fitted["cfg"], GatePolicy(), store,
                   tmp_path / "decision.json")
    assert not marker.exists()


def test_the_command_line_refuses_a_malicious_file_and_names_the_fix(fitted, tmp_path):
    marker = tmp_path / "code-ran"
    evil = _malicious_artifact(tmp_path / "evil.pt", marker, fitted["detectors"]["patchcore"])
    done = subprocess.run([str(REDI), "evaluate", str(evil), str(fitted["data"]), "--out", str(tmp_path / "eval"),
                           "--no-report"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "can run any code" in done.stderr and "Traceback" not in done.stderr
    assert f"redi model convert-artifact {evil} --trust" in done.stderr
    assert not marker.exists()


def test_a_trusted_old_artifact_converts_with_one_explicit_command(fitted, tmp_path):
    """An older redi could leave numpy numbers in a file's metadata: refused, then converted on purpose."""
    old = tmp_path / "old.pt"
    payload = torch.load(fitted["detectors"]["patchcore"], weights_only=True)
    payload["metadata"]["calibration_q"] = np.float64(0.25)
    payload["metadata"]["counts"] = np.arange(3)
    torch.save(payload, old)
    with pytest.raises(WeightsError, match="convert-artifact"):
        load_detector(old)
    refused = subprocess.run([str(REDI), "model", "convert-artifact", str(old)], capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "--trust" in refused.stderr
    done = subprocess.run([str(REDI), "model", "convert-artifact", str(old), "--out", str(tmp_path / "new.pt"),
                           "--trust"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    converted = load_detector(tmp_path / "new.pt")
    assert converted.metadata["calibration_q"] == 0.25 and isinstance(converted.metadata["calibration_q"], float)
    assert torch.equal(torch.load(tmp_path / "new.pt", weights_only=True)["metadata"]["counts"], torch.arange(3))


@dataclasses.dataclass
class _Settings:
    size: int
    root: Path


def test_files_are_written_as_plain_data_and_unknown_objects_are_refused_when_saving(tmp_path):
    path = atomic_torch_save({"a": np.float32(0.5), "b": np.arange(4), "c": _Settings(3, Path("/x")),
                              "d": (1, "two", [torch.ones(2)])}, tmp_path / "x.pt")
    loaded = load_torch_file(path, "test file", "rerun")
    assert loaded["a"] == 0.5 and torch.equal(loaded["b"], torch.arange(4))
    assert loaded["c"] == {"size": 3, "root": "/x"} and loaded["d"][1] == "two"
    with pytest.raises(TypeError, match=r"x.pt\['f'\] is a .*object"):
        atomic_torch_save({"f": object()}, tmp_path / "x.pt")
    assert plain_data({"k": {1, 2}}) == {"k": {1, 2}}
    # what training checkpoints hold keeps its type: a scheduler's Counter, a state dict's _metadata
    state = torch.nn.Linear(2, 1).state_dict()
    saved = load_torch_file(atomic_torch_save({"milestones": Counter({15: 1, 30: 2}), "model": state},
                                              tmp_path / "ckpt.pt"), "checkpoint", "rerun")
    assert saved["milestones"] == Counter({15: 1, 30: 2}) and type(saved["milestones"]) is Counter
    assert saved["model"]._metadata == state._metadata and list(saved["model"]) == ["weight", "bias"]
    # a corrupt file is still a corrupt file (not an "unsafe" one)
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="corrupt"):
        load_torch_file(tmp_path / "bad.pt", "test file", "rerun")
