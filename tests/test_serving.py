"""The BentoML service, end to end: a real ``bentoml serve`` on a loopback port, real HTTP requests.

One trained (tiny, 1-epoch) detector is published and promoted in a local object store (the
production pointer is what the service serves); the server runs as a subprocess with an API key,
small upload/pixel limits and its own log folder.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from http_wait import wait_for_http  # tests/ is on sys.path (rootdir conftest)
from tiny_line import make_line, train_tiny
import requests
from PIL import Image

from redi.core.images import decode_rgb, load_rgb
from redi.methods.base import load_detector
from redi.ops.monitoring import ProductionLog, feature_columns
from redi.ops.review import ReviewDB
from redi.ops.object_store import LocalStore
from redi.ops.model_registry import promote, publish_version
from serving.review_metrics import metric_value

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LINE = "bottle_caps"
KEY = "test-key-0123456789abcdef"  # 16+ characters: shorter keys are refused at start
SESSION_SECRET = "test-session-secret-0123456789abcdef"  # the review page's cookie key, not the API key
MAX_UPLOAD = 1_000_000
MAX_PIXELS = 600 * 600
BENTOML = Path(sys.executable).parent / "bentoml"

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """Train, package and serve; yields the base URL and paths. The server is stopped by its PID."""
    root = tmp_path_factory.mktemp("serving")
    data = make_line(root, LINE)
    detector_path = train_tiny(data, root / "run", LINE)
    store = LocalStore(root / "store")
    publish_version(store, LINE, "v1", {"detector.pt": detector_path},
                    {"promote": True, "metrics": {"image_auroc": 0.5}})
    tag = promote(store, LINE, "v1", {"metrics": {"image_auroc": 0.5}}, by="test", reason="fixture")["detector"]
    env = {**os.environ, "BENTOML_HOME": str(root / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
           "REDI_API_KEY": KEY, "REDI_SESSION_SECRET": SESSION_SECRET, "REDI_LOG_DIR": str(root / "logs"),
           "REDI_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
           "REDI_MAX_PIXELS": str(MAX_PIXELS), "REDI_DEVICE": "cpu", "PYTHONPATH": str(REPO),
           "REDI_STORE_DIR": str(root / "store"), "REDI_MODEL_CACHE": str(root / "cache")}
    proc, url, log_file = _start_server(env, root / "server.log")
    try:
        yield {"url": url, "root": root, "data": data, "detector": load_detector(detector_path), "tag": tag,
               "env": env, "logs": root / "logs", "detector_path": detector_path}
    finally:
        _stop_server(proc, log_file)


def _start_server(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str, Any]:
    """``bentoml serve`` in its own process group (so a test can kill -9 all of it); waits for /readyz."""
    port = _free_port()
    log_file = open(log, "w")
    proc = subprocess.Popen([str(BENTOML), "serve", "serving.service:RediService", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    if not wait_for_http(f"{url}/readyz", proc, 180):
        _stop_server(proc, log_file)
        pytest.fail(f"bentoml serve did not become ready:\n{log.read_text()[-3000:]}")
    return proc, url, log_file


def _stop_server(proc: subprocess.Popen, log_file: Any) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        _kill_9_tree(proc)
        proc.wait(timeout=30)
    log_file.close()


def _kill_9_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the server and every process it started. BentoML's workers run in process groups of
    their own, so a signal to the server's group would leave them running."""
    import psutil

    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(tree) >= 3, f"expected the arbiter and two workers, found {[p.pid for p in tree]}"
    for process in tree:
        process.send_signal(signal.SIGKILL)
    gone, alive = psutil.wait_procs(tree[1:], timeout=30)
    assert not alive, f"still running after SIGKILL: {alive}"


def _predict(server: dict, content: bytes, line: str = LINE, key: str | None = KEY, **options) -> requests.Response:
    headers = {"X-API-Key": key} if key is not None else {}
    fields = {"line": line, **{k: str(v).lower() for k, v in options.items()}}
    return requests.post(f"{server['url']}/predict", files={"image": ("upload.png", content)}, data=fields,
                         headers=headers, timeout=60)


def _in_process_score(server: dict, rgb: np.ndarray) -> float:
    detector = server["detector"]
    return float(detector.predict(detector.preprocess([rgb])).score[0])


def _still_serves(server: dict) -> None:
    good = (server["data"] / "test" / "good" / "000.png").read_bytes()
    response = _predict(server, good)
    assert response.status_code == 200, response.text


def test_health_and_metadata(server: dict) -> None:
    assert requests.get(f"{server['url']}/livez", timeout=5).status_code == 200
    assert requests.get(f"{server['url']}/readyz", timeout=5).status_code == 200
    assert requests.post(f"{server['url']}/metadata", json={}, timeout=10).status_code == 401
    response = requests.post(f"{server['url']}/metadata", json={}, headers={"X-API-Key": KEY}, timeout=10)
    assert response.status_code == 200
    meta = response.json()
    line = meta["lines"][LINE]
    assert line["model_tag"] == server["tag"]
    assert line["threshold"] == pytest.approx(float(server["detector"].threshold))
    assert line["metrics"]["image_auroc"] == 0.5 and meta["api_key_required"] is True
    assert meta["source"] == "store" and line["model_version"] == "v1" and line["promoted_by"] == "test"
    # deny by default: a route not declared public needs the key; the declared public ones do not
    assert requests.post(f"{server['url']}/admin/reload", json={}, timeout=10).status_code == 401
    assert requests.get(f"{server['url']}/docs.json", timeout=10).status_code == 200
    reloaded = requests.post(f"{server['url']}/admin/reload", json={}, headers={"X-API-Key": KEY}, timeout=60)
    assert reloaded.status_code == 200 and reloaded.json()["changed"] == {}  # the pointer did not move
    assert meta["limits"] == {"max_upload_bytes": MAX_UPLOAD, "max_pixels": MAX_PIXELS,
                              "max_body_bytes": MAX_UPLOAD + 64 * 1024, "max_form_body_bytes": 64 * 1024}


@pytest.mark.parametrize("name", ["test/good/000.png", "test/scratch/000.png"])
def test_scores_equal_in_process_detector(server: dict, name: str) -> None:
    path = server["data"] / name
    response = _predict(server, path.read_bytes(), return_map=True, return_overlay=True, return_regions=True,
                        min_region_area=1)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = _in_process_score(server, load_rgb(path))
    threshold = float(server["detector"].threshold)
    assert body["anomaly_score"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert body["threshold"] == pytest.approx(threshold) and body["threshold_source"] == "model"  # no override
    assert body["anomalous"] == (body["anomaly_score"] > threshold)
    assert body["decision"] == ("anomalous" if body["anomalous"] else "normal")
    assert body["model_tag"] == server["tag"] and body["latency_ms"] > 0
    for field in ("anomaly_map_png", "overlay_png"):
        picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(body[field]))))
        assert picture.shape == (128, 128, 3) and picture.std() > 0
    for region in body["defect_regions"]:
        assert 0 <= region["x0"] < region["x1"] <= 128 and 0 <= region["y0"] < region["y1"] <= 128
        assert region["max_score"] > threshold
    # without options: no pictures
    plain = _predict(server, path.read_bytes(), return_regions=False).json()
    assert "anomaly_map_png" not in plain and "defect_regions" not in plain


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_grey_rgba_and_16bit_images(server: dict, mode: str) -> None:
    rgb = load_rgb(server["data"] / "test" / "good" / "001.png")
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    if mode == "L":
        content = _png(grey)
    elif mode == "RGBA":
        alpha = np.full(grey.shape, 200, np.uint8)
        content = _png(np.dstack([rgb, alpha]))
    else:
        content = _png(grey.astype(np.uint16) * 257)  # Pillow stores uint16 as mode I;16
    assert Image.open(io.BytesIO(content)).mode == mode
    response = _predict(server, content)
    assert response.status_code == 200, response.text
    expected = _in_process_score(server, decode_rgb(content))
    assert response.json()["anomaly_score"] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def _bad_cases(server: dict) -> list[tuple[str, dict, int, str]]:
    good = (server["data"] / "test" / "good" / "000.png").read_bytes()
    huge = _png(np.zeros((700, 700, 3), np.uint8))  # 490 000 pixels > 360 000, but a small file
    assert len(huge) < MAX_UPLOAD
    return [
        ("truncated PNG", {"content": good[: len(good) // 2]}, 400, "corrupt or truncated"),
        ("random bytes", {"content": os.urandom(2000)}, 400, "cannot read the upload"),
        ("text file", {"content": b"line,score\nbottle_caps,1.0\n"}, 400, "send a complete PNG"),
        ("empty file", {"content": b""}, 400, "empty"),
        ("too many pixels", {"content": huge}, 413, "pixels"),
        ("too many bytes", {"content": os.urandom(MAX_UPLOAD + 100_000)}, 413, "upload limit"),
        ("unknown line", {"content": good, "line": "no_such_line"}, 404, "unknown line 'no_such_line'"),
        ("missing API key", {"content": good, "key": None}, 401, "needs an API key"),
        ("wrong API key", {"content": good, "key": "wrong"}, 403, "API key is wrong"),
        ("bad option", {"content": good, "min_region_area": 0}, 422, "min_region_area"),
    ]


def test_bad_requests_get_clear_4xx_and_service_keeps_serving(server: dict) -> None:
    for name, kwargs, status, message in _bad_cases(server):
        response = _predict(server, **kwargs)
        assert response.status_code == status, (name, response.status_code, response.text)
        body = response.json()
        assert message in body["error"] and body["status"] == status, (name, body)
        assert not re.search(r"at 0x[0-9a-f]+", body["error"]), (name, body)  # no Python object reprs
        _still_serves(server)
    # a request without the image field: BentoML's own validation answers 400
    response = requests.post(f"{server['url']}/predict", data={"line": LINE}, headers={"X-API-Key": KEY},
                             timeout=30)
    assert response.status_code == 400 and "image" in response.text
    _still_serves(server)


def _load_images(server: dict) -> list[bytes]:
    """Three demo images at the model's size (sent as uint8) and one larger, non-square one (sent as
    the preprocessed float batch), so both transports to the detector service are exercised."""
    images = [(server["data"] / "test" / sub / "000.png").read_bytes() for sub in ("good", "scratch", "hole")]
    rgb = load_rgb(server["data"] / "test" / "good" / "001.png")
    images.append(_png(np.asarray(Image.fromarray(rgb).resize((173, 151), Image.Resampling.BICUBIC))))
    return images


def test_load_no_5xx_and_every_request_logged(server: dict) -> None:
    images = _load_images(server)
    expected = [_in_process_score(server, decode_rgb(content)) for content in images]
    n_requests, n_clients = 240, 16

    def call(i: int) -> tuple[int, dict]:
        response = _predict(server, images[i % len(images)])
        return response.status_code, response.json()

    before = requests.get(f"{server['url']}/metrics", timeout=10).text
    started = time.monotonic()
    with cf.ThreadPoolExecutor(n_clients) as pool:
        results = list(pool.map(call, range(n_requests), timeout=240))
    seconds = time.monotonic() - started
    statuses = [status for status, _ in results]
    assert statuses.count(200) == n_requests, sorted(set(statuses))
    for i, (_, body) in enumerate(results):  # batched in the detector service = the same score in-process
        assert body["anomaly_score"] == pytest.approx(expected[i % len(images)], rel=1e-4, abs=1e-5), i
    rows = ProductionLog(server["logs"]).read(LINE)
    logged = set(rows["request_id"])
    assert all(body["request_id"] in logged for _, body in results)
    assert rows["request_id"].is_unique
    assert set(feature_columns()) <= set(rows.columns)
    assert {"time", "line", "model_version", "score", "decision"} <= set(rows.columns)
    assert max(body["batch_size"] for _, body in results) > 1, "adaptive batching never grouped requests"
    _check_decision_metrics(server, before, [body for _, body in results])
    print(f"\nload test: {n_requests} requests, {n_clients} clients, {seconds:.1f} s, "
          f"{n_requests / seconds:.1f} req/s, largest batch {max(body['batch_size'] for _, body in results)}")


def _check_decision_metrics(server: dict, before: str, bodies: list[dict]) -> None:
    """/metrics counted these answers per line and per the threshold that decided them, and each kept
    part's record carries the chance it had to be kept."""
    after = requests.get(f"{server['url']}/metrics", timeout=10).text
    threshold = bodies[0]["threshold"]
    assert {(b["threshold"], b["threshold_source"], b["model_version"]) for b in bodies} == {(threshold, "model", "v1")}
    assert metric_value(after, "redi_threshold", line=LINE) == pytest.approx(threshold)
    series = {"line": LINE, "model_version": "v1", "threshold": repr(threshold), "threshold_source": "model"}
    for decision in ("anomalous", "normal"):
        def count(text: str, name: str, **labels: str) -> float:
            value = metric_value(text, name, decision=decision, **labels)
            assert value is not None, f"{name} has no {decision} series for {labels}:\n{text[-2000:]}"
            return value

        expected = sum(b["decision"] == decision for b in bodies)  # both series exist, also at 0
        assert count(after, "redi_decisions_total", **series) - count(before, "redi_decisions_total", **series) \
            == expected, decision
        assert count(after, "redi_requests_total", line=LINE) - count(before, "redi_requests_total", line=LINE) \
            == expected, decision
    time.sleep(2)  # the retention thread indexes kept copies after the answers
    kept = ReviewDB(f"sqlite:///{server['logs'] / 'review.db'}").kept_with_verdicts(LINE)
    assert all(r["sample_rate"] == (1.0 if r["kind"] == "flagged" else 0.01) for r in kept), kept[:3]


def test_internal_routes_are_not_public(server: dict) -> None:
    # the detector service has no public port; the old self-proxy route is gone and the key guard
    # covers whatever is not declared public
    assert requests.post(f"{server['url']}/score_batch", json={}, timeout=10).status_code == 401
    assert requests.post(f"{server['url']}/score", json={}, timeout=10).status_code == 401
    assert requests.post(f"{server['url']}/score", json={}, headers={"X-API-Key": KEY}, timeout=10).status_code == 404


def test_kill_9_under_load_loses_no_answered_row(server: dict) -> None:
    """Every request that got an answer has its row in the log, even when the whole server is
    killed with SIGKILL mid-load (the answer leaves only after its row's group commit)."""
    root = server["root"] / "kill9"
    env = {**server["env"], "REDI_LOG_DIR": str(root / "logs")}
    root.mkdir()
    proc, url, log_file = _start_server(env, root / "server.log")
    target = {"url": url}
    images = _load_images(server)
    answered: list[str] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        i = seed
        while not stop.is_set():
            try:
                response = _predict(target, images[i % len(images)])
            except requests.RequestException:
                continue  # the server is gone: no answer, nothing owed
            if response.status_code == 200:
                answered.append(response.json()["request_id"])
            i += 1

    try:
        with cf.ThreadPoolExecutor(16) as pool:
            for seed in range(16):
                pool.submit(client, seed)
            deadline = time.monotonic() + 60
            while len(answered) < 60 and time.monotonic() < deadline:
                time.sleep(0.05)
            _kill_9_tree(proc)  # API worker, detector worker, arbiter: all at once
            proc.wait(timeout=30)
            time.sleep(0.5)
            stop.set()
    finally:
        stop.set()
        log_file.close()
    assert len(answered) >= 60, f"only {len(answered)} answers before the kill"
    rows = ProductionLog(root / "logs").read(LINE)
    missing = set(answered) - set(rows["request_id"])
    assert not missing, f"{len(missing)} answered requests have no row in the log"
    print(f"\nkill -9: {len(answered)} answered, {len(rows)} rows logged")


def test_onnx_runtime_scores_equal_torch(server: dict) -> None:
    """REDI_RUNTIME=onnx: the detector service exports the line's model into the cache at load time and
    runs it in onnxruntime; scores equal the torch detector's fp32 graph within 1e-4."""
    pytest.importorskip("onnxruntime")
    from redi.methods.redi.export import torch_fp32

    root = server["root"] / "onnx"
    root.mkdir()
    env = {**server["env"], "REDI_RUNTIME": "onnx", "REDI_LOG_DIR": str(root / "logs"),
           "REDI_MODEL_CACHE": str(root / "cache")}
    proc, url, log_file = _start_server(env, root / "server.log")
    target = {"url": url}
    try:
        meta = requests.post(f"{url}/metadata", json={}, headers={"X-API-Key": KEY}, timeout=30).json()
        assert meta["lines"][LINE]["runtime"] == "onnx" and meta["detector"]["runtime"] == "onnx"
        assert list((root / "cache" / "onnx").rglob("detector.onnx")), "the export should be cached"
        images = _load_images(server)
        detector = server["detector"]
        for content in images:
            with torch_fp32(detector):
                expected = float(detector.predict(detector.preprocess([decode_rgb(content)])).score[0])
            torch_answer = _predict(server, content).json()
            answer = _predict(target, content, return_map=True)
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert abs(body["anomaly_score"] - expected) < 1e-4, (body["anomaly_score"], expected)
            print(f"\nonnx {body['anomaly_score']:.6f} torch fp32 {expected:.6f} torch service (auto precision) "
                  f"{torch_answer['anomaly_score']:.6f}")
        with cf.ThreadPoolExecutor(8) as pool:  # batched in onnxruntime too
            statuses = list(pool.map(lambda i: _predict(target, images[i % len(images)]).status_code, range(32)))
        assert statuses == [200] * 32
        rows = ProductionLog(root / "logs").read(LINE)
        assert rows[feature_columns()].notna().all().all()  # drift rows complete: embedding from the backbone
    finally:
        _stop_server(proc, log_file)


def test_bentoml_build_offline(server: dict) -> None:
    env = {**server["env"], "PIP_NO_INDEX": "1"}
    done = subprocess.run([str(BENTOML), "build", "-f", "serving/bentofile.yaml", ".", "-o", "tag"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    tag = done.stdout.strip().split("__tag__:")[-1].strip()
    name, version = tag.split(":")
    bento = Path(server["env"]["BENTOML_HOME"]) / "bentos" / name / version
    for relative in ("src/serving/service.py", "src/redi/ops/monitoring.py", "src/redi/methods/redi/detector.py"):
        assert (bento / relative).is_file(), relative
    assert not list((bento / "src").rglob("test_*.py"))
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "bentoml==1.4.40" in requirements and "torch" in requirements
