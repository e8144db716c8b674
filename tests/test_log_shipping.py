"""Production-log shipping to the object store: per-host segments, crash-safe, outage-tolerant.

Against the real S3 server (seaweedfs, ``tests/s3_server.py``): a shipper killed with SIGKILL at the
worst moments (right before and right after an upload, before its offset moved) and at a random
moment, then restarted, leaves every row in the store exactly once; with the server stopped
(SIGSTOP) rows stay local and ship once it runs again; two shippers of one host never ship twice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from redi.core.errors import ConfigError
from redi.ops.log_shipping import (LogShipper, ShippingSettings, list_segments, parse_segment_key, segment_key)
from redi.ops.monitoring import ProductionLog, read_store_rows
from redi.ops.object_store import LocalStore, store_from_env

REPO = Path(__file__).resolve().parents[1]
LINE = "bottle_caps"


def _rows(n: int, tag: str = "") -> list[dict]:
    """Rows shaped like the service's (a request id, a payload of a few hundred bytes)."""
    return [{"line": LINE, "request_id": uuid.uuid4().hex, "model_version": "v1", "tag": tag, "i": i,
             **{f"emb_{k}": 0.001 * (i + k) for k in range(8)}} for i in range(n)]


def _stored_rows(store, line: str = LINE) -> list[dict]:
    """Every row of every segment, duplicates included (the reader's de-duplication is not used)."""
    rows = []
    for segment in list_segments(store, line):
        rows += [json.loads(raw) for raw in store.get_bytes(segment.key).splitlines() if raw.strip()]
    return rows


def _contiguous(store, host: str) -> None:
    """One host's segments of a day cover its file from 0 without gap or overlap."""
    segments = [s for s in list_segments(store, LINE) if s.host == host]
    assert segments and segments[0].start == 0
    for before, after in zip(segments, segments[1:]):
        assert after.start == before.end, (before.key, after.key)


def _s3_store(server, **options):
    return store_from_env(server.env, **options)


SHIPPER = textwrap.dedent("""
    import os, signal, sys, time
    from redi.ops.log_shipping import LogShipper
    from redi.ops.object_store import store_from_env
    log_dir, host, crash_at, when = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    store = store_from_env()
    put = store.put_bytes
    count = [0]
    def crashing_put(key, data):  # SIGKILL at the crash_at-th upload, just before or just after it
        count[0] += 1
        if count[0] == crash_at and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        put(key, data)
        if count[0] == crash_at and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
    store.put_bytes = crashing_put
    shipper = LogShipper(log_dir, store, host, max_segment_bytes=int(os.environ.get("SEGMENT_BYTES", "2000")))
    while True:
        shipped = shipper.ship_once()
        if shipper.last_error:
            sys.exit("shipping failed: " + shipper.last_error)
        if shipped is None:  # another shipper of this host holds the lock
            time.sleep(0.01)
        elif shipped == 0:
            if when != "loop":
                break
            time.sleep(0.05)
""")


def _run_shipper(log_dir: Path, host: str, crash_at: int = 0, when: str = "never",
                 env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", SHIPPER, str(log_dir), host, str(crash_at), when], env=env,
                            stderr=subprocess.PIPE)


@pytest.mark.parametrize("when", ["before", "after"])
def test_sigkill_around_an_upload_then_restart_loses_and_duplicates_nothing(s3_env, tmp_path, when):
    rows = _rows(120)
    ProductionLog(tmp_path / "logs").append_many(rows)
    crashed = _run_shipper(tmp_path / "logs", "host-a", crash_at=5, when=when)
    assert crashed.wait(60) == -signal.SIGKILL, crashed.stderr.read().decode()
    state = json.loads(next((tmp_path / "logs" / ".shipping" / LINE).glob("*.json")).read_text())
    assert state["pending"], "the crash must hit the window between recording a range and moving the offset"
    store = _s3_store(s3_env)
    assert len(list_segments(store, LINE)) == (5 if when == "after" else 4)
    finished = _run_shipper(tmp_path / "logs", "host-a")
    assert finished.wait(60) == 0, finished.stderr.read().decode()
    stored = _stored_rows(store)
    assert sorted(r["request_id"] for r in stored) == sorted(r["request_id"] for r in rows)  # each once
    _contiguous(store, "host-a")
    day_file = next((tmp_path / "logs" / LINE).glob("*.jsonl"))
    assert list_segments(store, LINE)[-1].end == day_file.stat().st_size


def test_sigkill_at_a_random_moment_while_rows_keep_coming(s3_env, tmp_path):
    log = ProductionLog(tmp_path / "logs")
    rows = _rows(300)
    log.append_many(rows[:200])
    store = _s3_store(s3_env)
    shipper = _run_shipper(tmp_path / "logs", "host-a", when="loop")
    deadline = time.monotonic() + 60
    while len(list_segments(store, LINE)) < 10:  # mid-shipping: some segments out, most still to go
        assert time.monotonic() < deadline and shipper.poll() is None, shipper.stderr.read().decode()
        time.sleep(0.05)
    log.append_many(rows[200:])  # the service goes on logging
    os.kill(shipper.pid, signal.SIGKILL)
    shipper.wait(30)
    assert len(_stored_rows(store)) < len(rows)
    restarted = _run_shipper(tmp_path / "logs", "host-a")
    assert restarted.wait(120) == 0, restarted.stderr.read().decode()
    stored = _stored_rows(store)
    assert len(stored) == len(rows) and {r["request_id"] for r in stored} == {r["request_id"] for r in rows}
    _contiguous(store, "host-a")


def test_store_down_rows_stay_local_and_ship_when_it_returns(s3_env, tmp_path):
    import urllib3

    # the services' short timeouts, so a pass gives up while the server is stopped instead of waiting
    client = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1.0, read=1.0), retries=urllib3.Retry(total=0))
    store = _s3_store(s3_env, http_client=client)  # creates the bucket, as production's store has one
    log = ProductionLog(tmp_path / "logs", ship_to=store, shipping=ShippingSettings("host-a", 0.5))
    try:
        _ship_through_an_outage(s3_env, store, log)
    finally:
        log.shipper.stop()


def _ship_through_an_outage(s3_env, store, log: ProductionLog) -> None:
    first = _rows(20, "before")
    log.append_many(first)
    _wait_for_rows(store, 20)
    os.kill(s3_env.pid, signal.SIGSTOP)
    try:
        during = _rows(30, "during")
        log.append_many(during)  # the service answers and logs while the store is down
        deadline = time.monotonic() + 30
        while log.shipper.last_error is None:
            assert time.monotonic() < deadline, "no pass noticed the stopped store"
            time.sleep(0.1)
        assert "S3" in log.shipper.last_error or "Timeout" in log.shipper.last_error, log.shipper.last_error
    finally:
        os.kill(s3_env.pid, signal.SIGCONT)
    _wait_for_rows(store, 50)
    stored = _stored_rows(store)
    assert sorted(r["request_id"] for r in stored) == sorted(r["request_id"] for r in first + during)
    deadline = time.monotonic() + 10
    while log.shipper.last_error is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert log.shipper.last_error is None


def _wait_for_rows(store, n: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            count = len(_stored_rows(store))
        except Exception:  # noqa: BLE001 - the server may still be waking up
            count = -1
        if count == n:
            return
        assert count < n, f"{count} rows in the store, expected {n}"
        assert time.monotonic() < deadline, f"{count} of {n} rows shipped after {timeout_s} s"
        time.sleep(0.2)


def test_two_workers_of_one_host_never_ship_twice(s3_env, tmp_path):
    rows = _rows(200)
    ProductionLog(tmp_path / "logs").append_many(rows)
    both = [_run_shipper(tmp_path / "logs", "host-a", env={"SEGMENT_BYTES": "1000"}) for _ in range(2)]
    for proc in both:
        assert proc.wait(120) == 0, proc.stderr.read().decode()
    store = _s3_store(s3_env)
    stored = _stored_rows(store)
    assert len(stored) == len(rows) and len({r["request_id"] for r in stored}) == len(rows)
    _contiguous(store, "host-a")


def test_reader_counts_each_request_once_and_names_the_hosts(tmp_path):
    store = LocalStore(tmp_path / "store")
    a, b = _rows(7, "a"), _rows(5, "b")
    ProductionLog(tmp_path / "a").append_many(a)
    ProductionLog(tmp_path / "b").append_many(b)
    LogShipper(tmp_path / "a", store, "host-a").ship_once()
    LogShipper(tmp_path / "b", store, "host-b").ship_once()
    # a log folder copied to a third host (a restored backup): its rows must not count twice
    shutil.copytree(tmp_path / "a" / LINE, tmp_path / "c" / LINE)
    LogShipper(tmp_path / "c", store, "host-c").ship_once()
    notes: list[str] = []
    frame = read_store_rows(store, LINE, notes=notes)
    assert len(frame) == 12 and frame["request_id"].is_unique
    assert frame.groupby("host").size().to_dict() == {"host-a": 7, "host-b": 5}
    assert "7 duplicate rows" in notes[0] and "3 hosts" in notes[0]


def test_keys_name_line_host_day_and_range():
    key = segment_key(LINE, "pod-7", "2026-12-07", 0, 1234)
    assert key == "production-log/bottle_caps/pod-7/2026-12-07/000000000000000-000000000001234.jsonl"
    segment = parse_segment_key(key)
    assert (segment.line, segment.host, segment.day, segment.start, segment.end) == (LINE, "pod-7", "2026-12-07",
                                                                                      0, 1234)
    assert parse_segment_key("production-log/bottle_caps/pod-7/2026-12-07/notes.txt") is None


def test_settings_refuse_bad_values():
    assert ShippingSettings.from_env({"REDI_HOST_ID": "line-3.pod-a"}).host_id == "line-3.pod-a"
    assert ShippingSettings.from_env({}).host_id  # the hostname
    assert not ShippingSettings.from_env({"REDI_LOG_SHIP_INTERVAL_S": "0"}).enabled
    with pytest.raises(ConfigError, match="REDI_HOST_ID 'a/b'"):
        ShippingSettings.from_env({"REDI_HOST_ID": "a/b"})
    with pytest.raises(ConfigError, match="REDI_LOG_SHIP_INTERVAL_S='soon'"):
        ShippingSettings.from_env({"REDI_LOG_SHIP_INTERVAL_S": "soon"})


def test_reader_reads_newest_days_first_only_as_far_as_it_needs(tmp_path):
    store = LocalStore(tmp_path / "store")
    for day, version in (("2026-12-01", "v0"), ("2026-12-02", "v1"), ("2026-12-03", "v1")):
        rows = [{**row, "time": f"{day}T08:00:{i:02d}+00:00", "model_version": version}
                for i, row in enumerate(_rows(5, day))]
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        store.put_bytes(segment_key(LINE, "host-a", day, 0, len(data)), data)
    notes: list[str] = []
    frame = read_store_rows(store, LINE, last=4, notes=notes)
    assert list(frame["tag"].unique()) == ["2026-12-03"] and len(frame) == 4 and "from 1 segments" in notes[0]
    # rows of another model version do not count towards `last`: the reader goes one day further
    notes = []
    frame = read_store_rows(store, LINE, last=12, notes=notes, keep=lambda r: r["model_version"] == "v1")
    assert len(frame) == 10 and set(frame["tag"]) == {"2026-12-02", "2026-12-03"}
    assert "5 rows of other model versions left out" in notes[0] and "from 3 segments" in notes[0]
    assert frame["time"].is_monotonic_increasing
