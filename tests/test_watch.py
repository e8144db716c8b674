"""``redi watch``: camera folders to a real ``bentoml serve``, with SIGKILLs of either side, and MQTT
decisions through a real mosquitto broker.

"Exactly once" is checked on the service's side: the production log must hold one row per image
(the rows carry the watcher's ``Idempotency-Key``), however the watcher or the service was killed.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from http_wait import free_port, wait_for_http
from tiny_line import make_line, train_tiny

from redi.core.errors import InputError
from redi.ops.model_registry import promote, publish_version
from redi.ops.object_store import LocalStore
from redi.ops.watcher import Part, StabilityTracker, WatchSettings, is_candidate

REPO = Path(__file__).resolve().parents[1]
LINE = "bottle_caps"
KEY = "watch-test-key-0123456789"
SESSION_SECRET = "watch-test-session-secret-0123456789abcdef"
BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------- without a server
def test_only_finished_images_are_candidates() -> None:
    assert is_candidate("part_0001.png") and is_candidate("P1.JPG")
    for name in (".part_0001.png", "part_0001.png.tmp", "part.png.part", "part.png~", "part.png.result.json",
                 "notes.txt"):
        assert not is_candidate(name), name


def test_a_file_is_ready_once_its_size_stopped_changing() -> None:
    tracker = StabilityTracker(stable_s=1.0)
    path = Path("/cam/a.png")
    assert not tracker.ready(path, 100, 1, now=0.0)
    assert not tracker.ready(path, 200, 2, now=0.9)  # still growing: the clock restarts
    assert not tracker.ready(path, 200, 2, now=1.5)
    assert tracker.ready(path, 200, 2, now=2.0)


def test_the_key_names_the_file_and_its_content_size_and_time() -> None:
    a = Part("cam1", Path("/x/cam1/p.png"), 10, 5)
    assert a.key == Part("cam1", Path("/elsewhere/cam1/p.png"), 10, 5).key  # same camera file: same key
    assert a.key != Part("cam1", Path("/x/cam1/p.png"), 11, 5).key  # a reused name with a new image: new key
    assert a.key != Part("cam2", Path("/x/cam2/p.png"), 10, 5).key


def test_bad_settings_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        WatchSettings(folder=tmp_path / "missing", line=LINE)
    with pytest.raises(InputError, match="--results"):
        WatchSettings(folder=tmp_path, line=LINE, results="sideways")


def test_watch_without_a_key_stops_with_the_variable_to_set(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDI_API_KEY"}
    done = subprocess.run([str(BIN / "redi"), "watch", str(tmp_path), "--line", LINE], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "REDI_API_KEY" in done.stderr, done.stderr


# ----------------------------------------------------------------------------- a real service
class Service:
    """``bentoml serve`` on a fixed port, restartable (the watcher keeps its URL), killable with SIGKILL."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logs = root / "logs"
        self.env = {**os.environ, "BENTOML_HOME": str(root / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
                    "REDI_API_KEY": KEY, "REDI_SESSION_SECRET": SESSION_SECRET, "REDI_LOG_DIR": str(self.logs),
                    "REDI_DEVICE": "cpu", "PYTHONPATH": str(REPO), "REDI_STORE_DIR": str(root / "store"),
                    "REDI_MODEL_CACHE": str(root / "cache"), "REDI_RETAIN": "off"}
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.root / f"server{self.starts}.log", "w")
        self.proc = subprocess.Popen([str(BIN / "bentoml"), "serve", "serving.service:RediService", "--host",
                                      "127.0.0.1", "--port", str(self.port)], cwd=REPO, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if not wait_for_http(f"{self.url}/readyz", self.proc, 180):
            self.stop()
            pytest.fail(f"bentoml serve did not become ready:\n{(self.root / f'server{self.starts}.log').read_text()[-3000:]}")

    def kill9(self) -> None:
        """SIGKILL the server and every process it started (BentoML's workers have process groups of their own)."""
        import psutil

        tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        for process in tree:
            process.send_signal(signal.SIGKILL)
        psutil.wait_procs(tree, timeout=30)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()

    def cameras_by_key(self) -> dict[str, str]:
        """The camera each logged row names, per Idempotency-Key."""
        return {row["idempotency_key"]: row.get("camera", "")
                for path in sorted((self.logs / LINE).glob("*.jsonl"))
                for row in map(json.loads, path.read_text().splitlines()) if row.get("idempotency_key")}

    def rows_by_key(self) -> Counter:
        """Production log rows per Idempotency-Key (rows without one are other tests' direct requests)."""
        counts: Counter = Counter()
        for path in sorted((self.logs / LINE).glob("*.jsonl")):
            for raw in path.read_text().splitlines():
                row = json.loads(raw)
                if row.get("idempotency_key"):
                    counts[row["idempotency_key"]] += 1
        return counts


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("watch")
    data = make_line(root, LINE)
    detector = train_tiny(data, root / "run", LINE)
    store = LocalStore(root / "store")
    publish_version(store, LINE, "v1", {"detector.pt": detector}, {"promote": True, "metrics": {"image_auroc": 0.5}})
    promote(store, LINE, "v1", {"metrics": {"image_auroc": 0.5}}, by="test", reason="fixture")
    server = Service(root)
    server.data = data
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _images(service: Service, n: int, seed: int) -> list[bytes]:
    """``n`` distinct PNGs: the line's test images with a little noise each (as a camera's parts differ)."""
    rng = np.random.default_rng(seed)
    sources = sorted((service.data / "test").rglob("*.png"))
    out = []
    for i in range(n):
        rgb = np.asarray(Image.open(sources[i % len(sources)]).convert("RGB")).astype(np.int16)
        rgb = np.clip(rgb + rng.integers(-3, 4, rgb.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def _drop(folder: Path, name: str, content: bytes, slow: bool = False) -> None:
    """As camera software does: write under a temporary name, then rename (``slow``: in two halves)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{name}.tmp"
    if slow:  # written in place, in two parts: must not be sent half-written
        with open(folder / name, "wb") as handle:
            handle.write(content[: len(content) // 2])
            handle.flush()
            time.sleep(0.4)
            handle.write(content[len(content) // 2:])
        return
    tmp.write_bytes(content)
    os.replace(tmp, folder / name)


def _watcher(service: Service, folder: Path, log: Path, *options: str) -> subprocess.Popen:
    env = {**os.environ, "REDI_API_KEY": KEY}
    return subprocess.Popen([str(BIN / "redi"), "watch", str(folder), "--line", LINE, "--url", service.url,
                             "--stable", "0.3", "--poll", "0.1", "--max-backoff", "1", "--progress", "2", *options],
                            env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT, cwd=REPO)


def _wait(condition, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{log.read_text()[-3000:]}" if log else ""))


def _results(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in folder.rglob("*.result.json")]


def _journal_states(folder: Path) -> Counter:
    path = folder / ".redi-watch" / "journal.sqlite"
    if not path.exists():
        return Counter()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return Counter(dict(db.execute("SELECT state, COUNT(*) FROM parts GROUP BY state").fetchall()))
    except sqlite3.OperationalError:  # not created yet
        return Counter()
    finally:
        db.close()


# ----------------------------------------------------------------------------- MQTT broker
def _mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)


@pytest.fixture
def mqtt_broker(tmp_path: Path):
    """Debian's mosquitto on a free loopback port (installed with apt-get when missing and we are root)."""
    from apt_install import apt_install

    binary = _mosquitto_binary()
    why = apt_install("mosquitto") if binary is None else ""
    binary = binary or _mosquitto_binary()
    if binary is None:
        pytest.skip(why or "apt-get installed mosquitto but no mosquitto binary was found")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=open(tmp_path / "mosquitto.log", "w"),
                            stderr=subprocess.STDOUT)
    import socket

    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"mosquitto did not start: {(tmp_path / 'mosquitto.log').read_text()}")
            time.sleep(0.1)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


class Subscriber:
    """A real MQTT subscriber (QoS 1) that keeps every message it receives."""

    def __init__(self, address: str, topic: str) -> None:
        import paho.mqtt.client as mqtt

        host, port = address.rsplit(":", 1)
        self.messages: list[dict[str, Any]] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="redi-watch-test-subscriber")
        self.client.on_connect = lambda client, *_: client.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _c, _u, msg: self.messages.append(json.loads(msg.payload))
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert self.subscribed.wait(10), "the subscriber was not subscribed"

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# ----------------------------------------------------------------------------- the tests with a server
@pytest.mark.slow
def test_each_image_gets_its_decision_beside_it_in_camera_order_and_on_mqtt(service: Service, tmp_path: Path,
                                                                            mqtt_broker: str) -> None:
    folder = tmp_path / "line"
    folder.mkdir()
    topic = "plant/caps/decisions"
    subscriber = Subscriber(mqtt_broker, topic)
    log = tmp_path / "watch.log"
    watcher = _watcher(service, folder, log, "--mqtt", mqtt_broker, "--topic", topic)
    images = _images(service, 12, seed=1)
    try:
        for i, content in enumerate(images):  # two cameras, interleaved; one file written slowly in place
            _drop(folder / f"cam{i % 2 + 1}", f"part_{i:04d}.png", content, slow=i == 5)
            time.sleep(0.05)
        (folder / "cam1" / "unfinished.png.tmp").write_bytes(images[0])  # a temporary name: never sent
        _wait(lambda: len(_results(folder)) == 12 and len(subscriber.messages) == 12, 120, "12 decisions", log)
        time.sleep(1.0)  # nothing more may come
    finally:
        watcher.terminate()
        watcher.wait(timeout=30)
        subscriber.close()
    results = _results(folder)
    assert len(results) == 12 and not (folder / "cam1" / "unfinished.png.tmp.result.json").exists()
    assert all(r["decision"] in ("normal", "anomalous") for r in results), results
    for camera in ("cam1", "cam2"):  # decided in the order the camera wrote its images
        mine = sorted((r for r in results if r["camera"] == camera), key=lambda r: r["decided_at"])
        assert [r["image"] for r in mine] == sorted(r["image"] for r in mine)
    rows = service.rows_by_key()
    assert all(rows[r["idempotency_key"]] == 1 for r in results), "an image was scored twice or not at all"
    cameras = service.cameras_by_key()  # the service logs (and the review page shows) the camera folder
    assert all(cameras[r["idempotency_key"]] == r["camera"] for r in results), cameras
    assert sorted(m["idempotency_key"] for m in subscriber.messages) == sorted(r["idempotency_key"] for r in results)
    by_key = {r["idempotency_key"]: r for r in results}
    for message in subscriber.messages:
        assert message["decision"] == by_key[message["idempotency_key"]]["decision"]
        assert message["request_id"] == by_key[message["idempotency_key"]]["request_id"]
    assert "parts/s" in log.read_text()  # the progress line: sent, rate, queue


@pytest.mark.slow
def test_a_retried_key_is_answered_from_the_log_without_a_second_row(service: Service) -> None:
    content = _images(service, 1, seed=7)[0]
    headers = {"X-API-Key": KEY, "Idempotency-Key": "direct-retry-key-0001"}

    def post() -> dict[str, Any]:
        response = requests.post(f"{service.url}/predict", files={"image": ("p.png", content)},
                                 data={"line": LINE}, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    first, second = post(), post()
    assert not first.get("replayed") and second["replayed"] is True
    assert second["request_id"] == first["request_id"] and second["decision"] == first["decision"]
    assert second["anomaly_score"] == pytest.approx(first["anomaly_score"])
    assert service.rows_by_key()["direct-retry-key-0001"] == 1
    bad = requests.post(f"{service.url}/predict", files={"image": ("p.png", content)}, data={"line": LINE},
                        headers={"X-API-Key": KEY, "Idempotency-Key": "no spaces"}, timeout=60)
    assert bad.status_code == 422 and "Idempotency-Key" in bad.json()["error"], bad.text
    odd = requests.post(f"{service.url}/predict", files={"image": ("p.png", content)},
                        data={"line": LINE, "camera": "cam 1/../x"}, headers={"X-API-Key": KEY}, timeout=60)
    assert odd.status_code == 422 and "camera" in odd.json()["error"], odd.text


@pytest.mark.slow
def test_watcher_killed_mid_stream_then_restarted_decides_every_image_once(service: Service, tmp_path: Path) -> None:
    folder = tmp_path / "line"
    n = 24
    for i, content in enumerate(_images(service, n, seed=2)):
        _drop(folder / "cam1", f"part_{i:04d}.png", content)
    log = tmp_path / "watch.log"
    watcher = _watcher(service, folder, log, "--results", "folders", "--inflight", "4")
    # kill it while requests are out: some parts 'sending' (maybe scored by the service, answer not recorded)
    _wait(lambda: _journal_states(folder)["done"] >= 4 and _journal_states(folder)["sending"] >= 1, 120,
          "parts in flight after some were decided", log)
    watcher.send_signal(signal.SIGKILL)
    watcher.wait(timeout=10)
    states = _journal_states(folder)
    assert states["sending"] >= 1, states  # the restart has something to resend
    time.sleep(2.0)  # the service finishes (and logs) what the dead watcher sent
    restarted = _watcher(service, folder, log, "--results", "folders", "--once")
    assert restarted.wait(timeout=180) == 0, log.read_text()[-3000:]
    moved = sorted((folder / "cam1").glob("ok/*.png")) + sorted((folder / "cam1").glob("ng/*.png"))
    assert len(moved) == n and not list((folder / "cam1").glob("*.png")), log.read_text()[-2000:]
    results = _results(folder)
    assert len(results) == n
    rows = service.rows_by_key()
    counts = Counter(rows[r["idempotency_key"]] for r in results)
    assert counts == Counter({1: n}), f"rows per image: {counts} (0: lost, 2+: sent twice)"
    for result in results:  # each image sits in the folder its decision names
        folder_name = {"normal": "ok", "anomalous": "ng"}[result["decision"]]
        assert (folder / "cam1" / folder_name / result["image"]).exists()


@pytest.mark.slow
def test_service_killed_mid_stream_then_restarted_loses_no_image_and_scores_none_twice(service: Service,
                                                                                      tmp_path: Path) -> None:
    folder = tmp_path / "line"
    n = 24
    log = tmp_path / "watch.log"
    watcher = _watcher(service, folder, log, "--inflight", "4")
    try:
        for i, content in enumerate(_images(service, n, seed=3)):
            _drop(folder / "cam1", f"part_{i:04d}.png", content)
        _wait(lambda: len(_results(folder)) >= 4, 120, "the first decisions", log)
        service.kill9()
        decided_while_up = _results(folder)
        time.sleep(3.0)  # the watcher meets a dead service and retries
        service.start()
        _wait(lambda: len(_results(folder)) == n, 240, "every decision after the restart", log)
    finally:
        watcher.terminate()
        watcher.wait(timeout=30)
    assert "retrying" in log.read_text()
    results = _results(folder)
    rows = service.rows_by_key()
    counts = Counter(rows[r["idempotency_key"]] for r in results)
    assert counts == Counter({1: n}), f"rows per image: {counts} (0: lost, 2+: sent twice)"
    # a key answered before the kill is answered by the new process from the production log
    early = decided_while_up[0]
    response = requests.post(f"{service.url}/predict", files={"image": ("again.png", b"x")}, data={"line": LINE},
                             headers={"X-API-Key": KEY, "Idempotency-Key": early["idempotency_key"]}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["replayed"] is True and response.json()["request_id"] == early["request_id"]
    assert service.rows_by_key()[early["idempotency_key"]] == 1


@pytest.mark.slow
def test_throughput_of_the_watcher(service: Service, tmp_path: Path) -> None:
    """Parts per second ``redi watch --once`` sustains on a backlog (printed; docs/benchmarks.md)."""
    folder = tmp_path / "line"
    n = 60
    for i, content in enumerate(_images(service, n, seed=4)):
        _drop(folder / "cam1", f"part_{i:04d}.png", content)
    time.sleep(0.5)
    rates = {}
    for inflight in ("1", "4"):
        for result in folder.rglob("*.result.json"):
            result.unlink()
        shutil.rmtree(folder / ".redi-watch", ignore_errors=True)
        for i, path in enumerate(sorted((folder / "cam1").glob("*.png"))):  # new mtimes: new keys, scored again
            os.utime(path, ns=(time.time_ns() + i, time.time_ns() + i))
        time.sleep(0.5)
        log = tmp_path / f"watch{inflight}.log"
        done = _watcher(service, folder, log, "--once", "--inflight", inflight, "--stable", "0.2")
        assert done.wait(timeout=600) == 0, log.read_text()[-3000:]
        summary = json.loads(log.read_text().strip().splitlines()[-1])  # from the first scan to the last decision
        assert summary["sent"] == n and len(_results(folder)) == n
        rates[inflight] = summary["parts_per_s"]
    direct = {}  # the same images posted straight to /predict by 1 and 4 closed-loop clients: the ceiling
    contents = [path.read_bytes() for path in sorted((folder / "cam1").glob("*.png"))]
    for clients in (1, 4):
        session = requests.Session()

        def post(content: bytes) -> int:
            return session.post(f"{service.url}/predict", files={"image": ("p.png", content)}, data={"line": LINE},
                                headers={"X-API-Key": KEY}, timeout=60).status_code

        started = time.perf_counter()
        with cf.ThreadPoolExecutor(clients) as pool:
            assert set(pool.map(post, contents)) == {200}
        direct[clients] = n / (time.perf_counter() - started)
    print(f"\nredi watch --once, {n} parts of 128x128 px, tiny model (load average {os.getloadavg()[0]:.2f}): "
          + ", ".join(f"inflight {k}: {v:.1f} parts/s" for k, v in rates.items())
          + "; direct /predict: " + ", ".join(f"{k} client(s): {v:.1f} images/s" for k, v in direct.items()))


@pytest.mark.slow
def test_a_wrong_key_stops_the_watcher_with_the_reason_and_the_image_waits(service: Service, tmp_path: Path) -> None:
    folder = tmp_path / "line"
    _drop(folder, "part_0000.png", _images(service, 1, seed=5)[0])
    env = {**os.environ, "REDI_API_KEY": "not-the-key-0123456789"}
    done = subprocess.run([str(BIN / "redi"), "watch", str(folder), "--line", LINE, "--url", service.url, "--once",
                           "--stable", "0.2"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "403" in done.stderr and "--key-env" in done.stderr, done.stderr[-2000:]
    assert (folder / "part_0000.png").exists() and not _results(folder)
    # with the right key the same image is decided: it waited in the folder (journal: still 'sending')
    retry = _watcher(service, folder, tmp_path / "watch.log", "--once")
    assert retry.wait(timeout=120) == 0 and len(_results(folder)) == 1
