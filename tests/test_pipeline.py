"""The Kubeflow pipeline: the compiled DAG, line configs, fault messages, and local runs end to end
against a real S3 server (the gate promotes, then refuses a worse model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from redi.data.demo import DEMO_LINES, make_demo_line
from redi.core.errors import RediError
from redi.cli.pipeline import add_pipeline_commands, pipeline_module

lp = pipeline_module()  # pipelines.line_pipeline (puts the checkout on sys.path when needed)

from components.common import REDI_IMAGE, make_config  # noqa: E402  (importable once lp is loaded)

TASKS = ["validate-data", "snapshot-data", "precompute-selfmaps", "build-prompt-bank", "train-recover", "train-discriminate",
         "train-patchcore", "select-champion", "evaluate", "drift-reference", "gate"]
SMALL_DEMO = {"n_train": 10, "n_test_good": 4, "n_test_defect": 8, "size": 128}
# a few-epoch model on 10 images is a plumbing test, not a line: no minimums, at any threshold
NO_MINIMUMS = {"min_image_auroc": 0.0, "min_pixel_auroc": 0.0, "min_recall": 0.0, "max_false_call_rate": 1.0}
# the tiny profile, fewer epochs; of SMALL_DEMO's 10 normals 2 are held out (the line file's 8 would
# leave 2 to train on)
FAST = ["train.recover.epochs=4", "train.discriminate.epochs=3", "data.min_val_images=2"]
CRIPPLED = ["model.recover.enabled=false", "model.use_frb=false",  # no recovery, no FRB: a worse model
            "data.min_val_images=2"]


CACHED = ["snapshot-data", "precompute-selfmaps", "build-prompt-bank", "train-recover", "train-discriminate", "evaluate",
          "drift-reference"]
CLUSTER = ["pipeline.node_selector={pool: gpu-a100}", "pipeline.workdir_pvc=redi-work",
           "pipeline.steps.evaluate.memory_limit=12Gi", "pipeline.steps.train_recover.retries=1"]


@pytest.fixture(scope="module")
def compiled_docs(tmp_path_factory) -> list[dict]:
    """The bottle_caps pipeline with a node selector, a work-dir volume and two more step settings."""
    path = lp.compile_pipeline(tmp_path_factory.mktemp("yaml") / "line_pipeline.yaml", "bottle_caps",
                               overrides=CLUSTER)
    return list(yaml.safe_load_all(path.read_text()))


@pytest.fixture(scope="module")
def compiled(compiled_docs) -> dict:
    return compiled_docs[0]


@pytest.fixture(scope="module")
def platform(compiled_docs) -> dict:
    """The kfp-kubernetes document: executor name -> its Kubernetes settings."""
    assert len(compiled_docs) == 2, "the compiled YAML lacks its `platforms: kubernetes` document"
    return compiled_docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_compiled_yaml_has_every_stage_and_the_dag(compiled):
    root = compiled["root"]["dag"]["tasks"]
    assert sorted(root) == sorted([*TASKS, "condition-1"])
    deps = {name: set(task.get("dependentTasks", [])) for name, task in root.items()}
    assert deps["snapshot-data"] == {"validate-data"}
    assert deps["precompute-selfmaps"] == {"snapshot-data"} and deps["build-prompt-bank"] == {"snapshot-data"}
    assert deps["train-recover"] == {"snapshot-data", "build-prompt-bank", "precompute-selfmaps"}
    assert {"train-recover", "build-prompt-bank"} <= deps["train-discriminate"]
    # the line (cpu profile) has candidates: PatchCore beside ReDi, and the champion is what is evaluated and gated
    assert deps["train-patchcore"] == {"snapshot-data"}
    assert deps["select-champion"] == {"snapshot-data", "train-discriminate", "train-patchcore"}
    assert deps["evaluate"] == {"snapshot-data", "select-champion"}
    assert deps["drift-reference"] == {"snapshot-data", "select-champion"}
    assert {"evaluate", "drift-reference", "select-champion", "snapshot-data", "validate-data"} <= deps["gate"]
    assert deps["condition-1"] >= {"gate"}
    # package_bento runs only inside the gate's condition
    condition = root["condition-1"]["triggerPolicy"]["condition"]
    assert condition == "inputs.parameter_values['pipelinechannel--gate-Output'] == true"
    inner = compiled["components"]["comp-condition-1"]["dag"]["tasks"]
    assert list(inner) == ["package-bento"]
    params = compiled["root"]["inputDefinitions"]["parameters"]
    assert {"line", "data_revision", "profile", "config_json", "workdir", "cluster_mode"} <= set(params)
    # compiled for a cluster: cluster mode by default, the line's own settings as defaults
    assert params["cluster_mode"]["defaultValue"] is True
    assert params["profile"]["defaultValue"] == "cpu" and params["workdir"]["defaultValue"] == "/var/lib/redi/work"
    assert json.loads(params["config_json"]["defaultValue"])["gate"]["min_image_auroc"] == 0.8


def test_compiling_a_line_twice_gives_the_same_yaml(tmp_path):
    first = lp.compile_pipeline(tmp_path / "a.yaml", "woven_fabric").read_bytes()
    second = lp.compile_pipeline(tmp_path / "b.yaml", "woven_fabric").read_bytes()
    assert first == second
    assert lp.compile_pipeline(tmp_path / "c.yaml", "bottle_caps").read_bytes() != first  # the line's own settings


def test_cached_steps_take_no_per_run_value(compiled):
    """KFP's cache key is the component, its input parameter values and its input artifacts' ids: a cached
    step must take nothing that changes per run, and its artifacts must come from cached steps."""
    tasks = compiled["root"]["dag"]["tasks"]
    params = compiled["root"]["inputDefinitions"]["parameters"]
    assert not {"run_tag", "run_id"} & set(params)
    for name in CACHED:
        task = tasks[name]
        assert task["cachingOptions"] == {"enableCache": True}, name
        inputs = task["inputs"].get("parameters", {})
        assert not {"run_tag", "cluster_mode", "bentoml_home", "data_revision"} & set(inputs), (name, sorted(inputs))
        producers = {a["taskOutputArtifact"]["producerTask"] for a in task["inputs"].get("artifacts", {}).values()}
        assert "validate-data" not in producers, name  # an uncached producer makes new artifacts every run
    for name in ("validate-data", "gate"):
        assert not tasks[name]["cachingOptions"].get("enableCache"), name
    inner = compiled["components"]["comp-condition-1"]["dag"]["tasks"]["package-bento"]
    assert not inner["cachingOptions"].get("enableCache")
    # the cached snapshot is keyed on what validate_data measured: content hash and resolved commit
    snap = tasks["snapshot-data"]["inputs"]["parameters"]
    assert snap["data_hash"]["taskOutputParameter"] == {"producerTask": "validate-data", "outputParameterKey": "data_hash"}
    assert snap["revision"]["taskOutputParameter"]["outputParameterKey"] == "revision"
    # each training step gets only the config sections its stage reads
    assert "eval_config" not in tasks["train-recover"]["inputs"]["parameters"]
    assert "config_json" not in tasks["precompute-selfmaps"]["inputs"]["parameters"]


def test_compiled_yaml_cluster_settings(compiled, platform):
    executors = compiled["deploymentSpec"]["executors"]
    resources = {name: spec["container"].get("resources", {}) for name, spec in executors.items()}
    assert resources["exec-train-recover"]["resourceCpuRequest"] == "4"
    assert resources["exec-train-recover"]["resourceMemoryRequest"] == "16Gi"
    assert resources["exec-evaluate"]["resourceMemoryLimit"] == "12Gi"
    assert all("resourceCpuRequest" in r and "resourceMemoryRequest" in r for r in resources.values())
    tasks = compiled["root"]["dag"]["tasks"]
    retries = {name: task.get("retryPolicy", {}).get("maxRetryCount") for name, task in tasks.items()}
    assert retries["validate-data"] == 3 and retries["snapshot-data"] == 3 and retries["gate"] == 2
    assert retries["train-recover"] == 1 and retries["precompute-selfmaps"] is None
    package = compiled["components"]["comp-condition-1"]["dag"]["tasks"]["package-bento"]
    assert package["retryPolicy"]["maxRetryCount"] == 2
    # the object store's secret reaches exactly the steps that use the store (the data secret: test_data_credentials)
    with_secret = {name for name, spec in platform.items()
                   if any(s["secretName"] == "redi-s3" for s in spec.get("secretAsEnv", []))}
    assert with_secret == {"exec-gate", "exec-package-bento"}
    envs = {e["envVar"] for s in platform["exec-gate"]["secretAsEnv"] for e in s["keyToEnv"]}
    assert envs == {"REDI_S3_ENDPOINT", "REDI_S3_ACCESS_KEY", "REDI_S3_SECRET_KEY", "REDI_S3_BUCKET", "REDI_S3_SECURE"}
    assert {s["secretName"] for s in platform["exec-gate"]["secretAsEnv"]} == {"redi-s3"}
    # GPU steps: accelerator, node selector, toleration, and the work-dir volume for resuming
    for name in ("exec-train-recover", "exec-train-discriminate"):
        assert resources[name]["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert platform[name]["nodeSelector"]["labels"] == {"pool": "gpu-a100"}
        assert platform[name]["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu",
                                                  "operator": "Exists"}]
        (mount,) = platform[name]["pvcMount"]
        assert mount["mountPath"] == "/var/lib/redi/work" and mount["pvcNameParameter"]["runtimeValue"] == {
            "constant": "redi-work"}
    assert "nodeSelector" not in platform.get("exec-evaluate", {})


def test_compiled_yaml_gpu_requests_and_image(compiled):
    executors = compiled["deploymentSpec"]["executors"]
    assert len(executors) == 12  # the 11 top-level steps and package_bento
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


DIGEST = "sha256:" + "0123456789abcdef" * 4


def _images(path: Path) -> set[str]:
    return {spec["container"]["image"] for spec in yaml.safe_load_all(path.read_text()).__next__()["deploymentSpec"][
        "executors"].values()}


def test_compiled_yaml_pins_the_image_by_digest(tmp_path):
    """A digest from the line's setting or from REDI_IMAGE: every step (package_bento too) names image@digest."""
    import subprocess
    import sys

    path = lp.compile_pipeline(tmp_path / "pinned.yaml", "bottle_caps", overrides=[f"pipeline.image_digest={DIGEST}"])
    assert _images(path) == {f"{REDI_IMAGE}@{DIGEST}"}
    assert _images(lp.compile_pipeline(tmp_path / "tag.yaml", "bottle_caps")) == {REDI_IMAGE}  # no digest known
    with pytest.raises(RediError, match="not an image digest"):
        lp.compile_pipeline(tmp_path / "bad.yaml", "bottle_caps", overrides=["pipeline.image_digest=sha256:abc"])
    # REDI_IMAGE is read when the components are defined: a fresh process, as `redi pipeline compile` runs
    tagged = f"registry.example.com/factory/redi:0.2.0@{DIGEST}"
    env = {**__import__("os").environ, "REDI_IMAGE": tagged}
    command = [sys.executable, "-m", "redi.cli", "pipeline", "compile", "--line", "woven_fabric", "--out",
               str(tmp_path / "env.yaml")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=lp.PROJECT_ROOT)
    assert done.returncode == 0, done.stderr
    assert _images(tmp_path / "env.yaml") == {tagged} and f"step image: {tagged}\n" in done.stdout
    other = "sha256:" + "f" * 64  # two different digests: which image is meant is unknown
    done = subprocess.run([*command, "--set", f"pipeline.image_digest={other}"], env=env, capture_output=True,
                          text=True, cwd=lp.PROJECT_ROOT)
    assert done.returncode != 0 and "give one of them" in done.stderr


def test_line_files_are_redi_config_files():
    from redi.core.config import load_config, to_dict

    names = lp.list_lines()
    assert {"bottle_caps", "woven_fabric"} <= set(names)
    for name in names:
        cfg = lp.load_line(name)
        assert cfg.line.name == name and name in DEMO_LINES and cfg.line.demo.enabled
        assert cfg.profile == "cpu" and cfg.gate.min_image_auroc >= 0.75
        assert len(cfg.pipeline.schedule.split()) == 6 and cfg.pipeline.store_secret == "redi-s3"
        # the same file through the one loader every redi command uses
        assert to_dict(load_config(lp.LINES_DIR / f"{name}.yaml")) == to_dict(cfg)


def test_gate_policy_from_the_config_section():
    import dataclasses

    from redi.ops.gate import GatePolicy

    cfg = lp.load_line("bottle_caps", overrides=["gate.tolerance=0.02"])
    policy = GatePolicy(**dataclasses.asdict(cfg.gate))
    assert policy.minimums() == {"image_auroc": 0.8, "pixel_auroc": 0.8, "aupro": 0.0} and policy.tolerance == 0.02


def test_pipeline_arguments_validate_settings(tmp_path):
    cfg = lp.load_line("bottle_caps", profile="tiny", overrides=["train.seed=3", "gate.min_aupro=0.2"])
    args = lp.pipeline_arguments(cfg, tmp_path)
    assert args["profile"] == "tiny" and json.loads(args["train_config"])["train"]["seed"] == 3
    assert json.loads(args["config_json"])["gate"]["min_aupro"] == 0.2
    assert "root" not in json.loads(args["data_config"])["data"]  # each step sets its own dataset copy
    assert args["data_path"] == str(tmp_path.resolve() / "data" / "bottle_caps") and args["cluster_mode"] is False
    built = make_config(args["profile"], args["data_config"], args["model_config"], args["train_config"])
    assert built.train.seed == 3 and built.data.image_size == 128
    with pytest.raises(RediError, match="unknown config key 'train.nope'"):
        lp.load_line("bottle_caps", overrides=["train.nope=1"])
    with pytest.raises(RediError, match="6-field cron"):
        lp.load_line("bottle_caps", overrides=["pipeline.schedule=0 3 * * 0"])
    with pytest.raises(RediError, match="no line config"):
        lp.load_line("no_such_line")
    with pytest.raises(RediError, match="no data path"):  # demo data is made only by local runs
        lp.pipeline_arguments(cfg, "", cluster_mode=True)


def test_cli_commands_compile(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    handlers = add_pipeline_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pipeline", "compile", "--line", "woven_fabric", "--out", str(tmp_path / "p.yaml"),
                              "--set", "pipeline.steps.gate.cpu_request=3"])
    assert handlers[args.command](args) == 0
    text = (tmp_path / "p.yaml").read_text()
    assert "redi-line" in text and "woven_fabric" in text and "resourceCpuRequest: '3'" in text
    args = parser.parse_args(["pipeline", "schedule", "--line", "bottle_caps", "--host", "http://h", "--cron",
                              "0 0 1 * * *", "--data-path", "/d"])
    assert (args.host, args.cron, args.data_path) == ("http://h", "0 0 1 * * *", "/d")
    args = parser.parse_args(["pipeline", "submit", "--line", "bottle_caps", "--revision", "abc123"])
    assert args.host is None and args.revision == "abc123"
    args = parser.parse_args(["pipeline", "run", "--line", "woven_fabric", "--profile", "tiny", "--set", "a.b=1",
                              "--min-image-auroc", "0.7", "--min-recall", "0.9", "--revision", "v2"])
    assert (args.line, args.profile, args.set, args.min_image_auroc, args.min_recall, args.revision) == (
        "woven_fabric", "tiny", ["a.b=1"], 0.7, 0.9, "v2")


class FakeClient:
    """Records what would reach a KFP endpoint (no cluster can run here): kfp.Client's method names."""

    def create_run_from_pipeline_package(self, pipeline_file, arguments, run_name, experiment_name, namespace):
        self.package, self.arguments, self.experiment, self.run_name = pipeline_file, arguments, experiment_name, run_name
        return type("Result", (), {"run_id": "run-123"})()

    def create_experiment(self, name, namespace=None):
        self.experiment = name
        return type("Experiment", (), {"experiment_id": "exp-1"})()

    def create_recurring_run(self, experiment_id, job_name, cron_expression, params, pipeline_package_path,
                             **options):
        self.recurring = {"experiment_id": experiment_id, "job_name": job_name, "cron": cron_expression,
                          "params": params, "package": pipeline_package_path, **options}
        return type("Recurring", (), {"recurring_run_id": "rec-9"})()


def test_submit_uses_kfp_client(tmp_path):
    client = FakeClient()
    result = lp.submit("http://kfp.example:8080", "bottle_caps", "paper", "/mnt/redi", data_repo="https://git/x.git",
                       data_path="data/caps", data_revision="v7", package_path=tmp_path / "p.yaml", client=client)
    assert result["run_id"] == "run-123" and Path(client.package).is_file()
    assert client.arguments["data_revision"] == "v7" and client.arguments["workdir"] == "/mnt/redi"
    assert client.arguments["data_path"] == "data/caps" and client.experiment == "redi"
    assert client.arguments["profile"] == "paper" and client.arguments["cluster_mode"] is True
    assert "run_tag" not in client.arguments
    with pytest.raises(RediError, match="no data path"):
        lp.submit("http://kfp.example:8080", "bottle_caps", client=client)
    with pytest.raises(RediError, match="no KFP endpoint"):
        lp.submit("", "bottle_caps", data_path="/mnt/data/caps")


def test_schedule_creates_the_lines_recurring_run(tmp_path):
    client = FakeClient()
    result = lp.schedule("http://kfp.example:8080", "woven_fabric", data_path="/mnt/data/fabric",
                         package_path=tmp_path / "p.yaml", client=client)
    assert result["recurring_run_id"] == "rec-9" and result["cron"] == "0 30 3 * * 0"
    rec = client.recurring
    assert rec["cron"] == "0 30 3 * * 0" and rec["experiment_id"] == "exp-1" and rec["job_name"] == "woven_fabric-scheduled"
    assert rec["params"]["profile"] == "cpu" and rec["params"]["data_path"] == "/mnt/data/fabric"
    assert Path(rec["package"]).is_file() and rec["max_concurrency"] == 1
    assert rec["enable_caching"] is None  # each step keeps its own caching (tests/test_schedule.py, real kfp.Client)
    lp.schedule("http://kfp.example:8080", "woven_fabric", cron="0 0 * * * *", data_path="/d", client=client)
    assert client.recurring["cron"] == "0 0 * * * *"


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
    assert "stage 'validate_data'" in message and "000.png" in message and "hole" in message
    (run_tag,) = [p.name for p in (tmp_path / "work" / "bottle_caps" / "status").iterdir()]
    status = lp.read_status(tmp_path / "work", "bottle_caps", run_tag)
    assert status["validate_data"]["status"] == "failed" and "000.png" in status["validate_data"]["cause"]
    assert not (tmp_path / "work" / "store").exists()  # nothing was trained, nothing stored



@pytest.mark.slow
def test_local_run_with_candidates_serves_the_champion(tmp_path, s3_env, capfd):
    """The KFP local runner fits PatchCore beside ReDi, the champion step builds the fused one and
    chooses on validation, and the gate stores and promotes the champion."""
    from redi.methods.base import read_artifact
    from redi.ops.model_registry import production_record
    from redi.ops.object_store import store_from_env

    result = lp.run_line_pipeline("bottle_caps", "tiny", tmp_path / "work", demo_options=SMALL_DEMO,
                                  overrides=[*FAST, "model.candidates=[redi,patchcore,fused]"],
                                  gate_overrides=NO_MINIMUMS)
    assert {"train_patchcore", "select_champion"} <= set(result["stages"])
    assert set(result["candidate_scores"]) == {"redi", "patchcore", "fused"}
    best = max(result["candidate_scores"].values())
    assert result["candidate_scores"][result["champion"]] >= best - 0.005
    assert result["promoted"], result["reasons"]
    store = store_from_env()
    version = production_record(store, "bottle_caps")["version"]
    local = tmp_path / "served.pt"
    local.write_bytes(store.get_bytes(f"lines/bottle_caps/versions/{version}/detector.pt"))
    assert read_artifact(local)["method"] == result["champion"]
    metrics = json.loads(store.get_bytes(f"lines/bottle_caps/versions/{version}/metrics.json"))
    assert [r["name"] for r in metrics["candidates"]["rows"]] == ["redi", "patchcore", "fused"]
    assert f"champion: {result['champion']}" in capfd.readouterr().out


@pytest.mark.slow
def test_local_runs_gate_promotes_then_refuses(tmp_path, s3_env, monkeypatch, capfd):
    from redi.ops.object_store import store_from_env
    from redi.ops.model_registry import production_record, version_index

    work = tmp_path / "work"
    store = store_from_env()

    # 1. a tiny model on small demo data: promoted (no production yet), stored in S3, packaged as a Bento
    first = lp.run_line_pipeline("bottle_caps", "tiny", work, overrides=FAST, demo_options=SMALL_DEMO,
                                 gate_overrides=NO_MINIMUMS)
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
                                  gate_overrides={**NO_MINIMUMS, "tolerance": 0.0})
    assert not second["promoted"]
    assert any("worse than the production model" in reason for reason in second["reasons"]), second["reasons"]
    assert production_record(store, "bottle_caps") == pointer
    assert second["bento"] is None and "package_bento" not in second["stages"]
    refused = version_index(store, "bottle_caps", second["version"])  # uploaded all the same, for the record
    assert refused is not None and refused["info"]["promote"] is False
    decision = json.loads(store.get_bytes(f"lines/bottle_caps/versions/{second['version']}/decision.json"))
    assert decision["production_version"] == first["version"]
    assert decision["production_metrics"]["image_auroc"] == pytest.approx(first["scores"]["image_auroc"])
