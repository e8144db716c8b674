"""ProductionLog's group commit: rows that arrive together share one fsync, none is acknowledged before it
is on disk, a crashed write's fragment never swallows the next row, and a new day file's name is made durable.
(A real full disk: tests/test_log_full_disk.py.)"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from redi.ops.monitoring import ProductionLog

LINE = "bottle_caps"


def test_concurrent_rows_share_fsyncs_and_all_arrive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fsyncs = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # the day file's; new folders' entries are fsync-ed once each
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


def test_fragment_left_by_a_crash_is_cut_before_the_next_row(tmp_path: Path) -> None:
    log = ProductionLog(tmp_path)
    path = log.append({"line": LINE, "request_id": "before"})
    with open(path, "ab") as handle:  # a writer killed mid-write: half a row, no newline
        handle.write(b'{"line": "bottle_caps", "request_id": "crashed", "sco')
    log.append({"line": LINE, "request_id": "after"})
    lines = path.read_bytes().splitlines(keepends=True)
    assert [json.loads(raw)["request_id"] for raw in lines] == ["before", "after"]  # each line one whole row
    assert all(raw.endswith(b"\n") for raw in lines)
    assert list(log.read(LINE)["request_id"]) == ["before", "after"]


def test_reader_keeps_a_row_glued_after_a_fragment(tmp_path: Path) -> None:
    """Files written before the writer cut fragments hold lines like ``<fragment><whole row>``."""
    log = ProductionLog(tmp_path)
    path = log.path_for(LINE)
    path.parent.mkdir(parents=True)
    rows = [{"line": LINE, "request_id": r, "time": f"2026-01-01T00:00:0{i}+00:00", "extra": {"k": [1, 2]}}
            for i, r in enumerate(["a", "b", "c"])]
    a, b, c = (json.dumps(row).encode() for row in rows)
    path.write_bytes(a + b"\n" + b[:37] + c + b"\n" + b"7\n" + b"\n")  # b cut short, c glued onto it
    assert list(log.read(LINE)["request_id"]) == ["a", "c"]


def test_new_day_file_and_folder_entries_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced_dirs: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            synced_dirs.append((info.st_dev, info.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    log = ProductionLog(tmp_path / "logs")
    path = log.append({"line": LINE, "request_id": "first"})
    inode = lambda p: (p.stat().st_dev, p.stat().st_ino)  # noqa: E731
    assert inode(path.parent) in synced_dirs, "the new day file's directory entry must be fsync-ed"
    assert inode(tmp_path) in synced_dirs and inode(tmp_path / "logs") in synced_dirs  # the new folders' entries
    synced_dirs.clear()
    log.append({"line": LINE, "request_id": "second"})
    assert synced_dirs == []  # an existing day file costs no directory fsync
