"""Cost of shipping production-log rows to the object store and of reading them back (issue 20).

Starts a real S3 server (seaweedfs, ``tests/s3_server.py``), logs rows shaped like the service's,
and times one shipping pass of 10,000 rows, 100 passes of 100 new rows each (a steady trickle) and
``read_store_rows`` over every segment of two hosts:

    .venv/bin/python bench/bench_log_shipping.py
"""

import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_server import start_s3_server  # noqa: E402

from redi.ops.log_shipping import LogShipper  # noqa: E402
from redi.ops.monitoring import ProductionLog, read_store_rows  # noqa: E402
from redi.ops.object_store import store_from_env  # noqa: E402


def rows(n: int) -> list[dict]:
    """``n`` rows with the service row's fields (22, about 500 bytes as JSON)."""
    return [{"line": "L", "request_id": uuid.uuid4().hex, "model_version": "v1", "model_tag": "abc",
             "anomaly_score": 1.23, "decision": "normal", "threshold": 4.4, "latency_ms": 12.3, "width": 128,
             "height": 128, "brightness": 0.5, "contrast": 0.2, "sharpness": 123.4,
             **{f"emb_{k}": 0.0123456789 for k in range(8)}} for _ in range(n)]


def main() -> None:
    """Print the three timings."""
    root = Path(tempfile.mkdtemp())
    with start_s3_server(root / "s3") as s3:
        store = store_from_env(s3.env)
        ProductionLog(root / "logs").append_many(rows(10000))
        size = next((root / "logs" / "L").glob("*.jsonl")).stat().st_size
        shipper = LogShipper(root / "logs", store, "h1")
        start = time.perf_counter()
        segments = shipper.ship_once()
        print(f"one pass, 10000 rows ({size / 1e6:.2f} MB) in {segments} segment(s): "
              f"{time.perf_counter() - start:.3f} s")
        trickle, shipper2, times = ProductionLog(root / "logs2"), LogShipper(root / "logs2", store, "h2"), []
        for _ in range(100):
            trickle.append_many(rows(100))
            start = time.perf_counter()
            shipper2.ship_once()
            times.append(time.perf_counter() - start)
        times.sort()
        print(f"a pass shipping 100 new rows: median {times[50] * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms")
        start = time.perf_counter()
        frame = read_store_rows(store, "L")
        print(f"read_store_rows: {len(frame)} rows from 101 segments of 2 hosts: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
