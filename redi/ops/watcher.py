"""Camera folders to the service: every image a line camera writes is scored once and its decision
written where the line's software reads it.

``redi watch FOLDER --line L --url URL`` (``redi/cli/watch.py``) runs :class:`FolderWatcher`:

- **Cameras.** Each subfolder of FOLDER is a camera (images directly in FOLDER are the camera
  ``.``); its images are sent in the order the camera wrote them (mtime, then name) and their
  decisions written in that order. ``ok/``, ``ng/``, ``rejected/``, hidden folders and the state
  folder are not cameras.
- **Only finished files.** A file is sent once its size and mtime did not change for
  ``stable_s`` seconds; hidden names (``.x``), ``*.tmp``, ``*.part``, ``*.partial``, ``*~`` and
  non-image extensions are ignored (camera software writes a temporary name, then renames).
- **Once, across restarts.** A journal (SQLite, ``synchronous=FULL``, in the state folder) records
  each part as ``sending`` before its request and ``done`` (with the answer) once the decision was
  delivered. Every request carries an ``Idempotency-Key`` made from the camera, file name, size
  and mtime; the service answers a key it already logged from its production log instead of
  scoring again (``redi.ops.idempotency``). So after a SIGKILL of the watcher or of the service, a
  part left ``sending`` is sent again with the same key and is scored and logged exactly once
  (its decision is delivered again: the same result file; see MQTT below).
- **Retries.** Connection errors, timeouts and 5xx answers are retried with a backoff (doubling,
  at most ``max_backoff_s``), logged, for as long as it takes: the line's images are never
  dropped because the service restarts. 400/413/422 (an image the service cannot read) are final:
  the part is ``rejected`` with the service's message. 401/403/404 stop the watcher with the
  reason (a wrong key or line is a configuration error, not a part's).
- **Decisions.** ``beside``: ``NAME.result.json`` next to the image. ``folders``: the image moves
  into ``<camera>/ok/`` or ``<camera>/ng/`` (``rejected/`` for refused images) with its
  ``NAME.result.json`` beside it. Files are written atomically (temporary name, fsync,
  ``os.replace``), the result before the image moves, so line software never reads half a file.
- **MQTT** (optional): each decision as JSON on a topic with QoS 1, acknowledged by the broker
  before the part is ``done`` (QoS 1 is at-least-once: a crash between the broker's
  acknowledgement and the journal's ``done`` publishes that decision again on restart; the
  message carries ``idempotency_key`` for subscribers that must dedupe).

The library talks HTTP with ``requests``; it imports nothing from ``serving/``.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections import deque
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from redi.core.errors import ConfigError, InputError, RediError

LOG = logging.getLogger("redi.watch")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", "~")
RESULT_SUFFIX = ".result.json"
OUTPUT_FOLDERS = frozenset({"ok", "ng", "rejected"})
ROOT_CAMERA = "."
RESULT_MODES = ("beside", "folders")
CHUNK_WINDOWS = 4  # a camera sends this many windows of --inflight parts before the next camera's turn
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
FINAL_STATUS = frozenset({400, 413, 415, 422})


@dataclass
class WatchSettings:
    """What the watcher needs; the CLI fills it from its options."""

    folder: Path
    line: str
    url: str = "http://127.0.0.1:3000"
    api_key: str = ""
    results: str = "beside"
    state_dir: Path | None = None
    poll_s: float = 0.5
    stable_s: float = 1.0
    inflight: int = 4
    timeout_s: float = 60.0
    max_backoff_s: float = 30.0
    progress_s: float = 10.0
    mqtt: str = ""
    topic: str = ""
    return_regions: bool = True

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        if not self.folder.is_dir():
            raise InputError(f"the camera folder {self.folder} does not exist; create it or point --folder at "
                             f"the folder the camera software writes to")
        if self.results not in RESULT_MODES:
            raise InputError(f"--results {self.results!r} is not one of {', '.join(RESULT_MODES)}")
        if self.inflight < 1:
            raise InputError(f"--inflight must be at least 1, got {self.inflight}")
        self.state_dir = Path(self.state_dir) if self.state_dir else self.folder / ".redi-watch"
        self.url = self.url.rstrip("/")
        self.topic = self.topic or f"redi/{self.line}/decisions"


@dataclass(frozen=True)
class Part:
    """One finished image of one camera."""

    camera: str
    path: Path
    size: int
    mtime_ns: int

    @property
    def key(self) -> str:
        """The part's idempotency key: the same file (camera, name, size, mtime) always gets the same one."""
        ident = f"{self.camera}/{self.path.name}:{self.size}:{self.mtime_ns}"
        return hashlib.sha256(ident.encode()).hexdigest()[:40]


# ----------------------------------------------------------------------------- the journal
class Journal:
    """Each part's state (``sending`` -> ``done`` | ``rejected``), durable at every step."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.lock = threading.Lock()
        with self.lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # every commit fsync-ed: a recorded state survives a crash
            self.db.execute("""CREATE TABLE IF NOT EXISTS parts (
                key TEXT PRIMARY KEY, camera TEXT NOT NULL, path TEXT NOT NULL, size INTEGER, mtime_ns INTEGER,
                state TEXT NOT NULL, answer TEXT, attempts INTEGER DEFAULT 0, updated TEXT)""")

    def state(self, key: str) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT state FROM parts WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def sending(self, part: Part) -> None:
        """Recorded BEFORE the request leaves: a crash after it means 'maybe sent', resent with the same key."""
        with self.lock:
            self.db.execute(
                "INSERT INTO parts (key, camera, path, size, mtime_ns, state, attempts, updated) "
                "VALUES (?, ?, ?, ?, ?, 'sending', 1, ?) ON CONFLICT(key) DO UPDATE SET "
                "attempts = attempts + 1, updated = excluded.updated",
                (part.key, part.camera, str(part.path), part.size, part.mtime_ns, _now()))

    def done(self, part: Part, answer: dict[str, Any], state: str = "done") -> None:
        """The decision was delivered (``done``) or the service refused the image for good (``rejected``)."""
        with self.lock:
            self.db.execute("UPDATE parts SET state = ?, answer = ?, updated = ? WHERE key = ?",
                            (state, json.dumps(answer), _now(), part.key))

    def unfinished(self) -> list[Part]:
        """Parts a previous run left ``sending`` (maybe scored, decision not delivered), in camera order."""
        with self.lock:
            rows = self.db.execute("SELECT camera, path, size, mtime_ns FROM parts WHERE state = 'sending' "
                                   "ORDER BY camera, mtime_ns, path").fetchall()
        return [Part(c, Path(p), s, m) for c, p, s, m in rows]

    def counts(self) -> dict[str, int]:
        with self.lock:
            return dict(self.db.execute("SELECT state, COUNT(*) FROM parts GROUP BY state").fetchall())

    def close(self) -> None:
        with self.lock:
            self.db.close()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


# ----------------------------------------------------------------------------- finding finished images
def is_candidate(name: str) -> bool:
    """Whether a file name is an image a camera finished (not hidden, temporary or a result file)."""
    lower = name.lower()
    if name.startswith(".") or lower.endswith(TEMP_SUFFIXES) or lower.endswith(RESULT_SUFFIX):
        return False
    return Path(lower).suffix in IMAGE_SUFFIXES


def camera_folders(folder: Path, state_dir: Path) -> dict[str, Path]:
    """Camera name -> folder: each subfolder that is no output or state folder, and the folder itself."""
    cameras = {ROOT_CAMERA: folder}
    for entry in sorted(folder.iterdir()):
        if (entry.is_dir() and not entry.name.startswith(".") and entry.name not in OUTPUT_FOLDERS
                and entry.resolve() != state_dir.resolve()):
            cameras[entry.name] = entry
    return cameras


@dataclass
class StabilityTracker:
    """A file is finished once its (size, mtime) stayed the same for ``stable_s`` seconds."""

    stable_s: float
    seen: dict[Path, tuple[int, int, float]] = field(default_factory=dict)

    def ready(self, path: Path, size: int, mtime_ns: int, now: float) -> bool:
        last = self.seen.get(path)
        if last is None or last[:2] != (size, mtime_ns):
            self.seen[path] = (size, mtime_ns, now)
            return self.stable_s <= 0
        return now - last[2] >= self.stable_s

    def forget(self, path: Path) -> None:
        self.seen.pop(path, None)


# ----------------------------------------------------------------------------- the watcher
class WatchStopped(RediError):
    """The watcher cannot go on (wrong key, unknown line): the message says what to fix."""


class FolderWatcher:
    """Polls a camera folder and sends each finished image once (see the module docstring)."""

    def __init__(self, settings: WatchSettings) -> None:
        self.settings = settings
        self.journal = Journal(settings.state_dir / "journal.sqlite")
        self.tracker = StabilityTracker(settings.stable_s)
        self.http = requests.Session()
        self.http.headers["X-API-Key"] = settings.api_key
        self.pool = cf.ThreadPoolExecutor(settings.inflight, thread_name_prefix="redi-watch")
        self.publisher = MqttPublisher(settings.mqtt, settings.topic) if settings.mqtt else None
        self.stop = threading.Event()
        self.sent = self.retries = self.rejected = 0
        self.queue_length = 0
        self._progress_at = time.monotonic()
        self._progress_sent = 0
        self._started = time.monotonic()

    # -- the loop ------------------------------------------------------------------------------
    def run(self, once: bool = False) -> dict[str, int]:
        """Watch until :attr:`stop` is set (or, with ``once``, until no unfinished image is left)."""
        LOG.info("watching %s for line %s -> %s (results: %s, state: %s%s)", self.settings.folder,
                 self.settings.line, self.settings.url, self.settings.results, self.settings.state_dir,
                 f", MQTT {self.settings.mqtt} topic {self.settings.topic}" if self.publisher else "")
        self._started = time.monotonic()
        self.recover()
        while not self.stop.is_set():
            queues, waiting = self.scan()
            self.queue_length = sum(len(q) for q in queues.values()) + waiting
            chunk = CHUNK_WINDOWS * self.settings.inflight  # cameras take turns: no backlog starves another camera
            for start in range(0, max((len(q) for q in queues.values()), default=0), chunk):
                for parts in queues.values():
                    if not self.stop.is_set():
                        self.process(parts[start:start + chunk])
            if once and not any(queues.values()) and not waiting:
                break
            if not any(queues.values()):
                self.stop.wait(self.settings.poll_s)
        self.progress(force=True)
        return self.summary()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.journal.close()
        if self.publisher:
            self.publisher.close()

    def summary(self) -> dict[str, Any]:
        """Parts sent, retries and refusals of this run, its rate, and the journal's parts per state."""
        elapsed = time.monotonic() - self._started
        return {"sent": self.sent, "retries": self.retries, "rejected": self.rejected, "elapsed_s": round(elapsed, 3),
                "parts_per_s": round(self.sent / max(elapsed, 1e-9), 2), "journal": self.journal.counts()}

    def recover(self) -> None:
        """Finish what a killed run left: resend its ``sending`` parts with the same keys (the service
        replays those it scored), camera by camera in order."""
        unfinished = self.journal.unfinished()
        if unfinished:
            LOG.warning("resuming %d part(s) a previous run left unfinished", len(unfinished))
        resend: dict[str, list[Part]] = {}
        for part in unfinished:
            if part.path.exists():
                resend.setdefault(part.camera, []).append(part)
                continue
            moved = _moved_result(part)
            if moved is not None:  # folders mode: moved into ok/ng before 'done' was recorded
                self.journal.done(part, moved)
            else:  # deleted by someone after 'sending': nothing to send; say where its decision may be
                LOG.error("part %s was being sent when the watcher stopped and its file is gone; its decision may "
                          "be in the service's production log (Idempotency-Key %s)", part.path, part.key)
                self.journal.done(part, {"error": "file gone before its decision was delivered"}, state="rejected")
        for parts in resend.values():
            self.process(parts)

    def scan(self) -> tuple[dict[str, list[Part]], int]:
        """Finished, not yet handled images per camera (in the camera's order), and how many are still being written."""
        now = time.monotonic()
        queues: dict[str, list[Part]] = {}
        waiting = 0
        for camera, folder in camera_folders(self.settings.folder, self.settings.state_dir).items():
            parts = []
            with os.scandir(folder) as entries:
                for entry in entries:
                    if not entry.is_file(follow_symlinks=False) or not is_candidate(entry.name):
                        continue
                    stat = entry.stat()
                    path = Path(entry.path)
                    if not self.tracker.ready(path, stat.st_size, stat.st_mtime_ns, now):
                        waiting += 1
                        continue
                    part = Part(camera, path, stat.st_size, stat.st_mtime_ns)
                    if self.handled(part):
                        continue
                    parts.append(part)
            parts.sort(key=lambda p: (p.mtime_ns, p.path.name))
            queues[camera] = parts
        return queues, waiting

    def handled(self, part: Part) -> bool:
        """Whether this part already has its decision (journal, or a result file of this very file)."""
        if self.journal.state(part.key) in ("done", "rejected"):
            self.tracker.forget(part.path)
            return True
        result = result_path(part.path)
        if result.exists():  # a lost journal: the result file names the file it was made for
            try:
                return json.loads(result.read_text()).get("idempotency_key") == part.key
            except (OSError, ValueError):
                return False
        return False

    # -- one window of parts ---------------------------------------------------------------------
    def process(self, parts: list[Part]) -> None:
        """Send one camera's parts, ``inflight`` at a time (a sliding window); deliver the decisions in
        the camera's order, each as soon as it and every part before it are answered."""
        waiting = iter(parts)
        window: deque[tuple[Part, cf.Future]] = deque()

        def send_next() -> None:
            part = next(waiting, None)
            if part is not None and not self.stop.is_set():
                self.journal.sending(part)  # on disk before the request leaves
                window.append((part, self.pool.submit(self.send, part)))

        for _ in range(self.settings.inflight):
            send_next()
        while window:
            part, future = window.popleft()
            answer = future.result()
            if answer is not None:  # None: stopped while retrying; stays 'sending', resent on the next start
                self.deliver(part, answer)
                self.sent += 1
            self.queue_length -= 1
            send_next()
            self.progress()

    def send(self, part: Part) -> dict[str, Any] | None:
        """The service's answer for one part, retrying while it is down; None when stopped meanwhile."""
        backoff = 0.5
        while not self.stop.is_set():
            problem = self._post(part)
            if isinstance(problem, dict):
                return problem
            self.retries += 1
            LOG.warning("%s: %s; retrying in %.1f s", part.path.name, problem, backoff)
            self.stop.wait(backoff)
            backoff = min(backoff * 2, self.settings.max_backoff_s)
        return None

    def _post(self, part: Part) -> dict[str, Any] | str:
        """One request: the answer (a decision, or a final refusal) as a dict, or why to retry as a string."""
        try:
            content = part.path.read_bytes()
        except FileNotFoundError:
            return {"decision": "rejected", "error": "the file disappeared before it was sent"}
        try:
            response = self.http.post(
                f"{self.settings.url}/predict", files={"image": (part.path.name, content)},
                data={"line": self.settings.line, "return_regions": str(self.settings.return_regions).lower(),
                      **({"camera": camera_name(part.camera)} if part.camera != "." else {})},
                headers={"Idempotency-Key": part.key}, timeout=self.settings.timeout_s)
        except requests.RequestException as exc:
            return f"the service at {self.settings.url} cannot be reached ({type(exc).__name__})"
        if response.status_code == 200:
            return response.json()
        message = _error_message(response)
        if response.status_code in RETRY_STATUS:
            return f"the service answered {response.status_code} ({message})"
        if response.status_code in FINAL_STATUS:
            self.rejected += 1
            return {"decision": "rejected", "status": response.status_code, "error": message}
        self.stop.set()
        raise WatchStopped(f"the service refused the watcher ({response.status_code}: {message}); fix the "
                           f"setting it names (--key-env, --line, --url) and restart: unsent images wait")

    # -- delivery --------------------------------------------------------------------------------
    def deliver(self, part: Part, answer: dict[str, Any]) -> None:
        """Write the decision where the line reads it (and publish it), then mark the part done."""
        record = decision_record(part, answer, self.settings.line)
        if self.settings.results == "beside":
            atomic_write_json(result_path(part.path), record)
        else:
            move_with_result(part, record)
        if self.publisher:
            self.publisher.publish(record, self.stop)
        if record["decision"] == "rejected":
            LOG.error("%s refused by the service: %s", part.path, answer.get("error"))
        self.journal.done(part, answer, state="rejected" if record["decision"] == "rejected" else "done")
        self.tracker.forget(part.path)

    def progress(self, force: bool = False) -> None:
        """Log parts sent, the rate since the last report and the queue length, every ``progress_s``."""
        now = time.monotonic()
        if not force and now - self._progress_at < self.settings.progress_s:
            return
        rate = (self.sent - self._progress_sent) / max(now - self._progress_at, 1e-9)
        LOG.info("sent %d parts (%.2f parts/s), queue %d, retries %d, rejected %d", self.sent, rate,
                 max(self.queue_length, 0), self.retries, self.rejected)
        self._progress_at, self._progress_sent = now, self.sent


def camera_name(folder: str) -> str:
    """The camera name the service logs for a camera folder (its ``[A-Za-z0-9._-]``, at most 64)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", folder)[:64]


def _error_message(response: requests.Response) -> str:
    try:
        return str(response.json().get("error", response.text[:200]))
    except ValueError:
        return response.text[:200]


def _moved_result(part: Part) -> dict[str, Any] | None:
    """The result file of this part in ok/, ng/ or rejected/ (folders mode), or None."""
    for name in sorted(OUTPUT_FOLDERS):
        for result in (part.path.parent / name).glob(f"{part.path.stem}*{RESULT_SUFFIX}"):
            try:
                record = json.loads(result.read_text())
            except (OSError, ValueError):
                continue
            if record.get("idempotency_key") == part.key:
                return record
    return None


def result_path(image: Path) -> Path:
    return image.with_name(image.name + RESULT_SUFFIX)


def decision_record(part: Part, answer: dict[str, Any], line: str) -> dict[str, Any]:
    """What line software reads: the decision, score, threshold, model and the service's request id."""
    record = {"image": part.path.name, "camera": part.camera, "line": line,
              "decision": answer.get("decision", "rejected"), "idempotency_key": part.key,
              "decided_at": _now()}
    for name in ("anomalous", "anomaly_score", "threshold", "model_version", "request_id", "defect_regions",
                 "replayed", "error", "status"):
        if name in answer:
            record[name] = answer[name]
    return record


def atomic_write_json(path: Path, record: dict[str, Any]) -> None:
    """Write JSON under a temporary hidden name, fsync, then rename: readers see all of it or nothing."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        json.dump(record, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def move_with_result(part: Part, record: dict[str, Any]) -> None:
    """``folders`` mode: the result file into ok/ng/rejected first, then the image beside it."""
    target_dir = part.path.parent / {"normal": "ok", "anomalous": "ng"}.get(record["decision"], "rejected")
    target_dir.mkdir(exist_ok=True)
    target = target_dir / part.path.name
    if target.exists() and not part.path.exists():
        return  # moved by the previous run before it stopped
    if target.exists():  # the camera reused a name: keep both parts
        target = target_dir / f"{part.path.stem}.{part.key[:8]}{part.path.suffix}"
    atomic_write_json(result_path(target), record)
    os.replace(part.path, target)
    _fsync_dir(target_dir)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- MQTT
class MqttPublisher:
    """Publishes each decision as JSON with QoS 1 and waits for the broker's acknowledgement."""

    def __init__(self, address: str, topic: str, timeout_s: float = 10.0) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError as exc:  # declared in pyproject; a bare install may lack it
            raise ConfigError("--mqtt needs the paho-mqtt package: pip install 'paho-mqtt>=2,<3'") from exc
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise InputError(f"--mqtt {address!r} is not HOST:PORT (e.g. 127.0.0.1:1883)")
        self.topic, self.timeout_s = topic, timeout_s
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"redi-watch-{os.getpid()}")
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        try:
            self.client.connect(host, int(port))
        except OSError as exc:
            raise ConfigError(f"the MQTT broker at {address} cannot be reached ({exc}); start it or fix --mqtt") from exc
        self.client.loop_start()

    def publish(self, record: dict[str, Any], stop: threading.Event) -> None:
        """Publish one decision; retries until the broker acknowledged it (QoS 1) or ``stop`` is set
        (then the part stays ``sending``: resent, replayed and published on the next start)."""
        backoff = 0.5
        while not stop.is_set():
            info = self.client.publish(self.topic, json.dumps(record), qos=1)
            try:
                info.wait_for_publish(self.timeout_s)
                if info.is_published():
                    return
            except (RuntimeError, ValueError) as exc:
                LOG.warning("MQTT publish of %s failed (%s); retrying in %.1f s", record["image"], exc, backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, 30.0)
        raise WatchStopped(f"stopped before the MQTT broker acknowledged the decision on {record['image']}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
