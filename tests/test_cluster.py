"""Cluster mode: the steps that use the object store never fall back to a folder inside a pod, and the
gate compares against the production model in S3 (a real S3 server, the real gate component)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from kfp import dsl

from redi.cli.pipeline import pipeline_module

lp = pipeline_module()  # pipelines.line_pipeline (puts the checkout on sys.path when needed)

from components.common import StageFailed  # noqa: E402  (importable once lp is loaded)
from components.gate import gate  # noqa: E402
from components.package_bento import package_bento  # noqa: E402

LINE = "bottle_caps"
S3_VARIABLES = ("REDI_S3_ENDPOINT", "REDI_S3_ACCESS_KEY", "REDI_S3_SECRET_KEY", "REDI_S3_BUCKET", "REDI_S3_SECURE")


def _artifact(kind: type, path: Path, **metadata) -> dsl.Artifact:
    """A KFP artifact at a local path (what the executor hands a step)."""
    path.mkdir(parents=True, exist_ok=True)
    artifact = kind(name=path.name, uri=str(path), metadata=dict(metadata))
    return artifact


def _settings() -> dict:
    """The line's config for a test-sized gate: tiny profile, no minimums, no tolerance."""
    cfg = lp.load_line(LINE, profile="tiny", overrides=["gate.min_image_auroc=0", "gate.min_pixel_auroc=0",
                                                        "gate.tolerance=0", "gate.min_recall=0",
                                                        "gate.max_false_call_rate=1"])
    return {"profile": cfg.profile, "config_json": lp.section_json(cfg, *lp.MODEL_SECTIONS, "gate")}


def _run_gate(tmp: Path, detector_dir: Path, evaluation_dir: Path, data: Path, manifest_dir: Path,
              cluster_mode: bool = True, workdir: str = "") -> tuple[bool, dict]:
    """The gate component's own function, as its pod would run it."""
    decision = _artifact(dsl.Artifact, tmp / "decision")
    promoted = gate.python_func(
        line=LINE, workdir=workdir, cluster_mode=cluster_mode, **_settings(),
        dataset=_artifact(dsl.Dataset, data, revision="test", data_hash="h"),
        detector=_artifact(dsl.Model, detector_dir), evaluation=_artifact(dsl.Artifact, evaluation_dir),
        manifest=_artifact(dsl.Artifact, manifest_dir), reference=_artifact(dsl.Dataset, tmp / "reference"),
        decision=decision)
    return promoted, json.loads((tmp / "decision" / "decision.json").read_text())


@pytest.fixture
def no_store(monkeypatch, tmp_path):
    for name in S3_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDI_STORE_DIR", str(tmp_path / "would-be-local-store"))  # must NOT be used


def test_gate_in_cluster_mode_without_a_store_fails_naming_the_setting(tmp_path, no_store):
    with pytest.raises(StageFailed, match="REDI_S3_ENDPOINT is not set") as info:
        _run_gate(tmp_path, tmp_path / "det", tmp_path / "eval", tmp_path / "data", tmp_path / "manifest",
                  workdir=str(tmp_path / "work"))
    assert "stage 'gate'" in str(info.value) and "cluster mode" in str(info.value)
    assert not (tmp_path / "would-be-local-store").exists() and not (tmp_path / "work" / "store").exists()


def test_package_bento_in_cluster_mode_without_a_store_fails(tmp_path, no_store):
    with pytest.raises(StageFailed, match="REDI_S3_ENDPOINT is not set"):
        package_bento.python_func(line=LINE, workdir=str(tmp_path / "work"), bentoml_home=str(tmp_path / "bento"),
                                  cluster_mode=True, decision=_artifact(dsl.Artifact, tmp_path / "decision"),
                                  bento=_artifact(dsl.Artifact, tmp_path / "bento-out"))
    assert not (tmp_path / "bento").exists()  # nothing built


def test_gate_in_cluster_mode_with_an_unreachable_store_fails(tmp_path, no_store, monkeypatch):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("REDI_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("REDI_S3_ACCESS_KEY", "a")
    monkeypatch.setenv("REDI_S3_SECRET_KEY", "b")
    with pytest.raises(StageFailed, match=f"127.0.0.1:{port}"):
        _run_gate(tmp_path, tmp_path / "det", tmp_path / "eval", tmp_path / "data", tmp_path / "manifest")



def test_gate_in_cluster_mode_compares_with_production_in_s3(tmp_path, s3_env, trained_line):
    from redi.core.config import load_config
    from redi.workflow.stages import evaluate, train_all, validate_data
    from redi.ops.object_store import store_from_env
    from redi.ops.model_registry import production_record

    data = trained_line["data"]
    cfg = load_config(profile="tiny", overrides=[f"data.root={data}"])
    validate_data(data, tmp_path / "manifest", cfg)
    # 1. the trained tiny model: promoted (no production yet), its files and pointer in S3
    evaluate(trained_line["detector"], data, tmp_path / "eval1", cfg)
    first, decision = _run_gate(tmp_path / "g1", trained_line["detector"].parent, tmp_path / "eval1", data,
                                tmp_path / "manifest")
    store = store_from_env(require_remote=True)
    assert first is True and decision["production_version"] is None
    pointer = production_record(store, LINE)
    assert pointer["version"] == decision["version"]
    # 2. a worse model (the same architecture, never trained: 0 epochs): refused against the S3 production,
    #    which the gate downloaded and evaluated again on this data
    untrained = load_config(profile="tiny", overrides=[f"data.root={data}", "train.recover.epochs=0",
                                                       "train.discriminate.epochs=0"])
    worse = train_all(data, tmp_path / "untrained", untrained, line=LINE)["detector"]
    evaluate(worse, data, tmp_path / "eval2", untrained)
    second, decision = _run_gate(tmp_path / "g2", Path(worse).parent, tmp_path / "eval2", data,
                                 tmp_path / "manifest")
    assert second is False
    assert decision["production_version"] == pointer["version"]
    assert any("worse than the production model" in reason for reason in decision["reasons"]), decision["reasons"]
    assert production_record(store, LINE) == pointer  # production did not move
    assert store.exists(f"lines/{LINE}/versions/{decision['version']}/decision.json")  # the refusal is recorded
