"""Keeping the parts a line flagged (and a sample of normal ones) in the object store, for review.

The service answers first and keeps copies afterwards: :class:`Retainer` owns a queue bounded by
count AND by bytes (a kept copy holds the decoded image: a 25-megapixel upload is 75 MB) and one
background thread. ``offer`` never blocks; when the queue is full the copy is dropped and counted (``Retainer.dropped``, the service's ``redi_retention_dropped_total``), the answer is
never delayed or failed because of retention.

Layout in the store (``redi.ops.model_registry``), one folder per kept image, oldest first by name::

    lines/<line>/retained/<YYYY-MM-DD>/<HHMMSSffffff>-<request_id>/image.png    the upload, decoded RGB
    lines/<line>/retained/<YYYY-MM-DD>/<HHMMSSffffff>-<request_id>/map.npy      anomaly map (float32, model input size)
    lines/<line>/retained/<YYYY-MM-DD>/<HHMMSSffffff>-<request_id>/record.json  written LAST: score, threshold,
                                                                                 model version, regions, ...

A folder counts as kept only once its ``record.json`` exists; deletion removes ``record.json``
first, so a reader never sees a record whose image is half gone.

Limits (:class:`RetentionPolicy`): at most ``max_days`` old and ``max_per_line`` folders per line;
the oldest go first. Folders whose image an operator judged and that were not exported into the
line's data yet are "pinned" (the review index says which) and are never deleted by the limits:
a verdict is not lost to retention before it reaches the training data.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from redi.core.errors import ConfigError
from redi.ops.object_store import ObjectStore, StorageError
from redi.ops.model_registry import line_prefix

LOG = logging.getLogger("redi.ops.retention")
RECORD_NAME = "record.json"
IMAGE_NAME = "image.png"
MAP_NAME = "map.npy"
FLAGGED, SAMPLED = "flagged", "sampled"
# a part production passed but the shadow candidate flagged, or the reverse (serving/shadow_queue.py):
# kept with both models' scores so an operator judges who was right (docs/serving.md, "Shadow mode")
DISAGREEMENT = "disagreement"


# ----------------------------------------------------------------------------- settings
def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a number") from exc
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
    return value


def parse_rates(text: str, default: float = 0.0) -> tuple[float, dict[str, float]]:
    """``"0.01"`` or ``"bottle_caps=0.05,woven_fabric=0,*=0.01"`` -> (default rate, per-line rates)."""
    rates: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, value = part.rpartition("=")
        try:
            rate = float(value)
        except ValueError as exc:
            raise ConfigError(f"REDI_RETAIN_NORMAL_RATE: {part!r} is not RATE or LINE=RATE (a rate in [0, 1])") from exc
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"REDI_RETAIN_NORMAL_RATE: rate {rate} of {name or '*'} is not in [0, 1]")
        if name in ("", "*"):
            default = rate
        else:
            rates[name] = rate
    return default, rates


@dataclass
class RetentionPolicy:
    """What is kept, for how long, and how much may wait in memory.

    Attributes:
        enabled: keep copies at all.
        normal_rate: share of normal (not flagged) answers kept, by default; every flagged one is kept.
        line_rates: per-line share of normal answers, overriding ``normal_rate``.
        max_days: folders older than this many days are deleted (0: no age limit).
        max_per_line: at most this many folders per line, the oldest deleted first (0: no limit).
        queue_size: copies waiting for upload; a full queue drops new copies (counted).
        queue_bytes: bytes of decoded images and maps those copies may hold in memory, the one being
            uploaded included; a copy that would pass it is dropped (counted).
        sweep_interval_s: seconds between two enforcements of the limits on one line (0: after every upload).
    """

    enabled: bool = True
    normal_rate: float = 0.01
    line_rates: dict[str, float] = field(default_factory=dict)
    max_days: float = 30.0
    max_per_line: int = 5000
    queue_size: int = 64
    queue_bytes: int = 256 * 1024 * 1024
    sweep_interval_s: float = 300.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "RetentionPolicy":
        """``REDI_RETAIN`` (on/off), ``REDI_RETAIN_NORMAL_RATE``, ``REDI_RETAIN_DAYS``,
        ``REDI_RETAIN_MAX_PER_LINE``, ``REDI_RETAIN_QUEUE``, ``REDI_RETAIN_QUEUE_BYTES``, ``REDI_RETAIN_SWEEP_S``."""
        env = os.environ if env is None else env
        switch = env.get("REDI_RETAIN", "on").strip().lower()
        if switch not in ("on", "off", "1", "0", "true", "false", "yes", "no", ""):
            raise ConfigError(f"REDI_RETAIN={switch!r}: use on or off")
        default, rates = parse_rates(env.get("REDI_RETAIN_NORMAL_RATE", ""), 0.01)
        queue_size = int(_float(env, "REDI_RETAIN_QUEUE", 64, 1))
        queue_bytes = int(_float(env, "REDI_RETAIN_QUEUE_BYTES", 256 * 1024 * 1024, 1))
        return cls(enabled=switch in ("on", "1", "true", "yes", ""), normal_rate=default, line_rates=rates,
                   max_days=_float(env, "REDI_RETAIN_DAYS", 30.0), max_per_line=int(_float(env, "REDI_RETAIN_MAX_PER_LINE", 5000)),
                   queue_size=queue_size, queue_bytes=queue_bytes, sweep_interval_s=_float(env, "REDI_RETAIN_SWEEP_S", 300.0))

    def rate(self, line: str) -> float:
        """The share of normal answers of ``line`` that is kept."""
        return self.line_rates.get(line, self.normal_rate)

    def wants(self, line: str, anomalous: bool, draw: Callable[[], float] = random.random) -> str | None:
        """``"flagged"``, ``"sampled"`` or None: whether (and why) this answer's image is kept."""
        if not self.enabled:
            return None
        if anomalous:
            return FLAGGED
        rate = self.rate(line)
        return SAMPLED if rate > 0 and draw() < rate else None


# ----------------------------------------------------------------------------- keys
def retained_prefix(line: str) -> str:
    """``lines/<line>/retained/``."""
    return f"{line_prefix(line)}/retained/"


def item_prefix(line: str, when: _dt.datetime, request_id: str) -> str:
    """The folder of one kept image: ``lines/<line>/retained/<date>/<HHMMSSffffff>-<request_id>``."""
    if not request_id or "/" in request_id or request_id.startswith("."):
        raise StorageError(f"invalid request id {request_id!r}")
    when = when.astimezone(_dt.timezone.utc)
    return f"{retained_prefix(line)}{when:%Y-%m-%d}/{when:%H%M%S%f}-{request_id}"


def retained_folders(store: ObjectStore, line: str) -> dict[str, list[str]]:
    """Every kept folder of a line (complete or not) -> its keys; the dict is oldest first."""
    folders: dict[str, list[str]] = {}
    for key in store.list(retained_prefix(line)):
        folder = key.rsplit("/", 1)[0]
        if folder.count("/") == 4:  # lines/<line>/retained/<date>/<item>
            folders.setdefault(folder, []).append(key)
    return dict(sorted(folders.items()))


def request_id_of(folder: str) -> str:
    """The request id in a folder name ``.../<HHMMSSffffff>-<request_id>``."""
    return folder.rsplit("/", 1)[-1].split("-", 1)[-1]


def delete_folder(store: ObjectStore, keys: list[str]) -> None:
    """Delete one kept folder: its ``record.json`` first (it stops counting as kept), then the rest."""
    for key in sorted(keys, key=lambda k: not k.endswith("/" + RECORD_NAME)):
        store.delete(key)


# ----------------------------------------------------------------------------- the limits
class ReviewIndex(Protocol):
    """What retention tells the review index (``redi.ops.review.ReviewDB`` implements it)."""

    def add_retained(self, record: Mapping[str, Any]) -> None: ...

    def pinned_ids(self, line: str) -> set[str]: ...

    def mark_expired(self, request_ids: list[str]) -> None: ...


def expired_folders(folders: Mapping[str, list[str]], policy: RetentionPolicy, now: _dt.datetime,
                    pinned: set[str]) -> list[str]:
    """The folders the limits remove (oldest first): too old, then beyond the count; pinned ones stay."""
    names = list(folders)  # oldest first
    doomed: list[str] = []
    if policy.max_days > 0:
        cutoff = (now - _dt.timedelta(days=policy.max_days)).astimezone(_dt.timezone.utc)
        for folder in names:
            date, stamp = folder.split("/")[-2], folder.rsplit("/", 1)[-1].split("-", 1)[0]
            try:
                when = _dt.datetime.strptime(f"{date} {stamp}", "%Y-%m-%d %H%M%S%f").replace(tzinfo=_dt.timezone.utc)
            except ValueError:
                continue  # not a folder retention wrote: leave it alone
            if when < cutoff:
                doomed.append(folder)
    if policy.max_per_line > 0:
        left = [f for f in names if f not in doomed]
        excess = len(left) - policy.max_per_line
        doomed += [f for f in left if request_id_of(f) not in pinned][:max(0, excess)]
    return [f for f in names if f in doomed and request_id_of(f) not in pinned]


def enforce_limits(store: ObjectStore, line: str, policy: RetentionPolicy, index: ReviewIndex | None = None,
                   now: _dt.datetime | None = None) -> list[str]:
    """Delete the line's kept folders beyond the limits; return the request ids deleted.

    Without an index nothing is pinned. When the index cannot be read nothing is deleted (a verdict
    must not lose its image because the database was briefly unreachable).
    """
    now = now or _dt.datetime.now(_dt.timezone.utc)
    try:
        pinned = index.pinned_ids(line) if index is not None else set()
    except Exception as exc:
        LOG.error("line %s: the review index cannot say which images are judged (%s); nothing deleted", line, exc)
        return []
    folders = retained_folders(store, line)
    doomed = expired_folders(folders, policy, now, pinned)
    deleted = []
    for folder in doomed:
        delete_folder(store, folders[folder])
        deleted.append(request_id_of(folder))
    if deleted and index is not None:
        try:
            index.mark_expired(deleted)
        except Exception as exc:  # the store is the truth; the page checks the image exists anyway
            LOG.error("line %s: could not mark %d expired images in the review index: %s", line, len(deleted), exc)
    return deleted


# ----------------------------------------------------------------------------- the background writer
@dataclass
class RetainedItem:
    """One answer whose image is kept: everything the background thread needs (no I/O done yet)."""

    request_id: str
    line: str
    time: _dt.datetime
    kind: str  # flagged | sampled | disagreement
    rgb: np.ndarray  # uint8 (H, W, 3), the decoded upload
    # float (h, w): the model's map over the image's content (letterbox padding cut off,
    # redi.core.images.crop_to_content), so resizing it to the image's size maps it back
    anomaly_map: np.ndarray
    info: dict[str, Any]  # score, threshold, decision, model version/tag, ...

    @property
    def nbytes(self) -> int:
        """Memory the copy holds while it waits (image and map arrays)."""
        return int(np.asarray(self.rgb).nbytes + np.asarray(self.anomaly_map).nbytes)


def encode_item(item: RetainedItem) -> tuple[bytes, bytes, dict[str, Any]]:
    """(image PNG, map .npy, record) of an item; the record's regions are in the image's pixels."""
    from redi.core.visualize import defect_regions, to_png_bytes

    amap = np.asarray(item.anomaly_map, dtype=np.float32)
    buffer = io.BytesIO()
    np.save(buffer, amap, allow_pickle=False)
    threshold = float(item.info.get("threshold", float("inf")))
    sy, sx = item.rgb.shape[0] / amap.shape[0], item.rgb.shape[1] / amap.shape[1]
    regions = [{"x0": int(r["x0"] * sx), "y0": int(r["y0"] * sy), "x1": int(round(r["x1"] * sx)),
                "y1": int(round(r["y1"] * sy)), "area_map_pixels": int(r["area"]), "max_score": float(r["max_score"])}
               for r in defect_regions(amap, threshold, min_area=16)]
    prefix = item_prefix(item.line, item.time, item.request_id)
    record = {**item.info, "request_id": item.request_id, "line": item.line, "kind": item.kind,
              "time": item.time.astimezone(_dt.timezone.utc).isoformat(timespec="microseconds"),
              "width": int(item.rgb.shape[1]), "height": int(item.rgb.shape[0]),
              "map_shape": list(amap.shape), "regions": regions, "prefix": prefix,
              "image_key": f"{prefix}/{IMAGE_NAME}", "map_key": f"{prefix}/{MAP_NAME}",
              "record_key": f"{prefix}/{RECORD_NAME}"}
    return to_png_bytes(item.rgb), buffer.getvalue(), record


def store_item(store: ObjectStore, item: RetainedItem) -> dict[str, Any]:
    """Upload one item (image, map, then the record last); return the record."""
    image, amap, record = encode_item(item)
    store.put_bytes(record["image_key"], image)
    store.put_bytes(record["map_key"], amap)
    store.put_bytes(record["record_key"], json.dumps(record, indent=2).encode())
    return record


class Retainer:
    """A bounded queue and one daemon thread that uploads kept images and enforces the limits.

    Args:
        store: where copies go.
        policy: what to keep and the limits.
        index: the review index to tell about each kept image (optional).
        on_event: called as ``on_event(name, line)`` with ``dropped``, ``stored``, ``failed`` or
            ``deleted`` (the service counts them in Prometheus).
    """

    def __init__(self, store: ObjectStore, policy: RetentionPolicy, index: ReviewIndex | None = None,
                 on_event: Callable[[str, str], None] | None = None) -> None:
        self.store, self.policy, self.index = store, policy, index
        self.on_event = on_event or (lambda name, line: None)
        self.queue: queue.Queue[RetainedItem | None] = queue.Queue(maxsize=policy.queue_size)
        self.dropped = self.stored = self.failed = self.deleted = 0
        self.queued_bytes = 0  # held by queued copies and the one being uploaded
        self._bytes_lock = threading.Lock()
        self._last_sweep: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name="redi-retention", daemon=True)
        self._thread.start()

    def offer(self, item: RetainedItem) -> bool:
        """Queue a copy without waiting; False (and counted) when the queue is full by count or bytes."""
        size = item.nbytes
        with self._bytes_lock:
            fits = self.queued_bytes + size <= self.policy.queue_bytes
            if fits:
                try:
                    self.queue.put_nowait(item)
                    self.queued_bytes += size
                    return True
                except queue.Full:
                    pass
        self.dropped += 1
        self._event("dropped", item.line)
        if not fits:
            LOG.warning("line %s: dropped the copy of %s: %d bytes would pass the queue's %d bytes "
                        "(REDI_RETAIN_QUEUE_BYTES)", item.line, item.request_id, size, self.policy.queue_bytes)
        return False

    def _event(self, name: str, line: str) -> None:
        try:
            self.on_event(name, line)
        except Exception:  # counting must never break the caller
            LOG.exception("retention event %s failed", name)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                self.queue.task_done()
                return
            try:
                self._handle(item)
            except Exception as exc:  # one failed upload must not stop the thread
                self.failed += 1
                self._event("failed", item.line)
                LOG.error("line %s: could not keep image %s: %s", item.line, item.request_id, exc)
            finally:
                with self._bytes_lock:
                    self.queued_bytes -= item.nbytes
                self.queue.task_done()

    def _handle(self, item: RetainedItem) -> None:
        record = store_item(self.store, item)
        self.stored += 1
        self._event("stored", item.line)
        if self.index is not None:
            try:
                self.index.add_retained(record)
            except Exception as exc:  # the store holds the record; `redi review sync` indexes it later
                LOG.error("line %s: kept %s but could not index it (%s); run `redi review sync`", item.line,
                          item.request_id, exc)
        self.sweep(item.line)

    def sweep(self, line: str, force: bool = False) -> list[str]:
        """Enforce the limits on ``line`` when the sweep interval has passed (or ``force``)."""
        now = time.monotonic()
        if not force and now - self._last_sweep.get(line, -1e18) < self.policy.sweep_interval_s:
            return []
        self._last_sweep[line] = now
        deleted = enforce_limits(self.store, line, self.policy, self.index)
        for _ in deleted:
            self.deleted += 1
            self._event("deleted", line)
        return deleted

    def join(self, timeout_s: float = 60.0) -> bool:
        """Wait until every queued copy is handled (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.queue.unfinished_tasks


def read_record(store: ObjectStore, key: str) -> dict[str, Any] | None:
    """A kept image's ``record.json``, or None when it is gone."""
    return store.get_json(key)


def load_map(store: ObjectStore, key: str) -> np.ndarray | None:
    """A kept anomaly map, or None when it is gone."""
    data = store.get_bytes(key)
    return None if data is None else np.load(io.BytesIO(data), allow_pickle=False)


def records_in_store(store: ObjectStore, line: str) -> list[str]:
    """The ``record.json`` keys of every complete kept folder of a line, oldest first."""
    return [key for keys in retained_folders(store, line).values() for key in keys
            if key.endswith("/" + RECORD_NAME)]


__all__ = ["DISAGREEMENT", "FLAGGED", "SAMPLED", "RetainedItem", "Retainer", "RetentionPolicy", "enforce_limits",
           "expired_folders", "item_prefix", "load_map", "parse_rates", "read_record", "records_in_store",
           "retained_folders", "store_item"]
