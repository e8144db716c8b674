"""Serving overhead: throughput and p50/p99 latency of a running ``bentoml serve`` vs in-process batches.

    python bench/bench_serving.py --model runs/demo/detector.pt --line bottle_caps \
        --url http://127.0.0.1:3000 --images data/demo/bottle_caps/test/good [--api-key KEY]

Start the service first (same machine, loopback only). The in-process figure runs the same
detector file on the same images in batches of ``--batch-size``; the ratio of the two
throughputs is the serving overhead (decode, HTTP, batching, feature row, durable log). The
run is bounded by ``--requests`` and ``--max-seconds``. Writes a markdown table to
``docs/bench_serving.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import platform
import time
from pathlib import Path

import numpy as np
import requests
import torch

from redi.images import load_rgb
from redi.models.detector import load_detector


def in_process(model: Path, images: list[Path], batch_size: int, repeats: int) -> float:
    """Images per second of load -> preprocess -> predict in batches, in this process."""
    detector = load_detector(model)
    rgbs = [load_rgb(p) for p in images]
    detector.predict(detector.preprocess(rgbs[:batch_size]))  # warm-up
    started, done = time.perf_counter(), 0
    for _ in range(repeats):
        for begin in range(0, len(rgbs), batch_size):
            with torch.inference_mode():
                detector.predict(detector.preprocess(rgbs[begin:begin + batch_size]))
            done += len(rgbs[begin:begin + batch_size])
    return done / (time.perf_counter() - started)


def served(url: str, line: str, images: list[Path], n_requests: int, clients: int, key: str | None,
           max_seconds: float) -> tuple[float, np.ndarray, int]:
    """(requests per second, latencies in ms, non-200 count) of concurrent /predict calls."""
    payloads = [p.read_bytes() for p in images]
    headers = {"X-API-Key": key} if key else {}
    deadline = time.monotonic() + max_seconds

    def call(i: int) -> tuple[float, int]:
        if time.monotonic() > deadline:
            return float("nan"), -1
        begin = time.perf_counter()
        response = requests.post(f"{url}/predict", files={"image": ("x.png", payloads[i % len(payloads)])},
                                 data={"line": line, "return_regions": "false"}, headers=headers, timeout=120)
        return (time.perf_counter() - begin) * 1000.0, response.status_code

    call(0)  # warm-up
    started = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(call, range(n_requests)))
    seconds = time.perf_counter() - started
    done = [(ms, status) for ms, status in results if status != -1]
    latencies = np.array([ms for ms, status in done if status == 200])
    return len(latencies) / seconds, latencies, sum(1 for _, status in done if status != 200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the detector.pt the service serves for --line")
    parser.add_argument("--line", required=True)
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--images", required=True, help="folder of images of the line")
    parser.add_argument("--api-key")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--out", default="docs/bench_serving.md")
    args = parser.parse_args()
    if not args.url.startswith(("http://127.0.0.1", "http://localhost")):
        parser.error("the benchmark runs on loopback only: --url must be http://127.0.0.1:PORT")
    images = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not images:
        parser.error(f"no images in {args.images}")
    local = in_process(Path(args.model), images, args.batch_size, repeats=max(1, 64 // len(images)))
    rate, latencies, failures = served(args.url, args.line, images, args.requests, args.clients, args.api_key,
                                       args.max_seconds)
    p50, p99 = (np.percentile(latencies, [50, 99]) if latencies.size else (float("nan"),) * 2)
    table = "\n".join([
        "# Serving benchmark", "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU'}; line `{args.line}`, {len(images)} distinct images, "
        f"{args.clients} concurrent clients on loopback. Produced by `bench/bench_serving.py`.", "",
        "| path | images/s | p50 latency ms | p99 latency ms | failed requests |",
        "|---|---|---|---|---|",
        f"| in-process batches of {args.batch_size} | {local:.2f} | - | - | - |",
        f"| `bentoml serve` /predict ({latencies.size} requests) | {rate:.2f} | {p50:.1f} | {p99:.1f} | {failures} |",
        "", f"Serving overhead (in-process / served throughput): **{local / rate:.2f}x**" if rate else "", ""])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
