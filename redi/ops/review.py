"""The review index: kept images, operators' verdicts and what was exported, in a real database.

SQLite by default (``sqlite:///<REDI_LOG_DIR>/review.db``), any SQLAlchemy URL in production
(``REDI_REVIEW_DB``, e.g. ``postgresql+psycopg://user@db/redi``; several API replicas must share one
PostgreSQL database: docs/review.md). The same code runs on both: the schema is made (and upgraded)
under a PostgreSQL advisory lock so replicas starting together do not race, an image indexed twice is
inserted once (``ON CONFLICT DO NOTHING``), and a text longer than its column is refused with
:class:`ValueTooLong` on every backend (PostgreSQL enforces ``VARCHAR(n)``, SQLite does not). Tables:

- ``retained``: one row per image the service kept (``redi.ops.retention``): request id, line, kind
  (``flagged`` or ``sampled``), time, score, threshold, decision, model version, store keys, defect
  regions, ``sample_rate`` (the share of such answers kept when it was: 1 for flagged parts, the
  line's normal rate for sampled ones; NULL for rows kept before it was recorded); ``camera`` (the
  camera or station the request named, "" when none); ``unlike_part`` (JSON list: why the image
  looks unlike the line's parts, ``redi.core.part_check``; empty when it does not); ``expired_at``
  once the retention limits deleted it.
- ``verdicts``: every verdict ever given: request id, ``defect``, ``false_alarm`` or
  ``bad_image`` (not a part: a camera glitch, an empty belt; never training data), defect type,
  note, whether the drawn mask was accepted, who, when. The latest verdict of a request that was
  not withdrawn (``withdrawn_at``: the operator's undo) is the one that counts; the others stay as
  history.
- ``exports``: what ``redi review export`` wrote into a line's dataset (so nothing is written twice).
- ``operators``, ``operator_sessions``, ``login_failures``: the review page's accounts (password
  hashes), its server-side sessions (revocable) and the failed logins its rate limit counts
  (``redi.ops.review_accounts``).

The object store holds the images; this database is their index (``sync_from_store`` rebuilds
it from the stored ``record.json`` files).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Any, Mapping

from sqlalchemy import (Boolean, Float, ForeignKey, Integer, String, Table, Text, create_engine, event, func,
                        inspect, insert, select, text, update)
from sqlalchemy.dialects import postgresql as _postgresql
from sqlalchemy.dialects import sqlite as _sqlite
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from redi.core.errors import RediError
from redi.ops.retention import DISAGREEMENT, FLAGGED, SAMPLED

VERDICTS = ("defect", "false_alarm", "bad_image")
KEPT_KINDS = (FLAGGED, SAMPLED, DISAGREEMENT)  # why an image was kept
# verdicts whose image may become training data (``bad_image`` never does: redi.ops.review_export)
TRAINING_VERDICTS = ("defect", "false_alarm")
DEFAULT_DEFECT_TYPE = "defect"
_TYPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class ReviewError(RediError):
    """A review request that cannot be done; ``status`` is the HTTP status the page answers."""

    status = 400


class UnknownRequest(ReviewError):
    """No kept image has this request id."""

    status = 404


class ImageExpired(ReviewError):
    """The image was deleted by the retention limits; it can no longer be judged."""

    status = 410


class InvalidVerdict(ReviewError):
    """The verdict's fields are wrong (kind, defect type, operator)."""

    status = 422


class ValueTooLong(ReviewError):
    """A text is longer than its column allows (PostgreSQL refuses it; SQLite is held to the same limit)."""

    status = 422


def now_iso() -> str:
    """The current UTC time, ISO 8601 with microseconds (sorts as text)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


class Base(DeclarativeBase):
    pass


class Retained(Base):
    __tablename__ = "retained"
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    line: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    time: Mapped[str] = mapped_column(String(40), index=True)
    date: Mapped[str] = mapped_column(String(10), index=True)
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    anomalous: Mapped[bool] = mapped_column(Boolean)
    model_version: Mapped[str] = mapped_column(String(128), index=True)
    model_tag: Mapped[str] = mapped_column(String(512), default="")
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    image_key: Mapped[str] = mapped_column(String(512))
    map_key: Mapped[str] = mapped_column(String(512))
    record_key: Mapped[str] = mapped_column(String(512))
    regions: Mapped[str] = mapped_column(Text, default="[]")
    indexed_at: Mapped[str] = mapped_column(String(40))
    expired_at: Mapped[str | None] = mapped_column(String(40), nullable=True)
    # the chance this answer had to be kept (1 flagged, the normal rate sampled): a verdict on a sampled
    # part stands for 1/sample_rate parts when rates are estimated (redi.ops.review_threshold)
    sample_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    camera: Mapped[str | None] = mapped_column(String(128), nullable=True)  # as the request named it
    # why the image looks unlike the line's parts (JSON list, redi.core.part_check); NULL/[] when it does not
    unlike_part: Mapped[str | None] = mapped_column(Text, nullable=True)


class Verdict(Base):
    __tablename__ = "verdicts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("retained.request_id"), index=True)
    line: Mapped[str] = mapped_column(String(64), index=True)
    verdict: Mapped[str] = mapped_column(String(16))
    defect_type: Mapped[str] = mapped_column(String(64), default="")
    accept_mask: Mapped[bool] = mapped_column(Boolean, default=False)
    note: Mapped[str] = mapped_column(Text, default="")
    by: Mapped[str] = mapped_column(String(128))
    at: Mapped[str] = mapped_column(String(40))
    # the operator account whose login session sent it (NULL: sent with the API key, ``by`` is the caller's claim)
    operator: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # the operator's undo: a withdrawn verdict no longer counts (the previous one, or none, does again)
    withdrawn_at: Mapped[str | None] = mapped_column(String(40), nullable=True)
    withdrawn_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # a defect's mask drawn by the operator in the browser (a PNG in the kept image's folder); it wins over
    # the thresholded map when the verdict is exported
    mask_key: Mapped[str | None] = mapped_column(String(512), nullable=True)


class Export(Base):
    __tablename__ = "exports"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("retained.request_id"), index=True)
    verdict_id: Mapped[int] = mapped_column(ForeignKey("verdicts.id"))
    line: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16))  # written | needs_mask
    target: Mapped[str] = mapped_column(String(512))  # the image's path inside the dataset
    mask: Mapped[str] = mapped_column(String(512), default="")
    data_repo: Mapped[str] = mapped_column(String(1024))
    data_path: Mapped[str] = mapped_column(String(512))
    revision: Mapped[str] = mapped_column(String(64))
    by: Mapped[str] = mapped_column(String(128))
    at: Mapped[str] = mapped_column(String(40))


class Operator(Base):
    """A review-page account: the password is stored only as a salted KDF hash (``review_accounts``)."""

    __tablename__ = "operators"
    username: Mapped[str] = mapped_column(String(64), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[str] = mapped_column(String(40))
    created_by: Mapped[str] = mapped_column(String(128), default="")
    password_set_at: Mapped[str] = mapped_column(String(40))
    disabled_at: Mapped[str | None] = mapped_column(String(40), nullable=True)


class OperatorSession(Base):
    """A login: the cookie carries the token, the database only its sha256 (a copied table logs nobody in)."""

    __tablename__ = "operator_sessions"
    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(ForeignKey("operators.username"), index=True)
    created_at: Mapped[str] = mapped_column(String(40))
    expires_at: Mapped[float] = mapped_column(Float)  # unix time
    client: Mapped[str] = mapped_column(String(64), default="")
    revoked_at: Mapped[str | None] = mapped_column(String(40), nullable=True)
    revoked_why: Mapped[str] = mapped_column(String(64), default="")


class LoginFailure(Base):
    """One failed login (the rate limit counts them per username and per client address)."""

    __tablename__ = "login_failures"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    client: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[float] = mapped_column(Float, index=True)  # unix time


def _check_lengths(table: Table, values: Mapping[str, Any]) -> None:
    """Refuse a text longer than its ``VARCHAR(n)`` column, on every backend alike (PostgreSQL would fail the
    write with a driver error, SQLite would store it: the same request must not do both)."""
    for column in table.columns:
        limit, value = getattr(column.type, "length", None), values.get(column.name)
        if limit and isinstance(value, str) and len(value) > limit:
            raise ValueTooLong(f"{table.name}.{column.name} is {len(value)} characters long; the review database "
                               f"keeps at most {limit}: shorten it (nothing was stored)")


def _check_row(_mapper: Any, _connection: Any, target: Any) -> None:
    _check_lengths(target.__table__, {c.name: getattr(target, c.name, None) for c in target.__table__.columns})


# every ORM write of every table (this module's and review_accounts') is held to the column lengths
event.listen(Base, "before_insert", _check_row, propagate=True)
event.listen(Base, "before_update", _check_row, propagate=True)


def default_db_url(env: Mapping[str, str] | None = None) -> str:
    """``REDI_REVIEW_DB``, else SQLite in the production log folder (``REDI_LOG_DIR``)."""
    env = os.environ if env is None else env
    url = env.get("REDI_REVIEW_DB", "").strip()
    if url:
        return url
    folder = Path(env.get("REDI_LOG_DIR", "").strip() or "production_logs").resolve()
    return f"sqlite:///{folder / 'review.db'}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: the page reads while the service's workers write; busy timeout: workers wait, not fail (set first:
    # switching to WAL takes a lock, and workers opening a new database at once fail "database is locked")
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    deadline = time.monotonic() + 30
    while True:  # switching a new file to WAL answers "locked" at once, without the busy timeout, while another
        try:     # worker switches it: wait for that one (WAL stays set in the file)
            cursor.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


# columns added after the first release: create_all() makes missing tables, never missing columns
_LATER_COLUMNS = {"retained": {"sample_rate": "FLOAT", "camera": "VARCHAR(128)", "unlike_part": "TEXT"},
                  "verdicts": {"operator": "VARCHAR(64)", "withdrawn_at": "VARCHAR(40)",
                               "withdrawn_by": "VARCHAR(128)", "mask_key": "VARCHAR(512)"}}


# PostgreSQL advisory lock key (any constant bigint) that serializes schema creation and upgrades
# between replicas starting at once: CREATE TABLE and ALTER TABLE race otherwise
_SCHEMA_LOCK = 0x7265646972657669  # "redirevi"
_DRIVER_HINT = ("set REDI_REVIEW_DB to a SQLAlchemy URL: sqlite:////path/review.db, or "
                "postgresql+psycopg://USER:PASSWORD@HOST:5432/DBNAME for a database shared by several replicas")


def _latest() -> Any:
    """Per request id, the id of the verdict that counts: the newest one not withdrawn."""
    return (select(Verdict.request_id, func.max(Verdict.id).label("vid")).where(Verdict.withdrawn_at.is_(None))
            .group_by(Verdict.request_id).subquery())


def _add_later_columns(engine: Engine) -> None:
    """Add the columns an older SQLite database lacks (nullable, so old rows read as NULL)."""
    for table, columns in _LATER_COLUMNS.items():
        for name, sql_type in columns.items():
            if name in {c["name"] for c in inspect(engine).get_columns(table)}:
                continue
            try:
                with engine.begin() as connection:
                    connection.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}"))
            except Exception:  # another worker added it first; anything else fails the check below
                if name not in {c["name"] for c in inspect(engine).get_columns(table)}:
                    raise


def _create_schema_locked(connection: Connection) -> None:
    """Make the missing tables and columns in one PostgreSQL transaction that holds the schema lock: a
    second replica waits for it, then finds everything made (DDL is transactional there)."""
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
    Base.metadata.create_all(connection)
    for table, columns in _LATER_COLUMNS.items():
        for name, sql_type in columns.items():
            connection.execute(text(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {sql_type}"))


def _check_url(url: str) -> None:
    """Refuse URLs that would pick no driver or one the project does not ship, saying what to write."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ReviewError(f"REDI_REVIEW_DB {url!r} is not a database URL ({exc}); {_DRIVER_HINT}") from exc
    if parsed.drivername in ("postgres", "postgresql"):
        fixed = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=True)
        raise ReviewError(f"REDI_REVIEW_DB {parsed.render_as_string(hide_password=True)!r} names no database driver; "
                          f"write it as {fixed!r} (psycopg 3, installed with redi)")


def _engine(url: str) -> Engine:
    """The engine for ``url``: SQLite waits on a busy database; PostgreSQL checks a pooled connection before
    use (a restarted server or a dropped idle connection is reconnected, not failed) and gives up
    connecting after 10 s instead of hanging a request."""
    _check_url(url)
    parsed = make_url(url)
    args: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        args["connect_args"] = {"timeout": 30}
    elif parsed.get_backend_name() == "postgresql":
        args["pool_pre_ping"] = True
        if "connect_timeout" not in parsed.query:
            args["connect_args"] = {"connect_timeout": 10}
    try:
        return create_engine(url, **args)
    except (ImportError, NoSuchModuleError) as exc:
        raise ReviewError(f"cannot open the review database {parsed.render_as_string(hide_password=True)!r}: its "
                          f"driver is not installed ({exc}); install it (PostgreSQL: pip install "
                          f"'psycopg[binary]>=3.2,<4', a dependency of redi) or {_DRIVER_HINT}") from exc
    except Exception as exc:
        raise ReviewError(f"cannot open the review database {parsed.render_as_string(hide_password=True)!r}: "
                          f"{exc}; {_DRIVER_HINT}") from exc


def _sample_rate(record: Mapping[str, Any]) -> float | None:
    """The record's sampling rate; a flagged part is always kept (1), an old sampled one is unknown."""
    if record.get("sample_rate") is not None:
        return float(record["sample_rate"])
    return 1.0 if record.get("kind", "flagged") == "flagged" else None


def _false_alarm_rate(counts: Mapping[str, int]) -> float | None:
    """False alarms among the judged parts (confirmed + false alarms); None before any."""
    parts = counts["confirmed"] + counts["false_alarms"]
    return counts["false_alarms"] / parts if parts else None


def _retained_dict(row: Retained) -> dict[str, Any]:
    out = {c.name: getattr(row, c.name) for c in Retained.__table__.columns}
    out["regions"] = json.loads(row.regions or "[]")
    out["unlike_part"] = json.loads(row.unlike_part or "[]")
    return out


def _verdict_dict(row: Verdict) -> dict[str, Any]:
    return {c.name: getattr(row, c.name) for c in Verdict.__table__.columns}


class ReviewDB:
    """The review index behind one SQLAlchemy URL (tables are created when missing)."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url or default_db_url()
        if self.url.startswith("sqlite:///"):
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = _engine(self.url)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            self._create_schema()
        except DBAPIError as exc:
            self.engine.dispose()
            what = ("check that the server runs and is reachable from here, and REDI_REVIEW_DB's host, port, user, "
                    "password and database name (the database must exist: CREATE DATABASE)"
                    if self.engine.dialect.name != "sqlite" else "check that its folder is writable and the file is "
                    "a SQLite database (or set REDI_REVIEW_DB)")
            shown = self.engine.url.render_as_string(hide_password=True)
            raise ReviewError(f"cannot use the review database {shown!r}: {' '.join(str(exc.orig).split())}; "
                              f"{what}") from exc

    def _create_schema(self) -> None:
        if self.engine.dialect.name == "postgresql":
            with self.engine.begin() as connection:
                _create_schema_locked(connection)
            return
        for attempt in range(5):  # SQLite: workers opening a new file at once race between check and CREATE
            try:
                Base.metadata.create_all(self.engine)
                break
            except OperationalError as exc:  # "table ... already exists": made by another worker; look again
                if "already exists" not in str(exc.orig) or attempt == 4:
                    raise
        _add_later_columns(self.engine)

    def __repr__(self) -> str:
        return f"ReviewDB({self.engine.url.render_as_string(hide_password=True)})"

    # -- what retention tells ------------------------------------------------------------------
    def add_retained(self, record: Mapping[str, Any]) -> None:
        """Index one kept image (its ``record.json``); an id already indexed is left as it is (also when
        another replica or ``sync_from_store`` indexes it at the same moment)."""
        values = dict(
            request_id=record["request_id"], line=record["line"], kind=record.get("kind", "flagged"),
            time=record["time"], date=record["time"][:10], score=float(record["score"]),
            threshold=float(record["threshold"]), anomalous=bool(record["anomalous"]),
            model_version=str(record.get("model_version", "")), model_tag=str(record.get("model_tag", "")),
            width=int(record["width"]), height=int(record["height"]), image_key=record["image_key"],
            map_key=record["map_key"], record_key=record["record_key"],
            regions=json.dumps(record.get("regions", [])), indexed_at=now_iso(),
            sample_rate=_sample_rate(record), camera=str(record.get("camera") or "")[:128] or None,
            unlike_part=json.dumps([str(r) for r in record.get("unlike_part") or []]))
        _check_lengths(Retained.__table__, values)
        dialect = {"postgresql": _postgresql, "sqlite": _sqlite}.get(self.engine.dialect.name)
        with self.engine.begin() as connection:
            if dialect is not None:  # one statement: no window between "is it there" and the insert
                connection.execute(dialect.insert(Retained).values(**values)
                                   .on_conflict_do_nothing(index_elements=["request_id"]))
                return
            try:
                with connection.begin_nested():
                    connection.execute(insert(Retained).values(**values))
            except IntegrityError:  # indexed already (by another writer)
                pass

    def pinned_ids(self, line: str) -> set[str]:
        """Request ids of the line whose verdict will be exported and was not yet (retention keeps them);
        a ``bad_image`` is never exported, so the limits may delete it like any other kept image."""
        latest = _latest()
        with Session(self.engine) as session:
            judged = (select(Verdict.request_id).join(latest, latest.c.vid == Verdict.id)
                      .where(Verdict.line == line, Verdict.verdict.in_(TRAINING_VERDICTS)))
            exported = select(Export.request_id).where(Export.line == line)
            return set(session.scalars(judged.except_(exported)))

    def mark_expired(self, request_ids: list[str]) -> None:
        """Record that these images were deleted by the retention limits."""
        if not request_ids:
            return
        with Session(self.engine) as session, session.begin():
            session.execute(update(Retained).where(Retained.request_id.in_(request_ids),
                                                   Retained.expired_at.is_(None)).values(expired_at=now_iso()))

    # -- reading -------------------------------------------------------------------------------
    def lines(self) -> list[str]:
        """Every line with a kept image."""
        with Session(self.engine) as session:
            return list(session.scalars(select(Retained.line).distinct().order_by(Retained.line)))

    def model_versions(self, line: str) -> list[str]:
        """The model versions that produced the line's kept images."""
        with Session(self.engine) as session:
            return list(session.scalars(select(Retained.model_version).where(Retained.line == line)
                                        .distinct().order_by(Retained.model_version)))

    def get(self, request_id: str) -> dict[str, Any]:
        """A kept image with its verdict history (oldest first) and ``verdict`` (the latest, or None)."""
        with Session(self.engine) as session:
            row = session.get(Retained, request_id)
            if row is None:
                raise UnknownRequest(f"no kept image has request id {request_id!r}: it was never flagged or "
                                     f"sampled, or it is from another service's database (REDI_REVIEW_DB)")
            history = [_verdict_dict(v) for v in session.scalars(
                select(Verdict).where(Verdict.request_id == request_id).order_by(Verdict.id))]
            exports = list(session.scalars(select(Export.target).where(Export.request_id == request_id)))
        counting = [v for v in history if v["withdrawn_at"] is None]
        return {**_retained_dict(row), "history": history, "verdict": counting[-1] if counting else None,
                "exported": exports}

    def queue(self, line: str, kind: str = "flagged", model_version: str = "", date_from: str = "",
              date_to: str = "", min_score: float | None = None, max_score: float | None = None,
              status: str = "all", limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        """The line's kept images, newest first, filtered; each with its latest verdict.

        Args:
            kind: ``flagged``, ``sampled``, ``disagreement`` (shadow mode: production and the candidate
                decided differently) or ``all``.
            status: ``pending`` (no verdict), ``judged`` or ``all``; expired images are left out.
            date_from, date_to: ``YYYY-MM-DD`` (UTC), inclusive.
        """
        latest = _latest()
        query = (select(Retained, Verdict).outerjoin(latest, latest.c.request_id == Retained.request_id)
                 .outerjoin(Verdict, Verdict.id == latest.c.vid)
                 .where(Retained.line == line, Retained.expired_at.is_(None)))
        if kind in KEPT_KINDS:
            query = query.where(Retained.kind == kind)
        if model_version:
            query = query.where(Retained.model_version == model_version)
        if date_from:
            query = query.where(Retained.date >= date_from)
        if date_to:
            query = query.where(Retained.date <= date_to)
        if min_score is not None:
            query = query.where(Retained.score >= min_score)
        if max_score is not None:
            query = query.where(Retained.score <= max_score)
        if status == "pending":
            query = query.where(latest.c.vid.is_(None))
        elif status == "judged":
            query = query.where(latest.c.vid.is_not(None))
        query = query.order_by(Retained.time.desc()).limit(limit).offset(offset)
        with Session(self.engine) as session:
            return [{**_retained_dict(r), "verdict": _verdict_dict(v) if v is not None else None}
                    for r, v in session.execute(query)]

    def summary(self, line: str, day: str | None = None) -> dict[str, Any]:
        """Per model version: flagged (kept) today and in all, judged, confirmed, false alarms and rate,
        and the thresholds those parts were decided with.

        The false-alarm rate counts parts only: false alarms among confirmed defects and false
        alarms (a ``bad_image`` is no part, so neither). A rate means nothing without the threshold it was made at, and an override changes the
        threshold within one model version, so each version names the lowest and highest threshold
        of its judged parts (``threshold_min``, ``threshold_max``; None when none is judged) and of
        all its flagged parts (``flagged_threshold_min``, ``flagged_threshold_max``). The totals mix
        versions whose scores are not on one scale: they carry no threshold.
        """
        day = day or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
        latest = _latest()
        query = (select(Retained.model_version, Retained.date, Retained.threshold, Verdict.verdict)
                 .outerjoin(latest, latest.c.request_id == Retained.request_id)
                 .outerjoin(Verdict, Verdict.id == latest.c.vid)
                 .where(Retained.line == line, Retained.kind == "flagged"))
        versions: dict[str, dict[str, Any]] = {}
        judged_thresholds: dict[str, list[float]] = {}
        flagged_thresholds: dict[str, list[float]] = {}
        with Session(self.engine) as session:
            for version, date, threshold, verdict in session.execute(query):
                row = versions.setdefault(version, {"model_version": version, "flagged_today": 0, "flagged": 0,
                                                    "judged": 0, "confirmed": 0, "false_alarms": 0,
                                                    "bad_images": 0})
                row["flagged"] += 1
                row["flagged_today"] += date == day
                row["judged"] += verdict is not None
                row["confirmed"] += verdict == "defect"
                row["false_alarms"] += verdict == "false_alarm"
                row["bad_images"] += verdict == "bad_image"
                flagged_thresholds.setdefault(version, []).append(threshold)
                if verdict is not None:
                    judged_thresholds.setdefault(version, []).append(threshold)
        for version, row in versions.items():
            row["false_alarm_rate"] = _false_alarm_rate(row)
            judged = judged_thresholds.get(version)
            row["threshold_min"], row["threshold_max"] = (min(judged), max(judged)) if judged else (None, None)
            row["flagged_threshold_min"] = min(flagged_thresholds[version])
            row["flagged_threshold_max"] = max(flagged_thresholds[version])
        totals = {k: sum(r[k] for r in versions.values())
                  for k in ("flagged_today", "flagged", "judged", "confirmed", "false_alarms", "bad_images")}
        totals["false_alarm_rate"] = _false_alarm_rate(totals)
        return {"line": line, "day": day, "by_model_version": sorted(versions.values(),
                                                                     key=lambda r: r["model_version"]),
                "totals": totals}

    def kept_with_verdicts(self, line: str) -> list[dict[str, Any]]:
        """Every kept part of the line, expired ones included (their verdicts and scores still stand),
        oldest first: ``request_id, kind, time, score, threshold, model_version, sample_rate`` and
        ``verdict`` (the latest verdict's kind, or None); parts judged ``bad_image`` are left out."""
        latest = _latest()
        query = (select(Retained.request_id, Retained.kind, Retained.time, Retained.score, Retained.threshold,
                        Retained.model_version, Retained.sample_rate, Verdict.verdict)
                 .outerjoin(latest, latest.c.request_id == Retained.request_id)
                 .outerjoin(Verdict, Verdict.id == latest.c.vid)
                 .where(Retained.line == line).order_by(Retained.time))
        with Session(self.engine) as session:  # a bad image is no part: no evidence about a part's score
            return [dict(row._mapping) for row in session.execute(query) if row.verdict != "bad_image"]

    # -- verdicts ------------------------------------------------------------------------------
    def add_verdict(self, request_id: str, verdict: str, by: str, note: str = "", defect_type: str = "",
                    accept_mask: bool = False, image_exists: bool | None = None,
                    operator: str | None = None, mask_key: str | None = None) -> dict[str, Any]:
        """Store one verdict (history is kept; the latest counts); return it.

        Args:
            verdict: ``defect``, ``false_alarm`` or ``bad_image`` (not a part; never exported).
            defect_type: for ``defect``: the ``test/<type>/`` folder it goes to (default ``defect``).
            accept_mask: for ``defect``: the thresholded map is a good enough mask for training.
            image_exists: whether the image is still in the store (the caller checked); False
                marks it expired and refuses the verdict.
            operator: the logged-in account that judged (None when the caller used the API key).
            mask_key: for ``defect``: the store key of the mask the operator drew (exported as the
                ground truth instead of the thresholded map).

        Raises:
            UnknownRequest, ImageExpired, InvalidVerdict.
        """
        if verdict not in VERDICTS:
            raise InvalidVerdict(f"verdict {verdict!r} is not one of {VERDICTS}")
        if not by.strip():
            raise InvalidVerdict("a verdict needs the operator's name (who judged it)")
        defect_type = defect_type.strip()
        if verdict == "defect":
            defect_type = defect_type or DEFAULT_DEFECT_TYPE
            if not _TYPE_NAME.match(defect_type) or defect_type == "good":
                raise InvalidVerdict(f"defect type {defect_type!r} is not a folder name (letters, digits, '_', '-';"
                                     f" not 'good')")
        else:
            defect_type, accept_mask, mask_key = "", False, None
        if image_exists is False:
            self.mark_expired([request_id])
        with Session(self.engine) as session, session.begin():
            row = session.get(Retained, request_id)
            if row is None:
                raise UnknownRequest(f"no kept image has request id {request_id!r}; nothing was stored")
            if row.expired_at is not None:
                raise ImageExpired(f"the image of request {request_id} was deleted by the retention limits on "
                                   f"{row.expired_at[:19]} (REDI_RETAIN_DAYS / REDI_RETAIN_MAX_PER_LINE); it can "
                                   f"no longer be judged or exported. Nothing was stored")
            stored = Verdict(request_id=request_id, line=row.line, verdict=verdict, defect_type=defect_type,
                             accept_mask=bool(accept_mask), note=note.strip(), by=by.strip(), at=now_iso(),
                             operator=operator, mask_key=mask_key or None)
            session.add(stored)
            session.flush()
            return _verdict_dict(stored)

    def withdraw_verdict(self, request_id: str, by: str) -> dict[str, Any] | None:
        """The operator's undo: withdraw the verdict that counts now; return the one that counts after it
        (the previous verdict, or None: the image is pending again). History keeps the withdrawn one.

        Raises:
            UnknownRequest; InvalidVerdict when there is nothing to withdraw or the verdict was exported
            already (the data revision holds it: judge again instead, ``changed_after_export`` lists it).
        """
        if not by.strip():
            raise InvalidVerdict("an undo needs the operator's name (who withdrew the verdict)")
        with Session(self.engine) as session, session.begin():
            if session.get(Retained, request_id) is None:
                raise UnknownRequest(f"no kept image has request id {request_id!r}; nothing was withdrawn")
            # locked (PostgreSQL): two undos at once withdraw one verdict, not the same one twice
            current = session.scalars(select(Verdict).where(Verdict.request_id == request_id,
                                                            Verdict.withdrawn_at.is_(None))
                                      .order_by(Verdict.id.desc()).limit(1).with_for_update()).first()
            if current is None:
                raise InvalidVerdict(f"request {request_id} has no verdict to undo")
            if session.scalars(select(Export.id).where(Export.verdict_id == current.id)).first() is not None:
                raise InvalidVerdict(f"the verdict on {request_id} was already exported into the line's data; it "
                                     f"cannot be undone: give the right verdict instead (the export lists it as "
                                     f"changed after export)")
            current.withdrawn_at, current.withdrawn_by = now_iso(), by.strip()
            previous = session.scalars(select(Verdict).where(Verdict.request_id == request_id,
                                                             Verdict.withdrawn_at.is_(None))
                                       .order_by(Verdict.id.desc()).limit(1)).first()
            return _verdict_dict(previous) if previous is not None else None

    # -- exports -------------------------------------------------------------------------------
    def to_export(self, line: str) -> list[dict[str, Any]]:
        """The line's judged, not yet exported, not expired images, oldest first, with the latest verdict;
        never an image judged ``bad_image`` (not a part: it must not become training data)."""
        latest = _latest()
        exported = select(Export.request_id)
        query = (select(Retained, Verdict).join(latest, latest.c.request_id == Retained.request_id)
                 .join(Verdict, Verdict.id == latest.c.vid)
                 .where(Retained.line == line, Retained.expired_at.is_(None), Verdict.verdict.in_(TRAINING_VERDICTS),
                        Retained.request_id.not_in(exported)).order_by(Retained.time))
        with Session(self.engine) as session:
            return [{**_retained_dict(r), "verdict": _verdict_dict(v)} for r, v in session.execute(query)]

    def changed_after_export(self, line: str) -> list[dict[str, Any]]:
        """Exported images whose latest verdict is newer than the one exported (not moved automatically)."""
        latest = _latest()
        query = (select(Export, latest.c.vid).join(latest, latest.c.request_id == Export.request_id)
                 .where(Export.line == line, latest.c.vid > Export.verdict_id))
        with Session(self.engine) as session:
            return [{"request_id": e.request_id, "target": e.target, "exported_verdict_id": e.verdict_id,
                     "latest_verdict_id": vid} for e, vid in session.execute(query)]

    def record_exports(self, rows: list[Mapping[str, Any]]) -> None:
        """Record what an export wrote (one transaction)."""
        with Session(self.engine) as session, session.begin():
            session.add_all(Export(**dict(row)) for row in rows)

    def exports(self, line: str) -> list[dict[str, Any]]:
        """Every export record of a line, oldest first."""
        with Session(self.engine) as session:
            return [{c.name: getattr(e, c.name) for c in Export.__table__.columns}
                    for e in session.scalars(select(Export).where(Export.line == line).order_by(Export.id))]

    # -- recovery ------------------------------------------------------------------------------
    def sync_from_store(self, store: Any, line: str) -> dict[str, int]:
        """Index every kept image of the line's store folder that the database lacks, and mark the
        indexed ones whose record is gone as expired. Returns ``{added, expired}``."""
        from redi.ops.retention import records_in_store, request_id_of

        keys = records_in_store(store, line)
        present = {request_id_of(key.rsplit("/", 1)[0]) for key in keys}
        with Session(self.engine) as session:
            known = set(session.scalars(select(Retained.request_id).where(Retained.line == line)))
            live = set(session.scalars(select(Retained.request_id).where(Retained.line == line,
                                                                         Retained.expired_at.is_(None))))
        added = 0
        for key in keys:
            if request_id_of(key.rsplit("/", 1)[0]) not in known and (record := store.get_json(key)) is not None:
                self.add_retained(record)
                added += 1
        gone = sorted(live - present)
        self.mark_expired(gone)
        return {"added": added, "expired": len(gone)}


__all__ = ["DEFAULT_DEFECT_TYPE", "ImageExpired", "InvalidVerdict", "LoginFailure", "Operator", "OperatorSession",
           "ReviewDB", "ReviewError", "TRAINING_VERDICTS", "UnknownRequest", "VERDICTS", "ValueTooLong", "default_db_url",
           "now_iso"]
