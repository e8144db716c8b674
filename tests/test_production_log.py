"""ProductionLog's group commit: rows that arrive together share one fsync, and none is acknowledged
before it is on disk."""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
from pathlib import Path

import pytest

from redi.ops.monitoring import ProductionLog

LINE = "bottle_caps"


def test_concurrent_rows_share_fsyncs_and_all_arrive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fsyncs = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    log = ProductionLog(tmp_path)
    start = threading.Barrier(64)

    def write(i: int) -> Path:
        start.wait()
        return log.append({"line": LINE, "request_id": f"r{i}", "score": float(i)})

    with cf.ThreadPoolExecutor(64) as pool:
        paths = list(pool.map(write, range(64)))
    assert len(set(paths)) == 1
    rows = log.read(LINE)
    assert sorted(rows["request_id"]) == sorted(f"r{i}" for i in range(64))
    assert log.rows_committed == 64
    assert len(fsyncs) == log.commits < 64, "group commit must share fsyncs between rows that arrive together"


def test_append_returns_only_after_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        real_fsync(fd)
        synced.set()

    monkeypatch.setattr(os, "fsync", slow_fsync)
    log = ProductionLog(tmp_path)
    future = log.submit({"line": LINE, "request_id": "a"})
    future.result(timeout=10)
    assert synced.is_set()
    assert log.append_many([{"line": LINE, "request_id": "b"}, {"line": LINE, "request_id": "c"}])
    assert list(log.read(LINE)["request_id"]) == ["a", "b", "c"]


def test_unwritable_log_fails_every_waiter_and_recovers(tmp_path: Path) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the log folder should be")
    log = ProductionLog(blocker)
    futures = [log.submit({"line": LINE, "request_id": str(i)}) for i in range(5)]
    for future in futures:
        with pytest.raises(OSError):
            future.result(timeout=10)
    blocker.unlink()
    assert log.append({"line": LINE, "request_id": "after"}).is_file()  # the writer thread lives on
    assert list(log.read(LINE)["request_id"]) == ["after"]


def test_bad_line_name_refused_at_once(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="line"):
        ProductionLog(tmp_path).submit({"line": "../escape", "request_id": "x"})
