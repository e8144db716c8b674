"""The production log on a real full filesystem: a small tmpfs is mounted, filled, and rows are
written while it is full (some commits fail with ENOSPC, some after a short write), then space
returns and more rows are written. Every row whose commit succeeded must read back, no row whose
commit failed may be in the file (its client was told "not logged" and may retry), and every line
of the file must be one whole row (no fragment, nothing glued).

Mounting needs root (or CAP_SYS_ADMIN); elsewhere the test is skipped and says why.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from redi.ops.monitoring import ProductionLog

LINE = "bottle_caps"
FS_BYTES = 256 * 1024
ROW_PAD = "p" * 700  # rows of ~800 bytes: commits of 1-8 rows do not end on page boundaries


@pytest.fixture()
def small_fs(tmp_path: Path):
    """A 256 KiB tmpfs mounted at a fresh folder, unmounted afterwards."""
    mount_point = tmp_path / "small_fs"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(folder: Path, leave: int) -> Path:
    """Write a filler file until the filesystem is full, then give ``leave`` bytes back."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        block = b"\0" * 4096
        while True:
            try:
                if os.write(fd, block) < len(block):
                    break
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)
    return filler


def write_burst(log: ProductionLog, first: int, count: int) -> tuple[list[str], list[str]]:
    """``count`` rows from 8 threads (group commits of several rows); returns (acknowledged, failed) ids."""
    def one(i: int) -> tuple[str, bool]:
        request_id = f"r{i:04d}"
        try:
            log.append({"line": LINE, "request_id": request_id, "pad": ROW_PAD})
            return request_id, True
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            return request_id, False

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(first, first + count)))
    return [r for r, ok in results if ok], [r for r, ok in results if not ok]


def test_full_disk_loses_no_acknowledged_row(small_fs: Path) -> None:
    log = ProductionLog(small_fs / "logs")
    acknowledged, _ = write_burst(log, 0, 8)  # day file exists before the disk fills
    assert len(acknowledged) == 8
    filler = fill(small_fs, leave=6 * 1024)

    failed: list[str] = []
    for burst in range(12):  # the disk is full: some commits fit in what is left, the rest fail
        ok, bad = write_burst(log, 100 + 20 * burst, 20)
        acknowledged += ok
        failed += bad
    assert failed, "the filesystem never filled up: the test did not exercise a full disk"
    assert len(acknowledged) > 8, "no commit fitted on the nearly full disk"

    filler.unlink()  # space returns
    ok, bad = write_burst(log, 1000, 40)
    assert bad == [] and len(ok) == 40
    acknowledged += ok

    read_back = list(log.read(LINE)["request_id"])
    lost = sorted(set(acknowledged) - set(read_back))
    assert lost == [], f"{len(lost)} of {len(acknowledged)} acknowledged rows lost: {lost[:10]}"
    (path,) = log.files(LINE)
    raw_lines = path.read_bytes().splitlines(keepends=True)
    whole = [json.loads(raw) for raw in raw_lines]  # every line is one whole row: nothing glued to a fragment
    assert all(raw.endswith(b"\n") for raw in raw_lines)
    on_disk = [row["request_id"] for row in whole]
    assert sorted(set(failed) & set(on_disk)) == [], "rows of failed commits must not stay in the log"
    assert sorted(on_disk) == sorted(read_back) == sorted(acknowledged)  # each exactly once
