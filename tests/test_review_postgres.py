"""The review database shared by several API replicas: real processes writing to one database at once.

Each replica is a separate Python process (as each ``bentoml serve`` replica is) that opens the review
database at the same moment as the others, so the schema is created, or upgraded from an older one,
by all of them at once; then each indexes its own kept images and the same shared ones (as two replicas
syncing one store do), judges the shared ones, creates an account, logs in and fails logins. Every row
must be there exactly once and no process may fail. These run on a real PostgreSQL (Debian's, started by
the ``pg_server`` fixture) and, for comparison, on SQLite (several workers of one host). The other tests
here check what PostgreSQL enforces and SQLite does not (text lengths), a dropped connection (server
restart) and the errors for a wrong URL, a missing driver and an unreachable server.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, inspect, select, text
from sqlalchemy.orm import Session

from redi.ops.review import (_LATER_COLUMNS, LoginFailure, Operator, OperatorSession, Retained, ReviewDB, ReviewError,
                             ValueTooLong, Verdict)

REPO = Path(__file__).resolve().parents[1]
LINE = "bottle_caps"
REPLICAS, IMAGES, LOGINS = 3, 12, 2
PASSWORD = "valve seat 4711"

# one replica: waits for the common start time, opens the database (schema made or upgraded by all at once),
# then writes what a replica writes; argv: url, start time, replica number, images, logins
REPLICA = """
import sys, time
url, start, me, images, logins = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
from redi.ops.review import ReviewDB
from redi.ops.review_accounts import OperatorAccounts
time.sleep(max(0.0, start - time.time()))
db = ReviewDB(url)
accounts = OperatorAccounts(db)

def record(request_id):
    return {"request_id": request_id, "line": "bottle_caps", "time": "2026-01-02T03:04:05.000000+00:00",
            "score": 2.0, "threshold": 1.0, "anomalous": True, "width": 8, "height": 8, "model_version": "v1",
            "image_key": f"k/{request_id}/image.png", "map_key": f"k/{request_id}/map.png",
            "record_key": f"k/{request_id}/record.json"}

accounts.add(f"op{me}", "valve seat 4711", by="replica")
for i in range(images):
    db.add_retained(record(f"r{me}-{i}"))
    db.add_retained(record(f"shared-{i}"))  # the same image indexed by every replica
    db.add_verdict(f"shared-{i}", "defect" if i % 2 else "false_alarm", by=f"op{me}", operator=f"op{me}",
                   mask_key=f"k/shared-{i}/mask-{me}.png" if i % 2 else None)
    accounts.login(f"nobody{me}x{i}", "wrong password", f"10.0.{me}.{i}")
for _ in range(logins):
    assert accounts.login(f"op{me}", "valve seat 4711", f"10.1.{me}.1").ok
print("done", me)
"""


def _run_replicas(url: str, count: int = REPLICAS, images: int = IMAGES, logins: int = LOGINS) -> None:
    """``count`` replica processes started together; each must finish without an error."""
    start = time.time() + 3.0  # every process has imported sqlalchemy by then: they open the database together
    procs = [subprocess.Popen([sys.executable, "-c", REPLICA, url, str(start), str(me), str(images), str(logins)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for me in range(count)]
    outcomes = [(me, *proc.communicate(timeout=300), proc.returncode) for me, proc in enumerate(procs)]
    for me, out, err, code in outcomes:
        assert code == 0 and f"done {me}" in out, f"replica {me} failed:\n{err}"


def _count(db: ReviewDB, column) -> tuple[int, int]:
    """Rows and distinct values of ``column``."""
    with Session(db.engine) as session:
        return (session.scalar(select(func.count()).select_from(column.class_)),
                session.scalar(select(func.count(func.distinct(column)))))


def _assert_every_row_once(db: ReviewDB, replicas: int = REPLICAS) -> None:
    assert _count(db, Retained.request_id) == (replicas * IMAGES + IMAGES,) * 2
    assert _count(db, Verdict.id) == (replicas * IMAGES,) * 2
    assert _count(db, Operator.username) == (replicas,) * 2
    assert _count(db, OperatorSession.token_sha256) == (replicas * LOGINS,) * 2
    assert _count(db, LoginFailure.id) == (replicas * IMAGES,) * 2
    for i in range(IMAGES):  # every replica's verdict on every shared image, the history intact
        history = db.get(f"shared-{i}")["history"]
        assert sorted(v["operator"] for v in history) == [f"op{me}" for me in range(replicas)]


@pytest.mark.slow
def test_replicas_create_the_schema_and_write_at_once(review_db_url: str) -> None:
    _run_replicas(review_db_url)  # the database is empty: every replica creates the tables at once
    _assert_every_row_once(ReviewDB(review_db_url))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_replicas_opening_new_databases_at_once_all_succeed(request: pytest.FixtureRequest, tmp_path: Path,
                                                            backend: str) -> None:
    """Replicas that start together on an empty database race to create its tables (PostgreSQL: a duplicate
    key in its catalog; SQLite: "table already exists", "database is locked"); three rounds make the race
    likely (without the schema lock about one round in two failed here)."""
    from pg_server import review_database

    for attempt in range(3):
        (tmp_path / str(attempt)).mkdir()
        with review_database(request, backend, tmp_path / str(attempt)) as url:
            _run_replicas(url, images=0, logins=0)
            assert _count(ReviewDB(url), Operator.username) == (REPLICAS, REPLICAS)


@pytest.mark.slow
def test_replicas_upgrade_an_older_schema_at_once(review_db_url: str) -> None:
    with ReviewDB(review_db_url).engine.begin() as connection:  # the tables as the first release made them
        for table, columns in _LATER_COLUMNS.items():
            for name in columns:
                connection.execute(text(f"ALTER TABLE {table} DROP COLUMN {name}"))
    old = {c["name"] for c in inspect(create_engine(review_db_url)).get_columns("verdicts")}  # not upgraded
    assert "operator" not in old and "mask_key" not in old
    _run_replicas(review_db_url)  # every replica adds the missing columns at once
    db = ReviewDB(review_db_url)
    for table, columns in _LATER_COLUMNS.items():
        assert set(columns) <= {c["name"] for c in inspect(db.engine).get_columns(table)}
    _assert_every_row_once(db)
    assert db.get("shared-1")["history"][0]["mask_key"].startswith("k/shared-1/mask-")


def test_text_longer_than_its_column_is_refused_on_every_backend(review_db_url: str) -> None:
    db = ReviewDB(review_db_url)
    record = {"request_id": "r1", "line": LINE, "time": "2026-01-01T00:00:00+00:00", "score": 2.0, "threshold": 1.0,
              "anomalous": True, "width": 8, "height": 8, "image_key": "i", "map_key": "m", "record_key": "r"}
    with pytest.raises(ValueTooLong, match=r"retained.model_version is 129 characters long; .* at most 128"):
        db.add_retained({**record, "model_version": "v" * 129})
    assert db.queue(LINE, kind="all") == []
    db.add_retained(record)
    db.add_retained({**record, "score": 9.0})  # indexed already: left as it is, no error
    assert [(i["request_id"], i["score"], i["anomalous"]) for i in db.queue(LINE, kind="all")] == [("r1", 2.0, True)]
    with pytest.raises(ValueTooLong, match=r"verdicts.by is 200 characters long; .* at most 128: .*nothing was stored"):
        db.add_verdict("r1", "false_alarm", by="x" * 200)
    assert db.get("r1")["history"] == []
    assert db.add_verdict("r1", "false_alarm", by="x" * 128)["by"] == "x" * 128


def test_a_dropped_connection_is_replaced_not_failed(pg_server) -> None:
    url = pg_server.create_database()
    try:
        db = ReviewDB(url)
        assert db.lines() == []
        with db.engine.connect() as connection:  # what a server restart or an idle timeout does to the pool
            pid = connection.execute(text("SELECT pg_backend_pid()")).scalar()
        pg_server._admin(f"SELECT pg_terminate_backend({pid})")
        assert db.lines() == []  # pool_pre_ping: the dead pooled connection is replaced
    finally:
        pg_server.drop_database(url)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wrong_urls_missing_driver_and_unreachable_server_say_what_to_do(pg_server) -> None:
    with pytest.raises(ReviewError, match=r"names no database driver; write it as 'postgresql\+psycopg://ann:\*\*\*@db/"
                                          r"redi'") as caught:
        ReviewDB("postgres://ann:hunter2secret@db/redi")
    assert "hunter2secret" not in str(caught.value)
    with pytest.raises(ReviewError, match=r"names no database driver; write it as 'postgresql\+psycopg://"):
        ReviewDB("postgresql://ann@db/redi")
    with pytest.raises(ReviewError, match=r"driver is not installed \(No module named 'pg8000'\); install it"):
        ReviewDB("postgresql+pg8000://ann@db/redi")
    with pytest.raises(ReviewError, match=r"Connection refused.*check that the server runs and is reachable"):
        ReviewDB(f"postgresql+psycopg://ann:pw@127.0.0.1:{_free_port()}/redi")
    with pytest.raises(ReviewError, match=r'database "no_such_db" does not exist.*the database must exist'):
        ReviewDB(pg_server.url("no_such_db"))
    done = subprocess.run([str(Path(sys.executable).parent / "redi"), "review", "user", "list"], cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "REDI_REVIEW_DB": "postgres://ann@db/redi"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "write it as 'postgresql+psycopg://ann@db/redi'" in done.stderr, done.stderr
