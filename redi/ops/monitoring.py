"""Drift monitoring: the one definition of a monitoring row, production logging, Evidently reports.

A product line's images are monitored as a table, one row per image (Evidently works on tables):

- ``brightness``: mean luminance (ITU-R BT.601 weights) in ``[0, 1]``;
- ``contrast``: standard deviation of that luminance;
- ``sharpness``: variance of the Laplacian of the luminance (a blur lowers it);
- ``anomaly_score``: the detector's image score;
- ``emb_0 .. emb_{k-1}``: a fixed random projection of the L2-normalised backbone embedding.
  A random Gaussian projection (seed :data:`PROJECTION_SEED`, scaled by ``1/sqrt(k)``) keeps
  distances between embeddings roughly intact (Johnson-Lindenstrauss), whereas the first ``k``
  raw channels would watch ``k`` arbitrary filters and miss shifts elsewhere. The matrix depends
  only on the embedding size and ``k``, so the reference table and the service agree without
  storing it.

The luminance features are computed on the image resized to ``FEATURE_SIZE`` x ``FEATURE_SIZE``
so a change of camera resolution does not by itself move them, and the cost per request is fixed.

:func:`build_reference` (the pipeline's ``drift_reference`` stage) writes one row per normal
training image; the service appends one row per request through :class:`ProductionLog`;
:func:`run_monitor` compares the two with Evidently (column drift of the image features,
embedding drift, anomaly-score shift), writes HTML and JSON, and adds the run to an Evidently
workspace project per line, so ``evidently ui --workspace PATH`` shows each line's history.

Several hosts: each service's log ships its rows to the object store as per-host segments
(:mod:`redi.ops.log_shipping`); :func:`read_store_rows` reads every host's rows back, each request once,
and ``run_monitor(..., store=...)`` judges them together. The workspace may be an ``evidently ui``
service URL (:func:`open_workspace`), which every host, the scheduled runs and the dashboard share.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import functools
import json
import logging
import math
import os
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from redi.core.config import MonitorConfig
from redi.core.errors import ConfigError, DatasetError, InputError
from redi.core.part_check import FEATURE_SIZE, luminance_features  # one definition, shared with the part check
from redi.core.utils import atomic_write_text

PROJECTION_SEED = 0
N_EMBEDDING_COMPONENTS = 8
IMAGE_FEATURES = ("brightness", "contrast", "sharpness")
SCORE_COLUMN = "anomaly_score"
EVIDENTLY_MIN_ROWS = 30  # reference + current rows: Evidently 0.7's embedding t-SNE (perplexity 30) needs more
_LINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LOG = logging.getLogger(__name__)


def embedding_columns(k: int = N_EMBEDDING_COMPONENTS) -> list[str]:
    """Names of the embedding component columns: ``emb_0 .. emb_{k-1}``."""
    return [f"emb_{i}" for i in range(k)]


def check_line_name(line: str) -> str:
    """Return ``line`` if it is a safe name (letters, digits, ``_.-``), else raise InputError.

    Line names become folder and project names, so anything that could escape a folder is refused.
    """
    if not isinstance(line, str) or not _LINE_NAME.match(line):
        raise InputError(f"line name {line!r} is not valid; use 1-64 letters, digits, '_', '.' or '-' "
                         f"(starting with a letter or digit)")
    return line


# ----------------------------------------------------------------------------- one row per image
@functools.lru_cache(maxsize=8)
def _projection(dim: int, k: int) -> np.ndarray:
    """The fixed (dim, k) Gaussian projection matrix (see the module docstring)."""
    rng = np.random.default_rng(PROJECTION_SEED)
    return (rng.standard_normal((dim, k)) / math.sqrt(k)).astype(np.float64)


def project_embedding(embedding: Any, k: int = N_EMBEDDING_COMPONENTS) -> np.ndarray:
    """L2-normalise a (D,) embedding and project it to ``k`` components."""
    vector = np.asarray(embedding.detach().cpu() if hasattr(embedding, "detach") else embedding,
                        dtype=np.float64).reshape(-1)
    if vector.size == 0 or not np.all(np.isfinite(vector)):
        raise InputError(f"an embedding must be a non-empty finite vector, got {vector.size} values")
    norm = np.linalg.norm(vector)
    return (vector / norm if norm > 0 else vector) @ _projection(vector.size, k)


def image_feature_row(rgb_uint8: np.ndarray, score: float, embedding: Any,
                      k: int = N_EMBEDDING_COMPONENTS) -> dict[str, float]:
    """The one definition of a drift-monitoring row for one image.

    Args:
        rgb_uint8: the image as uint8 RGB (H, W, 3), at whatever resolution it arrived.
        score: the detector's anomaly score of the image.
        embedding: the detector's pooled backbone embedding of the image, (D,) tensor or array.
        k: number of embedding components.

    Returns:
        ``{brightness, contrast, sharpness, anomaly_score, emb_0 .. emb_{k-1}}`` as floats.
    """
    row: dict[str, float] = luminance_features(rgb_uint8)
    row[SCORE_COLUMN] = float(score)
    row.update({name: float(v) for name, v in zip(embedding_columns(k), project_embedding(embedding, k))})
    return row


def feature_columns(k: int = N_EMBEDDING_COMPONENTS) -> list[str]:
    """Every numeric column of a monitoring row, in order."""
    return [*IMAGE_FEATURES, SCORE_COLUMN, *embedding_columns(k)]


# ----------------------------------------------------------------------------- the reference table
def build_reference(detector_path: str | Path, data_root: str | Path, out_path: str | Path, cfg: Any,
                    k: int = N_EMBEDDING_COMPONENTS) -> Path:
    """The ``drift_reference`` stage: one monitoring row per normal training image, as CSV.

    The images go through exactly what the service does (``load_rgb`` -> ``preprocess``
    -> ``predict`` of the detector protocol), so production rows are comparable. Rows also carry ``image_id``,
    ``line`` and ``model_version``.
    """
    import torch

    from redi.core.images import load_rgb
    from redi.methods.base import load_detector
    from redi.methods.common import open_line
    from redi.core.utils import pick_device

    detector = load_detector(detector_path, pick_device(cfg.train.device))
    category = open_line(data_root, cfg)
    samples = [s for s in category.train if s.label == 0]
    if not samples:
        raise DatasetError(f"{data_root} has no normal training images to build a drift reference from")
    line = str(detector.metadata.get("line") or category.name)
    version = str(detector.metadata.get("version", ""))
    rows: list[dict[str, Any]] = []
    batch_size = max(1, int(cfg.eval.batch_size))
    # Named as training images: a method that keeps them (a prompt or memory bank) then never matches
    # an image with itself, which would score near zero; production images never are in the bank.
    for begin in range(0, len(samples), batch_size):
        chunk = samples[begin:begin + batch_size]
        images = [load_rgb(s.path) for s in chunk]
        with torch.inference_mode():
            out = detector.predict(detector.preprocess(images), image_ids=[s.image_id for s in chunk])
        for sample, rgb, score, emb in zip(chunk, images, out.score.cpu(), out.embedding.cpu()):
            row = {"image_id": sample.image_id, "line": line, "model_version": version}
            row.update(image_feature_row(rgb, float(score), emb, k))
            rows.append(row)
    out_path = Path(out_path)
    atomic_write_text(out_path, pd.DataFrame(rows).to_csv(index=False))  # a half-written reference is never read
    return out_path


def load_reference(path: str | Path, k: int | None = None) -> pd.DataFrame:
    """Read a reference table and check it has every monitoring column."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"drift reference {path} does not exist; run the drift_reference stage "
                           f"(`redi.ops.monitoring.build_reference`) for this line first")
    frame = pd.read_csv(path)
    k = k if k is not None else len([c for c in frame.columns if c.startswith("emb_")])
    missing = [c for c in feature_columns(k) if c not in frame.columns]
    if missing or frame.empty:
        raise DatasetError(f"drift reference {path} is empty or lacks columns {missing}; rebuild it")
    return frame


# ----------------------------------------------------------------------------- production log
class ProductionLog:
    """Durable append-only log of production rows: ``<dir>/<line>/<YYYY-MM-DD>.jsonl`` (UTC days).

    Rows are written in *group commits*: every row handed in while the previous commit is on its
    way to the disk waits for the next one, and a commit is one ``write`` per day file on an
    ``O_APPEND`` descriptor under an exclusive ``fcntl.flock``, then one ``fsync`` of that file.
    :meth:`append` returns (and the future of :meth:`submit` resolves) only after the row's commit
    was ``fsync``-ed, so a row that was acknowledged survives a crash, while a burst of N requests
    costs one or two fsyncs instead of N. Rows from many threads and worker processes never
    interleave or get lost. (flock works on local filesystems; on NFS use one log directory per
    host.)

    A commit is all or nothing. A write that fails (``ENOSPC`` on a full disk, ``EIO``) or whose
    fsync fails is cut back off the file (``ftruncate`` to the size before it) and raises, so no
    row of a failed commit is acknowledged or left behind (a client told "not logged" may retry
    without making a duplicate). Before each append, a fragment a crash left at the end of the file
    (bytes after the last newline) is truncated away: it cannot hold an acknowledged row (a row is
    acknowledged only once its whole commit, newline included, is fsync-ed), and truncating needs
    no free space, whereas terminating it would need a write that can fail again on a full disk.
    So the next row never lands glued onto a fragment. A new day file's directory entry is fsync-ed
    too, so the file itself survives a power loss. The reader keeps every complete row, also from
    files older versions wrote with a fragment glued in front of a row.

    The commits run on one daemon thread per log, started on first use.

    With ``ship_to`` (an object store), a :class:`redi.ops.log_shipping.LogShipper` thread copies the
    rows to the store as this host's segments (``REDI_HOST_ID``, every ``REDI_LOG_SHIP_INTERVAL_S``;
    ``shipping`` overrides those settings), so a drift run sees every host's rows.
    """

    def __init__(self, directory: str | Path, fsync: bool = True, ship_to: Any = None,
                 shipping: Any = None, ship_prefix: str | None = None) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self._cond = threading.Condition()
        self._pending: list[tuple[Path, bytes, Future]] = []
        self._writer: threading.Thread | None = None
        self.commits = 0  # group commits done (each: one write and one fsync per day file)
        self.rows_committed = 0
        self.shipper = self._start_shipper(ship_to, shipping, ship_prefix) if ship_to is not None else None

    def _start_shipper(self, store: Any, shipping: Any, prefix: str | None = None):
        """The shipping thread (None when ``REDI_LOG_SHIP_INTERVAL_S`` is 0); its first pass runs at once,
        so rows an earlier run left unshipped go first."""
        from redi.ops.log_shipping import SEGMENT_PREFIX, LogShipper, ShippingSettings

        settings = shipping or ShippingSettings.from_env()
        if not settings.enabled:
            LOG.warning("REDI_LOG_SHIP_INTERVAL_S is 0: production rows stay in %s and drift runs reading the "
                        "object store do not see this host", self.directory)
            return None
        return LogShipper(self.directory, store, settings.host_id, settings.interval_s,
                          prefix=prefix or SEGMENT_PREFIX).start()

    def path_for(self, line: str, when: _dt.datetime | None = None) -> Path:
        """The file that holds ``line``'s rows of the UTC day of ``when`` (default: now)."""
        when = when or _dt.datetime.now(_dt.timezone.utc)
        return self.directory / check_line_name(line) / f"{when.astimezone(_dt.timezone.utc):%Y-%m-%d}.jsonl"

    def submit(self, row: dict[str, Any]) -> "Future[Path]":
        """Queue one row (needs a ``line`` key; ``time`` is added when absent) for the next group commit.

        The returned future resolves to the file once the row is on disk (fsync-ed), or raises the
        ``OSError`` that kept it from getting there. Bad rows (line name) raise here, at once.
        """
        row = dict(row)
        now = _dt.datetime.now(_dt.timezone.utc)
        row.setdefault("time", now.isoformat(timespec="microseconds"))
        path = self.path_for(str(row.get("line", "")), now)
        data = (json.dumps(row, default=_json_default, allow_nan=True) + "\n").encode()
        done: Future[Path] = Future()
        with self._cond:
            self._pending.append((path, data, done))
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._commit_loop, name="redi-log-commit", daemon=True)
                self._writer.start()
            self._cond.notify()
        return done

    def append(self, row: dict[str, Any]) -> Path:
        """Append one row and return its file once it is on disk (see :meth:`submit`)."""
        return self.submit(row).result()

    def append_many(self, rows: Iterable[dict[str, Any]]) -> list[Path]:
        """Append several rows in (usually) one group commit; returns each row's file."""
        futures = [self.submit(row) for row in rows]
        return [f.result() for f in futures]

    def _commit_loop(self) -> None:
        """The writer thread: take everything queued, commit it, resolve its futures; repeat."""
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                batch, self._pending = self._pending, []
            by_file: dict[Path, list[tuple[bytes, Future]]] = {}
            for path, data, done in batch:
                by_file.setdefault(path, []).append((data, done))
            for path, items in by_file.items():
                try:
                    self._write(path, b"".join(data for data, _ in items))
                except Exception as exc:  # noqa: BLE001 - every row of this commit fails; the next one tries again
                    for _, done in items:
                        done.set_exception(exc)
                    continue
                self.commits += 1
                self.rows_committed += len(items)
                for _, done in items:
                    done.set_result(path)

    def _write(self, path: Path, data: bytes) -> None:
        """One locked O_APPEND write of whole rows, then fsync; on failure the file is cut back and it raises."""
        self._make_dirs(path.parent)
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)  # read: the fragment check
        try:
            if created and self.fsync:
                _fsync_dir(path.parent)  # the new day file's name must survive a power loss with its rows
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                start = self._drop_fragment(fd, path)
                try:
                    _write_all(fd, data)
                    if self.fsync:
                        os.fsync(fd)
                except OSError:
                    self._cut_back(fd, path, start)
                    raise
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _make_dirs(self, folder: Path) -> None:
        """Create the missing folders down to ``folder``, fsync-ing each new entry's parent."""
        missing = []
        while not folder.is_dir():
            missing.append(folder)
            if folder.parent == folder:
                break
            folder = folder.parent
        for new in reversed(missing):
            new.mkdir(exist_ok=True)
            if self.fsync:
                _fsync_dir(new.parent)

    def _drop_fragment(self, fd: int, path: Path) -> int:
        """Truncate what follows the file's last newline (a crashed write's remainder); return the size.

        Called under the lock. Everything after the last newline is unacknowledged by construction
        (see the class docstring), so truncating loses no acknowledged row and needs no free space.
        """
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return size
        keep = _last_newline_end(fd, size)
        os.ftruncate(fd, keep)
        if self.fsync:
            os.fsync(fd)
        LOG.warning("production log %s ended in a %d-byte fragment (a write cut short by a crash or a full disk); "
                    "truncated it so the next row starts on its own line", path, size - keep)
        return keep

    def _cut_back(self, fd: int, path: Path, size: int) -> None:
        """Undo a failed commit: truncate to the size before it (best effort; the next append repairs the rest)."""
        try:
            os.ftruncate(fd, size)
            if self.fsync:
                os.fsync(fd)
        except OSError as exc:
            LOG.error("production log %s: could not cut back a failed write (%s); the next append truncates it",
                      path, exc)

    def files(self, line: str) -> list[Path]:
        """The line's day files, oldest first."""
        folder = self.directory / check_line_name(line)
        return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []

    def read(self, line: str, since: _dt.datetime | None = None, last: int | None = None) -> pd.DataFrame:
        """The line's rows (optionally only those at/after ``since``, and only the ``last`` N) as a table."""
        rows: list[dict[str, Any]] = []
        for path in self.files(line):
            if since is not None and path.stem < _day(since):
                continue  # whole day before the window
            rows.extend(_read_jsonl(path))
        return _rows_table(rows, since, last)


def _day(when: _dt.datetime) -> str:
    """The UTC day of ``when`` as the log names it (``YYYY-MM-DD``)."""
    return f"{when.astimezone(_dt.timezone.utc):%Y-%m-%d}"


def _rows_table(rows: list[dict[str, Any]], since: _dt.datetime | None, last: int | None) -> pd.DataFrame:
    """Rows as a table sorted by time, only those at/after ``since`` and the ``last`` N."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["time"] = pd.to_datetime(frame["time"], utc=True, format="ISO8601")
    if since is not None:
        frame = frame[frame["time"] >= pd.Timestamp(since).tz_convert("UTC")]
    frame = frame.sort_values("time", kind="stable").reset_index(drop=True)
    return frame.tail(last).reset_index(drop=True) if last else frame


def read_store_rows(store: Any, line: str, since: _dt.datetime | None = None, last: int | None = None,
                    notes: list[str] | None = None,
                    keep: Callable[[dict[str, Any]], bool] | None = None, prefix: str | None = None) -> pd.DataFrame:
    """Every host's shipped rows of ``line`` from the object store, each request once.

    Reads the segments under ``production-log/<line>/`` (:mod:`redi.ops.log_shipping`), adds a ``host``
    column (the host id of the key) where a row has none, and keeps the first row of each
    ``request_id`` (a range shipped again after a power loss, or a log folder copied to a second
    host, must not count twice), and only rows that ``keep`` accepts (e.g. the reference's model
    version). With ``last``, whole UTC days are read newest first until they hold ``last`` kept rows,
    so a check of the latest rows does not download the line's whole history. ``notes`` receives
    what was read (hosts, segments, duplicates, rows not kept). ``prefix``: another log's segments
    (the shadow log's, ``redi.ops.shadow``).
    """
    from redi.ops.log_shipping import SEGMENT_PREFIX, list_segments

    check_line_name(line)
    by_day: dict[str, list[Any]] = {}
    for segment in list_segments(store, line, _day(since) if since is not None else None, prefix or SEGMENT_PREFIX):
        by_day.setdefault(segment.day, []).append(segment)
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    read, duplicates, left_out = [], 0, 0
    for day in sorted(by_day, reverse=True):
        for segment in by_day[day]:
            read.append(segment)
            for raw in (store.get_bytes(segment.key) or b"").splitlines():
                row = _parse_row(raw.strip())
                if row is None:
                    continue
                row.setdefault("host", segment.host)
                request = row.get("request_id")
                if request is not None:
                    if request in seen:
                        duplicates += 1
                        continue
                    seen.add(request)
                if keep is None or keep(row):
                    rows.append(row)
                else:
                    left_out += 1
        if last and len(rows) >= last:
            break
    if notes is not None:
        hosts = sorted({s.host for s in read})
        notes.append(f"{len(rows)} rows of {len(hosts)} hosts {hosts} from {len(read)} segments in "
                     f"{store.describe()}" + (f"; {duplicates} duplicate rows (same request_id) left out"
                                               if duplicates else "")
                     + (f"; {left_out} rows of other model versions left out" if left_out else ""))
    return _rows_table(rows, since, last)


def _json_default(value: Any) -> Any:
    """numpy scalars and other non-JSON values in a row."""
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a write may be short, e.g. on a nearly full disk)."""
    written = 0
    while written < len(data):
        n = os.write(fd, data[written:])
        if n <= 0:
            raise OSError(errno.ENOSPC, "the production log write made no progress")
        written += n


def _fsync_dir(folder: Path) -> None:
    """fsync a directory, so a file or folder just created in it survives a power loss."""
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _last_newline_end(fd: int, size: int, chunk: int = 65536) -> int:
    """The offset just after the last newline before ``size`` (0 when there is none)."""
    end = size
    while end > 0:
        start = max(0, end - chunk)
        at = os.pread(fd, end - start, start).rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return 0


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete row of one JSONL file.

    A line that does not parse is a crashed write's fragment, possibly with a complete row glued
    after it (files written before the writer repaired fragments): the row is kept, the fragment
    (never acknowledged) is skipped.
    """
    rows = []
    with open(path, "rb") as handle:
        for raw in handle:
            row = _parse_row(raw.strip())
            if row is not None:
                rows.append(row)
    return rows


def _parse_row(raw: bytes) -> dict[str, Any] | None:
    """The row a line holds: the whole line, else the complete JSON object that ends it; None if neither."""
    if not raw:
        return None
    start = 0
    while start >= 0:
        try:
            row = json.loads(raw[start:])
        except ValueError:
            row = None
        if isinstance(row, dict):
            return row
        start = raw.find(b'{"', start + 1)
    return None


# ----------------------------------------------------------------------------- drift report
@dataclass
class MonitorSettings:
    """Thresholds of the drift checks (p-values are of two-sample Kolmogorov-Smirnov tests)."""

    feature_p_value: float = 0.01  # a feature column drifts when its K-S p-value is below this
    score_p_value: float = 0.01  # the anomaly score shifted when its K-S p-value is below this
    embedding_component_p_value: float = 0.05  # per projected component
    embedding_drift_share: float = 0.25  # embedding drift when more than this share of components drift
    min_rows: int = MonitorConfig.min_rows  # fewer production rows than this: no verdict, an error
    last: int | None = MonitorConfig.last  # compare the latest N production rows (None: all)
    since: _dt.datetime | None = None  # ... logged at or after this time
    same_model_version: bool = True  # only rows scored by the reference's model version


@dataclass
class MonitorResult:
    """What one monitoring run found and wrote."""

    line: str
    n_reference: int
    n_current: int
    feature_drift: dict[str, bool]
    feature_p_values: dict[str, float]
    embedding_drift: bool
    embedding_drift_share: float
    score_shift: bool
    score_p_value: float
    score_mean_reference: float
    score_mean_current: float
    html_path: str
    json_path: str
    snapshot_path: str
    workspace_project: str | None = None
    rows_per_host: dict[str, int] = field(default_factory=dict)  # rows read from the store, by host id
    pipeline_triggered: bool = False
    pipeline_result: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def data_drift(self) -> bool:
        """Any image-feature column drifted."""
        return any(self.feature_drift.values())

    @property
    def drift_detected(self) -> bool:
        """Any of the three checks flagged drift."""
        return self.data_drift or self.embedding_drift or self.score_shift

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the file written next to the HTML report)."""
        data = asdict(self)
        data["pipeline_result"] = None if self.pipeline_result is None else str(self.pipeline_result)
        data.update(data_drift=self.data_drift, drift_detected=self.drift_detected)
        return data


def _reference_versions(reference: pd.DataFrame) -> set[str]:
    """The model versions a reference table was built with (none: any version compares)."""
    return set(reference.get("model_version", pd.Series(dtype=str)).dropna().astype(str)) - {""}


def select_production_rows(frame: pd.DataFrame, reference: pd.DataFrame, settings: MonitorSettings,
                           notes: list[str]) -> pd.DataFrame:
    """Keep the rows comparable with the reference (same model version when asked)."""
    if frame.empty:
        return frame
    versions = _reference_versions(reference)
    if settings.same_model_version and versions and "model_version" in frame.columns:
        keep = frame["model_version"].astype(str).isin(versions)
        if (~keep).any():
            notes.append(f"{int((~keep).sum())} rows from other model versions than {sorted(versions)} left out")
        frame = frame[keep]
    return frame.reset_index(drop=True)


def _drift_report(reference: pd.DataFrame, current: pd.DataFrame, k: int, settings: MonitorSettings):
    """Run the Evidently report; returns the snapshot."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift, ValueDrift
    from evidently.metrics.embeddings import RatioDriftMethod
    from evidently.presets import DataDriftPreset

    columns = feature_columns(k)
    definition = DataDefinition(numerical_columns=columns, embeddings={"embedding": embedding_columns(k)})
    ref = Dataset.from_pandas(reference[columns].astype(float), data_definition=definition)
    cur = Dataset.from_pandas(current[columns].astype(float), data_definition=definition)
    method = RatioDriftMethod(component_stattest="ks", component_stattest_threshold=settings.embedding_component_p_value,
                              threshold=settings.embedding_drift_share)
    report = Report([
        DataDriftPreset(columns=list(IMAGE_FEATURES), method="ks", threshold=settings.feature_p_value,
                        drift_share=1.0 / (len(IMAGE_FEATURES) + 1)),
        ValueDrift(column=SCORE_COLUMN, method="ks", threshold=settings.score_p_value),
        EmbeddingsDrift(embeddings_name="embedding", drift_method=method),
    ], include_tests=True)
    return report.run(current_data=cur, reference_data=ref)


def _metric_values(snapshot_dict: dict[str, Any]) -> tuple[dict[str, float], float]:
    """(K-S p-value per ValueDrift column, embedding drift share) from a snapshot's dict."""
    p_values: dict[str, float] = {}
    share = float("nan")
    for metric in snapshot_dict.get("metrics", []):
        config = metric.get("config", {})
        kind = str(config.get("type", ""))
        if kind.endswith(":ValueDrift"):
            p_values[config["column"]] = float(metric["value"])
        elif kind.endswith(":EmbeddingsDrift"):
            share = float(metric["value"])
    return p_values, share


def _workspace_project(workspace: Any, line: str):
    """The line's project ``redi-<line>`` in the workspace (created with its dashboard if new)."""
    name = f"redi-{line}"
    found = [p for p in workspace.search_project(name) if p.name == name]
    if found:
        return found[0]
    project = workspace.create_project(name, description=f"Drift of production images of line {line} "
                                                           f"against its training images (redi)")
    _add_dashboard(project, line)
    return project


def _add_dashboard(project: Any, line: str) -> None:
    """Panels that plot each check over the runs: feature p-values, score shift, embedding drift."""
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import counter_panel, line_plot_panel

    drift = [PanelMetric(legend=c, metric="ValueDrift", metric_labels={"column": c})
             for c in (*IMAGE_FEATURES, SCORE_COLUMN)]
    project.dashboard.add_panel(counter_panel(
        f"Line {line}: drifted image features (latest run)",
        [PanelMetric(legend="drifted features", metric="DriftedColumnsCount", metric_labels={"value_type": "count"})],
        size="half"), tab="Drift")
    project.dashboard.add_panel(line_plot_panel(
        "Embedding drift: share of drifted components", [PanelMetric(legend="share", metric="EmbeddingsDrift")],
        size="half"), tab="Drift")
    project.dashboard.add_panel(line_plot_panel(
        "K-S p-value per column (below the threshold = drift)", drift), tab="Drift")
    project.save()


WORKSPACE_SECRET_ENV = "REDI_EVIDENTLY_SECRET"  # the `evidently ui --secret` of a shared workspace service


def is_remote_workspace(workspace: str | Path) -> bool:
    """Whether ``workspace`` names an Evidently UI service (``http(s)://...``) rather than a folder."""
    return str(workspace).startswith(("http://", "https://"))


def open_workspace(workspace: str | Path, env: Mapping[str, str] | None = None):
    """The Evidently workspace: a service URL or a local folder (created when missing).

    A URL (``http://evidently.monitoring:8000``) is an ``evidently ui`` service that keeps the
    workspace for every host, the scheduled drift runs and the dashboard: runs go to it through
    Evidently's ``RemoteWorkspace`` (its API), with ``REDI_EVIDENTLY_SECRET`` when the service was
    started with ``--secret``. A folder is only seen by processes on this machine.

    Raises:
        ConfigError: the URL does not answer as an Evidently service.
    """
    env = os.environ if env is None else env
    if is_remote_workspace(workspace):
        from evidently.ui.workspace import RemoteWorkspace

        try:
            return RemoteWorkspace(str(workspace).rstrip("/"), secret=env.get(WORKSPACE_SECRET_ENV) or None)
        except Exception as exc:  # ValueError (not Evidently), connection errors
            raise ConfigError(f"the Evidently workspace service {workspace} does not answer ({exc}); start it "
                              f"(`evidently ui --workspace FOLDER --host 0.0.0.0 --port 8000`) or fix --workspace"
                              ) from exc
    from evidently.ui.workspace import Workspace

    path = Path(workspace)
    path.mkdir(parents=True, exist_ok=True)
    return Workspace(str(path))


def _add_run(ws: Any, workspace: str | Path, line: str, snapshot: Any, out: Path) -> str:
    """Add the run to the line's project; returns the project id. A refusal names the likely cause."""
    try:
        project = _workspace_project(ws, line)
        ws.add_run(project.id, snapshot, name=f"{line} {out.name}")
    except Exception as exc:  # HTTP 401/403 from a service, a read-only folder, ...
        hint = (f"a service started with `evidently ui --secret S` takes runs only with {WORKSPACE_SECRET_ENV}=S"
                if is_remote_workspace(workspace) else "check that the folder is writable")
        raise ConfigError(f"the Evidently workspace {workspace} did not take the run ({type(exc).__name__}: {exc}); "
                          f"{hint}. The report itself is in {out}") from exc
    return str(project.id)


def run_monitor(line: str, log_dir: str | Path | None, reference_path: str | Path, out_dir: str | Path,
                workspace: str | Path | None = None, settings: MonitorSettings | None = None,
                trigger_pipeline: bool = False, trigger: Callable[[str], Any] | None = None,
                store: Any = None) -> MonitorResult:
    """Compare a line's logged production rows with its reference table.

    The rows come from ``store`` when one is given (every host's shipped segments,
    :func:`read_store_rows`), else from the local log folder ``log_dir``. ``workspace`` is a folder or
    an ``evidently ui`` service URL (:func:`open_workspace`).

    Writes ``<out_dir>/<line>/<UTC time>/report.html``, ``snapshot.json`` (Evidently's) and
    ``result.json`` (the flags), adds the run to the workspace project ``redi-<line>`` when a
    workspace folder is given, and when drift is found and ``trigger_pipeline`` is set, calls
    ``trigger(line)`` (the caller's retraining; the command line builds it with
    ``redi.cli.pipeline.drift_trigger``: this library never imports its own orchestration).

    Raises:
        DatasetError: the reference table is missing or broken.
        InputError: fewer than ``settings.min_rows`` comparable production rows.
        ConfigError: ``trigger_pipeline`` without a ``trigger``.
    """
    check_line_name(line)
    if trigger_pipeline and trigger is None:
        raise ConfigError("trigger_pipeline needs a trigger function (e.g. redi.cli.pipeline.drift_trigger()); "
                          "the monitoring library does not import the pipeline itself")
    settings = settings or MonitorSettings()
    reference = load_reference(reference_path)
    k = len([c for c in reference.columns if c.startswith("emb_")])
    ws = open_workspace(workspace) if workspace is not None else None  # first: an unreachable service fails early
    notes: list[str] = []
    if store is not None:
        source = f"the shipped segments in {store.describe()}"
        versions = _reference_versions(reference) if settings.same_model_version else set()
        keep = (lambda row: str(row.get("model_version")) in versions) if versions else None
        current = read_store_rows(store, line, since=settings.since, last=settings.last, notes=notes, keep=keep)
    elif log_dir is not None:
        source = str(log_dir)
        current = ProductionLog(log_dir).read(line, since=settings.since, last=None)
    else:
        raise ConfigError("run_monitor needs the rows' source: a log folder (log_dir) or an object store (store)")
    current = select_production_rows(current, reference, settings, notes)
    if settings.last:
        current = current.tail(settings.last).reset_index(drop=True)
    if len(current) < settings.min_rows:
        raise InputError(f"line {line} has {len(current)} comparable production rows in {source} "
                         f"(need at least {settings.min_rows}); wait for more traffic or lower min_rows")
    if len(reference) + len(current) <= EVIDENTLY_MIN_ROWS:
        raise InputError(f"line {line}: the reference ({len(reference)} rows) and the production rows ({len(current)}) "
                         f"make {len(reference) + len(current)}; Evidently's embedding drift needs more than "
                         f"{EVIDENTLY_MIN_ROWS} together (its t-SNE plot); wait for at least "
                         f"{EVIDENTLY_MIN_ROWS + 1 - len(reference)} production rows (raise min_rows / --min-rows)")
    missing = [c for c in feature_columns(k) if c not in current.columns]
    if missing:
        raise DatasetError(f"production rows of line {line} in {source} lack columns {missing}; the reference "
                           f"{reference_path} was built with {k} embedding components - rebuild one of them")

    snapshot = _drift_report(reference, current, k, settings)
    p_values, share = _metric_values(snapshot.dict())
    out = Path(out_dir) / line / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(out / "report.html"))
    snapshot.save_json(str(out / "snapshot.json"))
    result = MonitorResult(
        line=line, n_reference=len(reference), n_current=len(current),
        feature_drift={c: p_values[c] < settings.feature_p_value for c in IMAGE_FEATURES},
        feature_p_values={c: p_values[c] for c in IMAGE_FEATURES},
        embedding_drift=bool(share > settings.embedding_drift_share), embedding_drift_share=share,
        score_shift=bool(p_values[SCORE_COLUMN] < settings.score_p_value), score_p_value=p_values[SCORE_COLUMN],
        score_mean_reference=float(reference[SCORE_COLUMN].mean()),
        score_mean_current=float(current[SCORE_COLUMN].mean()),
        html_path=str(out / "report.html"), json_path=str(out / "result.json"),
        snapshot_path=str(out / "snapshot.json"), notes=notes)
    if store is not None and "host" in current.columns:
        result.rows_per_host = {str(h): int(n) for h, n in current["host"].value_counts().sort_index().items()}
    if ws is not None:
        result.workspace_project = _add_run(ws, workspace, line, snapshot, out)
    if result.drift_detected and trigger_pipeline:
        result.pipeline_result = trigger(line)
        result.pipeline_triggered = True
    atomic_write_text(out / "result.json", json.dumps(result.to_dict(), indent=2, default=str))
    return result


REFERENCE_NAME = "drift_reference.csv"  # the gate uploads it with every version (redi.ops.gate)


def fetch_production_reference(store: Any, line: str, dest: str | Path) -> Path:
    """Download the drift reference of the line's production version from the store to ``dest``.

    A scheduled drift run (a pod, no local files) compares against what production serves. The
    reference is built before the gate names the version (the detector's training id; the version
    adds the file's hash), so its ``model_version`` column is set to the production version here:
    the rows the services log carry that name, and only they are compared.

    Raises:
        DatasetError: the line has no production version, or that version has no drift reference.
    """
    from redi.ops.model_registry import production_record, version_key

    pointer = production_record(store, check_line_name(line))
    if not pointer or not pointer.get("version"):
        raise DatasetError(f"line {line} has no production version in {store.describe()}, so there is no drift "
                           f"reference to compare with; promote a version first (the pipeline's gate)")
    key = version_key(line, str(pointer["version"]), REFERENCE_NAME)
    if not store.exists(key):
        raise DatasetError(f"production version {pointer['version']} of line {line} has no {REFERENCE_NAME} in "
                           f"{store.describe()}; rerun the line's pipeline (its drift_reference stage) or give "
                           f"--reference")
    path = store.get_file(key, dest)
    frame = load_reference(path)
    frame["model_version"] = str(pointer["version"])
    atomic_write_text(path, frame.to_csv(index=False))
    return path


def rows_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """A list of monitoring rows as a table (for tests and notebooks)."""
    return pd.DataFrame(list(rows))


__all__: Sequence[str] = (
    "FEATURE_SIZE", "PROJECTION_SEED", "N_EMBEDDING_COMPONENTS", "IMAGE_FEATURES", "SCORE_COLUMN",
    "image_feature_row", "luminance_features", "project_embedding", "feature_columns", "embedding_columns",
    "build_reference", "load_reference", "ProductionLog", "MonitorSettings", "MonitorResult", "run_monitor",
    "open_workspace", "is_remote_workspace", "read_store_rows", "fetch_production_reference", "check_line_name", "rows_frame",
)
