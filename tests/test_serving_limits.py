"""Request limits and start-up refusals of the real ``bentoml serve`` (issue 18, items 4, 5, 6, 13).

- every route's body is bounded before anything parses it, public ``POST /review/login`` included;
- a chunked ``/predict`` (no Content-Length) is cut at the limit, not spooled whole;
- no key without ``REDI_OPEN_MODE=1``, no example or short key: the server exits with the reason;
  open mode is announced in the log, ``/readyz``, ``/metadata`` and ``/metrics``;
- images with more pixels than the default limit are refused from their header, before decoding.
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from http_wait import BentoServer  # tests/ is on sys.path (rootdir conftest)
from PIL import Image
from tiny_line import make_line, train_tiny

from redi.ops.model_registry import promote, publish_version
from redi.ops.object_store import LocalStore
from serving.review_metrics import metric_value
from serving.settings import DEFAULT_MAX_PIXELS, FORM_BODY_BYTES, MULTIPART_SLACK, api_key_problem

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LINE = "bottle_caps"
KEY = "limits-key-0123456789abcdef"
SESSION_SECRET = "limits-session-secret-0123456789abcdef"  # the review page's cookie key: not the API key
MAX_UPLOAD = 1_000_000
BODY_LIMIT = MAX_UPLOAD + MULTIPART_SLACK


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A promoted tiny model in a local store and the environment that serves it (no key yet)."""
    root = tmp_path_factory.mktemp("limits")
    data = make_line(root, LINE)
    detector = train_tiny(data, root / "run", LINE)
    store = LocalStore(root / "store")
    publish_version(store, LINE, "v1", {"detector.pt": detector}, {"promote": True, "metrics": {"image_auroc": 0.5}})
    promote(store, LINE, "v1", {"metrics": {"image_auroc": 0.5}}, by="test", reason="fixture")
    env = {**os.environ, "BENTOML_HOME": str(root / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
           "REDI_LOG_DIR": str(root / "logs"), "REDI_DEVICE": "cpu", "PYTHONPATH": str(REPO),
           "REDI_STORE_DIR": str(root / "store"), "REDI_MODEL_CACHE": str(root / "cache"),
           "REDI_MAX_UPLOAD_BYTES": str(MAX_UPLOAD), "REDI_DETECTOR_WORKERS": "1", "REDI_DETECTOR_CHUNK": "1"}
    for name in ("REDI_API_KEY", "REDI_SESSION_SECRET", "REDI_OPEN_MODE", "REDI_MAX_PIXELS", "REDI_S3_ENDPOINT"):
        env.pop(name, None)
    return {"root": root, "data": data, "env": env}


@pytest.fixture(scope="module")
def server(world: dict):
    """The service with a key and the default pixel limit; its temp folder is watched by the tests."""
    tmp = world["root"] / "server-tmp"
    tmp.mkdir()
    env = {**world["env"], "REDI_API_KEY": KEY, "REDI_SESSION_SECRET": SESSION_SECRET, "TMPDIR": str(tmp)}
    served = BentoServer(env, world["root"] / "server.log")
    try:
        yield {"url": served.url, "tmp": tmp, "server": served, "data": world["data"]}
    finally:
        served.stop()


def _good_image(server: dict) -> bytes:
    return (server["data"] / "test" / "good" / "000.png").read_bytes()


def _still_serves(server: dict) -> None:
    response = requests.post(f"{server['url']}/predict", files={"image": ("good.png", _good_image(server))},
                             data={"line": LINE}, headers={"X-API-Key": KEY}, timeout=60)
    assert response.status_code == 200, response.text


class DiskWatch:
    """The largest file in a folder (Prometheus' ``*.db`` files aside), sampled every 20 ms while it runs:
    where Starlette spools an uploaded part."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.largest, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in self.folder.rglob("*"):
                try:
                    if path.is_file() and path.suffix != ".db":
                        self.largest = max(self.largest, path.stat().st_size)
                except OSError:
                    pass  # deleted while we looked
            time.sleep(0.02)

    def __enter__(self) -> "DiskWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _read_status(sock: socket.socket, timeout_s: float) -> tuple[int, str]:
    """The status code and body of the HTTP response on ``sock`` (waits at most ``timeout_s``)."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 20:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        pass
    if not data:
        return 0, ""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode("utf-8", "replace")


def test_public_login_refuses_a_declared_huge_body_before_reading_it(server: dict) -> None:
    """Item 4: a 50 MB multipart login is answered 413 at once, while the client has sent only its headers
    (the old service parsed public routes with no limit: it waited for the 50 MB to spool them)."""
    port = int(server["url"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /review/login HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 50000000\r\n\r\n"
                     b"--xyz\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a\"\r\n\r\n")
        started = time.monotonic()
        status, body = _read_status(sock, 15)
    assert status == 413, f"expected 413 before the body was sent, got {status} {body!r}"
    assert time.monotonic() - started < 10
    assert "50000000 bytes" in body and str(FORM_BODY_BYTES) in body, body
    # a real (small-limit-passing) login form still reaches the login page's own checks
    response = requests.post(f"{server['url']}/review/login", data={"key": "wrong"}, timeout=30,
                             allow_redirects=False)
    assert response.status_code != 413, response.text


def _chunked_post(url: str, total: int, headers: dict[str, str], chunk: int = 64 * 1024) -> tuple[int, int | None]:
    """POST ``total`` bytes as a chunked body (no Content-Length); returns (bytes the server took, status).

    The status is None when the server closed the connection while the body was still being sent
    (after it answered 413, which the client may not get to read)."""
    sent = 0
    head = (b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")  # a file part: what Starlette spools to disk

    def body():
        nonlocal sent
        sent = len(head)
        yield head
        block = b"\0" * chunk
        while sent < total:
            sent += chunk
            yield block

    try:
        response = requests.post(url, data=body(), headers={**headers, "Content-Type": "multipart/form-data; "
                                                                                        "boundary=xyz"}, timeout=120)
        return sent, response.status_code
    except requests.ConnectionError:
        return sent, None


@pytest.mark.parametrize("route", ["/predict", "/review/login"])
def test_chunked_body_is_cut_at_the_limit_not_spooled(server: dict, route: str) -> None:
    """Item 5 (and 4 for the public login): 100 MB sent chunked, without Content-Length, is refused
    after about the route's limit; the server's temp folder never holds more than the limit."""
    total = 100 * 1024 * 1024
    limit = BODY_LIMIT if route == "/predict" else FORM_BODY_BYTES
    with DiskWatch(server["tmp"]) as disk:
        started = time.monotonic()
        taken, status = _chunked_post(f"{server['url']}{route}", total, {"X-API-Key": KEY})
        elapsed = time.monotonic() - started
    # what the client could push before the server stopped reading: the limit plus socket buffers
    assert taken < limit + 16 * 1024 * 1024, f"the server read {taken} of {total} bytes (limit {limit}), answered {status}"
    assert status in (413, None), status
    assert disk.largest <= limit, f"{disk.largest} bytes were spooled to the server's temp folder"
    print(f"{route}: client pushed {taken} bytes of {total} before the server cut it ({elapsed:.2f} s); "
          f"largest spool {disk.largest} bytes")
    _still_serves(server)


def test_declared_oversized_predict_gets_413_with_the_setting(server: dict) -> None:
    response = requests.post(f"{server['url']}/predict", files={"image": ("big.png", os.urandom(MAX_UPLOAD + 200_000))},
                             data={"line": LINE}, headers={"X-API-Key": KEY}, timeout=60)
    assert response.status_code == 413 and "REDI_MAX_UPLOAD_BYTES" in response.json()["error"], response.text
    metrics = requests.get(f"{server['url']}/metrics", timeout=10).text
    assert (metric_value(metrics, "redi_request_body_refused_total", route="/predict") or 0) >= 1


def _png_of(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def test_default_pixel_limit_refuses_a_huge_image_from_its_header(server: dict) -> None:
    """Item 13: a 6000 x 6000 PNG (a few hundred KB on the wire, 108 MB decoded, ~360 MB on the way to
    the model) is refused by the default REDI_MAX_PIXELS before a pixel is decoded; the old default
    (40 M) decoded it."""
    side = 6000
    assert side * side > DEFAULT_MAX_PIXELS
    content = _png_of(side, side)
    assert len(content) < MAX_UPLOAD
    started = time.monotonic()
    response = requests.post(f"{server['url']}/predict", files={"image": ("huge.png", content)}, data={"line": LINE},
                             headers={"X-API-Key": KEY}, timeout=120)
    elapsed = time.monotonic() - started
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert f"{side}x{side}" in error and "REDI_MAX_PIXELS" in error, error
    meta = requests.post(f"{server['url']}/metadata", json={}, headers={"X-API-Key": KEY}, timeout=30).json()
    assert meta["limits"]["max_pixels"] == DEFAULT_MAX_PIXELS and meta["open_mode"] is False
    assert meta["retention"]["queue_bytes"] > 0
    print(f"refused a {side}x{side} upload of {len(content)} bytes in {elapsed:.2f} s")
    _still_serves(server)


# ----------------------------------------------------------------------------- start-up refusals (item 6)
@pytest.mark.parametrize("key, expected", [
    (None, "REDI_OPEN_MODE=1"),
    ("change-me", "example key"),
    ("short-key", "at least 16"),
])
def test_service_refuses_to_start_without_a_real_key(world: dict, tmp_path: Path, key: str | None,
                                                     expected: str) -> None:
    env = dict(world["env"])
    if key is not None:
        env.update(REDI_API_KEY=key, REDI_SESSION_SECRET=SESSION_SECRET)
    served = BentoServer(env, tmp_path / "server.log", wait_ready=None)
    try:
        served.proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        output = served.output()
        served.stop()
        pytest.fail(f"the service started with REDI_API_KEY={key!r}:\n{output[-2000:]}")
    output = served.output()
    served.stop()
    assert served.proc.returncode != 0
    assert "refuses to start" in output and expected in output, output[-2000:]


def test_documented_example_keys_are_refused() -> None:
    """A key written out in ``docs/serving.md`` (anyone can read it) would not start a service."""
    text = (REPO / "docs" / "serving.md").read_text()
    literal = {k for k in re.findall(r"(?:REDI_API_KEY=|X-API-Key: )([^\s`'\"]+)", text) if not k.startswith("$")}
    for example in literal | {"change-me"}:
        assert api_key_problem(example, False) is not None, f"docs/serving.md's example key {example!r} would start"


def test_open_mode_is_explicit_and_announced(world: dict, tmp_path: Path) -> None:
    env = {**world["env"], "REDI_OPEN_MODE": "1"}
    served = BentoServer(env, tmp_path / "server.log")
    try:
        ready = requests.get(f"{served.url}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["open_mode"] is True, ready.text
        meta = requests.post(f"{served.url}/metadata", json={}, timeout=30)  # no key needed: open
        assert meta.status_code == 200 and meta.json()["open_mode"] is True and not meta.json()["api_key_required"]
        metrics = requests.get(f"{served.url}/metrics", timeout=10).text
        assert metric_value(metrics, "redi_open_mode") == 1.0, metrics[-2000:]
        assert "WITHOUT an API key" in served.output()
    finally:
        served.stop()
    # both at once is a contradiction, refused
    env.update(REDI_API_KEY=KEY, REDI_SESSION_SECRET=SESSION_SECRET)
    both = BentoServer(env, tmp_path / "both.log", wait_ready=None)
    assert both.proc.wait(timeout=90) != 0 and "unset one of them" in both.output()
    both.stop()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))
