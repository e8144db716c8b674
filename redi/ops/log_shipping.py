"""Production-log rows shipped to the object store as immutable per-host segments.

Each serving host writes its rows to its own local log (:class:`redi.ops.monitoring.ProductionLog`,
``<log dir>/<line>/<YYYY-MM-DD>.jsonl``). A :class:`LogShipper` copies what those day files gained
to the store, so one drift run sees every host's rows::

    production-log/<line>/<host id>/<YYYY-MM-DD>/<start>-<end>.jsonl

A segment is the bytes ``[start, end)`` of the host's day file (offsets as 15-digit numbers), cut at
a row boundary. Its key is derived from the file and the range, so shipping a range again writes
the same object with the same bytes: a segment is never duplicated, only rewritten identically.

Idempotent across crashes: per day file, ``<log dir>/.shipping/<line>/<day>.json`` holds the shipped
offset. Before an upload the range is recorded there as *pending* (atomic, fsync-ed write); after the
upload the offset moves to its end. A shipper killed between the two uploads the pending range again
on restart (same key, same bytes), so no row is lost and none is stored twice. Rows are read under a
shared ``flock`` of the day file, which the log's writer takes exclusively for a commit, so a commit
that is cut back (a failed write) is never shipped, and bytes after the last newline (a commit on
its way, or a crash's fragment) wait for the next pass.

A store that is down fails a pass: the rows stay local and the next pass (every ``interval_s``)
ships them. Several worker processes on one host (``REDI_WORKERS``) each run a shipper thread; a
pass takes ``<log dir>/.shipping/ship.lock`` without waiting, so only one of them ships at a time
and the others skip that pass (nothing is shipped twice; a dead worker's lock is released by the
kernel). Settings (environment, read by :meth:`ShippingSettings.from_env`):

=============================  ===============================================================  ===========
``REDI_HOST_ID``               this host's name in the segment keys (letters, digits, ``_.-``)   hostname
``REDI_LOG_SHIP_INTERVAL_S``   seconds between two shipping passes (0: no shipping)            30
=============================  ===============================================================  ===========
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from redi.core.errors import ConfigError

SEGMENT_PREFIX = "production-log"
STATE_DIR = ".shipping"  # not a line name (those start with a letter or digit), so never read as one
LOCK_NAME = "ship.lock"
DEFAULT_INTERVAL_S = 30.0
MAX_SEGMENT_BYTES = 8 * 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$")  # host ids; line folders as ProductionLog names them
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_SEGMENT = re.compile(r"^(\d{15})-(\d{15})\.jsonl$")
LOG = logging.getLogger(__name__)


def check_host_id(host: str) -> str:
    """Return ``host`` if it can name a key folder (letters, digits, ``_.-``), else raise ConfigError."""
    if not isinstance(host, str) or not _NAME.match(host):
        raise ConfigError(f"REDI_HOST_ID {host!r} is not a valid host id; use letters, digits, '_', '.' or '-' "
                          f"(starting with a letter or digit), e.g. the pod or machine name")
    return host


@dataclass
class ShippingSettings:
    """Where and how often a host ships its production log (see the module docstring)."""

    host_id: str
    interval_s: float = DEFAULT_INTERVAL_S

    @property
    def enabled(self) -> bool:
        """Shipping is off with an interval of 0."""
        return self.interval_s > 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ShippingSettings":
        """``REDI_HOST_ID`` (default: the hostname, as a pod's name) and ``REDI_LOG_SHIP_INTERVAL_S``."""
        env = os.environ if env is None else env
        host = env.get("REDI_HOST_ID", "").strip() or socket.gethostname()
        text = env.get("REDI_LOG_SHIP_INTERVAL_S", "").strip()
        try:
            interval = float(text) if text else DEFAULT_INTERVAL_S
        except ValueError:
            interval = -1.0
        if not interval >= 0:  # also NaN
            raise ConfigError(f"REDI_LOG_SHIP_INTERVAL_S={text!r} is not a number of seconds >= 0 (0: no shipping)")
        return cls(check_host_id(host), interval)


def line_prefix(line: str, prefix: str = SEGMENT_PREFIX) -> str:
    """``production-log/<line>/``: every host's segments of one line (``prefix``: another log's
    segments, e.g. the shadow log's, ``redi.ops.shadow``)."""
    return f"{prefix}/{line}/"


def segment_key(line: str, host: str, day: str, start: int, end: int, prefix: str = SEGMENT_PREFIX) -> str:
    """The key of the bytes ``[start, end)`` of ``host``'s day file of ``line``."""
    return f"{line_prefix(line, prefix)}{host}/{day}/{start:015d}-{end:015d}.jsonl"


@dataclass(frozen=True)
class Segment:
    """One shipped segment, parsed from its key."""

    key: str
    line: str
    host: str
    day: str
    start: int
    end: int


def parse_segment_key(key: str, prefix: str = SEGMENT_PREFIX) -> Segment | None:
    """The segment a key names, or None for any other object under the prefix."""
    parts = key.split("/")
    if len(parts) != 5 or parts[0] != prefix or not _DAY.match(parts[3]):
        return None
    found = _SEGMENT.match(parts[4])
    if not found:
        return None
    return Segment(key, parts[1], parts[2], parts[3], int(found.group(1)), int(found.group(2)))


def list_segments(store: Any, line: str, since_day: str | None = None, prefix: str = SEGMENT_PREFIX) -> list[Segment]:
    """Every host's segments of ``line`` (optionally only of UTC days >= ``since_day``), by host, day, offset."""
    segments = [s for s in (parse_segment_key(k, prefix) for k in store.list(line_prefix(line, prefix)))
                if s is not None]
    if since_day:
        segments = [s for s in segments if s.day >= since_day]
    return sorted(segments, key=lambda s: (s.host, s.day, s.start))


class LogShipper:
    """Ships the day files of one log folder to ``store`` as this host's segments (module docstring).

    Args:
        log_dir: the production log folder (``REDI_LOG_DIR``).
        store: an :class:`redi.ops.object_store.ObjectStore`.
        host_id: this host's name in the keys (:func:`check_host_id`).
        interval_s: seconds between passes of the background thread (:meth:`start`).
        max_segment_bytes: a day file that grew more than this ships as several segments.
        prefix: the first part of the keys (``production-log``; the shadow log ships under its own).
    """

    def __init__(self, log_dir: str | Path, store: Any, host_id: str, interval_s: float = DEFAULT_INTERVAL_S,
                 max_segment_bytes: int = MAX_SEGMENT_BYTES, prefix: str = SEGMENT_PREFIX) -> None:
        self.log_dir = Path(log_dir)
        self.prefix = prefix
        self.store = store
        self.host_id = check_host_id(host_id)
        self.interval_s = float(interval_s)
        self.max_segment_bytes = max(1, int(max_segment_bytes))
        self.segments_shipped = 0  # by this object
        self.bytes_shipped = 0
        self.last_error: str | None = None  # the reason the last pass failed (None: it succeeded)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the background thread ----------------------------------------------------------------------
    def start(self) -> "LogShipper":
        """Start the daemon thread: a pass at once (rows left by an earlier run), then every ``interval_s``."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="redi-log-shipper", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread after its current pass."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        while True:
            self.ship_once()
            if self._stop.wait(self.interval_s):
                return

    # -- one pass -----------------------------------------------------------------------------------
    def ship_once(self) -> int | None:
        """Ship what every day file gained; returns the segments written, or None when another process of
        this host holds the shipping lock (it ships them). A failing store is logged, not raised: the
        rows stay local and the next pass retries (``last_error`` says why)."""
        with self._host_lock() as held:
            if not held:
                return None
            shipped = 0
            try:
                for line, path in self._day_files():
                    shipped += self._ship_file(line, path)
            except Exception as exc:  # noqa: BLE001 - store down, disk error: the next pass tries again
                self.last_error = f"{type(exc).__name__}: {exc}"
                LOG.warning("production log shipping to %s paused (%s); the rows stay in %s and ship later",
                            _describe(self.store), exc, self.log_dir)
                return shipped
            self.last_error = None
            return shipped

    @contextlib.contextmanager
    def _host_lock(self) -> Iterator[bool]:
        """Yield whether this process got the host's shipping lock (never waits for it)."""
        folder = self.log_dir / STATE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / LOCK_NAME, "a+b") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another worker of this host is shipping
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _day_files(self) -> list[tuple[str, Path]]:
        """``(line, day file)`` of every line folder, oldest day first."""
        if not self.log_dir.is_dir():
            return []
        found = []
        for folder in sorted(self.log_dir.iterdir()):
            if folder.is_dir() and _NAME.match(folder.name):
                found.extend((folder.name, p) for p in sorted(folder.glob("*.jsonl")) if _DAY.match(p.stem))
        return found

    def _state_path(self, line: str, day: str) -> Path:
        return self.log_dir / STATE_DIR / line / f"{day}.json"

    def _read_state(self, line: str, day: str) -> dict[str, Any]:
        path = self._state_path(line, day)
        if not path.is_file():
            return {"offset": 0, "pending": None}
        try:
            state = json.loads(path.read_text())
            return {"offset": int(state["offset"]), "pending": state.get("pending")}
        except (ValueError, KeyError, TypeError) as exc:
            # written atomically, so only a hand edit breaks it; shipping from 0 again would duplicate rows
            raise ConfigError(f"the shipping state {path} is not readable ({exc}); fix it or delete it to ship "
                              f"that day file again from its start (its segments would then be rewritten)") from exc

    def _write_state(self, line: str, day: str, offset: int, pending: list[int] | None) -> None:
        """Replace the state file atomically and durably (fsync of the file and its folder)."""
        path = self._state_path(line, day)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps({"offset": offset, "pending": pending}))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _ship_file(self, line: str, path: Path) -> int:
        """Ship the pending range (if a crash left one), then what the file gained, in segments."""
        day = path.stem
        state = self._read_state(line, day)
        offset, shipped = state["offset"], 0
        if state["pending"]:
            start, end = (int(v) for v in state["pending"])
            data = _read_range(path, start, end)
            if data is not None:  # None: the file lost those bytes (deleted by hand); nothing to ship
                self._upload(line, day, start, end, data)
                shipped += 1
            offset = end
            self._write_state(line, day, offset, None)
        while True:
            data = _committed_after(path, offset, self.max_segment_bytes)
            if not data:
                return shipped
            end = offset + len(data)
            self._write_state(line, day, offset, [offset, end])  # before the upload: a crash re-ships this exact range
            self._upload(line, day, offset, end, data)
            self._write_state(line, day, end, None)
            offset, shipped = end, shipped + 1

    def _upload(self, line: str, day: str, start: int, end: int, data: bytes) -> None:
        self.store.put_bytes(segment_key(line, self.host_id, day, start, end, self.prefix), data)
        self.segments_shipped += 1
        self.bytes_shipped += len(data)


def _describe(store: Any) -> str:
    return store.describe() if hasattr(store, "describe") else repr(store)


def _committed_after(path: Path, offset: int, limit: int) -> bytes:
    """Whole rows after ``offset`` (at most ``limit`` bytes unless one row is longer), read under a shared lock.

    The log's writer holds the exclusive lock while a commit is written, fsync-ed or cut back, so what
    is read here is committed; bytes after the last newline are left for a later pass.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return b""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            size = os.fstat(fd).st_size
            if size <= offset:
                return b""
            data = os.pread(fd, min(size - offset, limit), offset)
            cut = data.rfind(b"\n")
            if cut < 0 and size - offset > limit:  # one row longer than the limit: ship it whole
                data = os.pread(fd, size - offset, offset)
                cut = data.rfind(b"\n")
            return data[:cut + 1] if cut >= 0 else b""
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_range(path: Path, start: int, end: int) -> bytes | None:
    """The bytes ``[start, end)`` of ``path`` (a recorded pending range), or None when the file lost them."""
    try:
        with open(path, "rb") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
            handle.seek(start)
            data = handle.read(end - start)
    except FileNotFoundError:
        return None
    return data if len(data) == end - start and data.endswith(b"\n") else None


__all__ = ["SEGMENT_PREFIX", "LogShipper", "ShippingSettings", "Segment", "check_host_id", "line_prefix",
           "list_segments", "parse_segment_key", "segment_key"]
