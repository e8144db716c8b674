"""Scheduled and submitted cluster runs keep each step's own caching setting.

No Kubeflow cluster runs here, so the test stands at the next best place: the REAL ``kfp.Client``
talks HTTP to a small server on 127.0.0.1 that answers the few KFP v2beta1 API calls
(healthz, experiments, runs, recurring runs) and records every request body. The pipeline spec in
the recorded body is what the KFP backend would execute, so its per-task ``cachingOptions`` are
what a scheduled run would do: ``validate_data`` and the gate must never be cached (a recurring run
that cached them would replay its first run's data and gate decision forever), the training steps
must be.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from redi.cli.pipeline import pipeline_module
from redi.stages import STAGES

lp = pipeline_module()

API = "/apis/v2beta1"


class KfpApiRecorder(ThreadingHTTPServer):
    """A KFP API endpoint that records each request (method, path, JSON body) and answers with ids."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _KfpHandler)
        self.requests: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def bodies(self, method: str, path: str) -> list[dict[str, Any]]:
        """The JSON bodies of the recorded requests to ``path``."""
        return [r["body"] for r in self.requests if r["method"] == method and r["path"] == path]


class _KfpHandler(BaseHTTPRequestHandler):
    server: KfpApiRecorder

    def log_message(self, *args: Any) -> None:  # keep the test output quiet
        pass

    def _answer(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?")[0]
        self.server.requests.append({"method": "GET", "path": path, "body": None})
        if path == f"{API}/healthz":
            self._answer({"multi_user": False})
        elif path == f"{API}/experiments":
            self._answer({"experiments": [], "total_size": 0})  # none yet: the client creates it
        else:
            self.send_error(404)

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.server.requests.append({"method": "POST", "path": path, "body": body})
        if path == f"{API}/experiments":
            self._answer({"experiment_id": "exp-1", "display_name": body.get("display_name")})
        elif path == f"{API}/recurringruns":
            self._answer({"recurring_run_id": "rec-1", "display_name": body.get("display_name")})
        elif path == f"{API}/runs":
            self._answer({"run_id": "run-1", "display_name": body.get("display_name")})
        else:
            self.send_error(404)


@pytest.fixture
def kfp_api(monkeypatch, tmp_path) -> Iterator[KfpApiRecorder]:
    import kfp

    # the client reads a user's ~/.config/kfp/context.json when there is one: not in a test
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "no-context.json"))
    server = KfpApiRecorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _caching(pipeline_spec: dict[str, Any]) -> dict[str, bool]:
    """Task name -> whether KFP may reuse its result, from a pipeline spec as sent to the API
    (the root DAG and the gate's condition, where package_bento runs)."""
    tasks = dict(pipeline_spec["root"]["dag"]["tasks"])
    tasks.update(pipeline_spec["components"]["comp-condition-1"]["dag"]["tasks"])
    return {name: bool(task.get("cachingOptions", {}).get("enableCache")) for name, task in tasks.items()
            if name != "condition-1"}


def _expected_caching() -> dict[str, bool]:
    """What the stage table (redi.stages) says for each step of the line's pipeline."""
    return {stage.name.replace("_", "-"): stage.cached for stage in STAGES}


def test_scheduled_run_keeps_each_steps_caching_setting(kfp_api, tmp_path):
    result = lp.schedule(kfp_api.url, "bottle_caps", data_repo="https://git.example/caps.git",
                         data_path="data/caps", package_path=tmp_path / "p.yaml")
    assert result["recurring_run_id"] == "rec-1"
    (body,) = kfp_api.bodies("POST", f"{API}/recurringruns")
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 0" and int(body["max_concurrency"]) == 1
    assert body["no_catchup"] is True and body["experiment_id"] == "exp-1"
    caching = _caching(body["pipeline_spec"]["pipeline_spec"])  # the YAML's two documents
    assert caching == _expected_caching()
    # the point of the fix: the steps that see new data and decide promotion run every time
    assert caching["validate-data"] is False and caching["gate"] is False and caching["package-bento"] is False
    assert caching["snapshot-data"] is True and caching["train-recover"] is True
    # the Kubernetes document travels too: the data secret on the data steps only
    executors = body["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    with_data_secret = {name for name, spec in executors.items()
                        if any(s["secretName"] == "redi-data" for s in spec.get("secretAsEnv", []))}
    assert with_data_secret == {"exec-validate-data", "exec-snapshot-data"}
    params = body["runtime_config"]["parameters"]
    assert params["data_repo"] == "https://git.example/caps.git" and params["data_revision"] == ""


def test_submitted_run_keeps_each_steps_caching_setting(kfp_api, tmp_path):
    result = lp.submit(kfp_api.url, "woven_fabric", data_path="/mnt/data/fabric", package_path=tmp_path / "p.yaml")
    assert result["run_id"] == "run-1"
    (body,) = kfp_api.bodies("POST", f"{API}/runs")
    assert _caching(body["pipeline_spec"]["pipeline_spec"]) == _expected_caching()
    assert body["runtime_config"]["parameters"]["data_path"] == "/mnt/data/fabric"
