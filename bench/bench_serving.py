"""Serving overhead: a running ``bentoml serve`` vs the same detector in-process, side by side in one run.

    python bench/bench_serving.py --profiles tiny cpu --runtimes torch onnx --clients 1 4 16 \
        --seconds 12 --out runs/bench/bench_serving.md

For each profile the script trains a detector on a synthetic demo line (speed does not depend on
training: 1 epoch per stage), publishes and promotes it in a local object store in a work folder,
and for each runtime starts ``bentoml serve serving.service:RediService`` on loopback (the API
service and the detector service, as deployed: API key, production log with group commit, drift
rows, retention off because there is no S3 here). Then for each client count C it measures, in
this order and for ``--seconds`` each:

1. in-process: the same work the service does for an image (PNG bytes -> ``decode_rgb`` ->
   ``preprocess`` -> the detector service's own ``LoadedLine.run``, i.e. the same runtime,
   threads and measured model batch size, "model batch" in the table) in batches of C, in this
   process, no HTTP, no log. C callers can at best be batched together, so a batch of C is the
   in-process ideal; each image's latency is its batch's time.
2. served: C client threads, each sending its next image to ``/predict`` as soon as it got the
   previous answer (keep-alive sessions); throughput = answers / seconds, latency per request.

The two are measured back to back on the same CPU; the client threads run on the same machine
(on 2 cores they take a share of the CPU the server would otherwise have). The 1-minute load
average is read before each profile and written into the table: rerun when others were busy.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from redi.core.images import decode_rgb, preprocess  # noqa: E402
from serving.settings import detector_threads, detector_workers, usable_cpus  # noqa: E402

LINE = "bottle_caps"
KEY = "bench-key-0123456789abcdef"  # the service refuses keys under 16 characters
SESSION_SECRET = "bench-session-secret-0123456789abcdef0123456789"  # the review station signs its cookie with it


@dataclass
class Row:
    """One measured cell."""

    profile: str
    runtime: str
    clients: int
    local_rate: float
    local_p50: float
    local_p99: float
    served_rate: float
    served_p50: float
    served_p99: float
    served_n: int
    failures: int
    max_batch: int
    chunk: int


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "")
    extras = [name for name, flag in (("AMX", "amx_tile"), ("AVX512-BF16", "avx512_bf16")) if flag in flags]
    return f"{fields.get('Model name', '?').strip()} ({', '.join(extras) or 'no bf16 units'}), " \
           f"{fields.get('CPU(s)', '?').strip()} CPUs"


def make_detector(profile: str, work: Path) -> tuple[Path, list[bytes]]:
    """A 1-epoch detector of ``profile`` on a synthetic demo line, and the line's test images as PNG bytes."""
    from redi.core.config import profile_config
    from redi.data.demo import make_demo_line
    from redi.workflow.stages import train_all

    cfg = profile_config(profile)
    size = int(cfg.data.image_size)
    data = work / profile / "data" / LINE
    if not data.is_dir():
        make_demo_line(data, LINE, n_train=10, n_test_good=6, n_test_defect=6, size=size, seed=0)
    detector = work / profile / "run" / "detector.pt"
    if not detector.is_file():
        cfg.train.recover.epochs = cfg.train.discriminate.epochs = 1
        cfg.train.device = "cpu"
        detector = Path(train_all(data, work / profile / "run", cfg, line=LINE)["detector"])
    images = [p.read_bytes() for p in sorted((data / "test").rglob("*.png"))]
    return detector, images


def publish(detector: Path, store_dir: Path) -> None:
    """Put the detector into a local store as the line's production version."""
    from redi.ops.object_store import LocalStore
    from redi.ops.model_registry import production_record, promote, publish_version

    store = LocalStore(store_dir)
    if production_record(store, LINE) is None:
        publish_version(store, LINE, "v1", {"detector.pt": detector}, {"promote": True})
        promote(store, LINE, "v1", by="bench", reason="benchmark")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``bentoml serve`` in its own process group, stopped by that group."""

    def __init__(self, work: Path, store_dir: Path, runtime: str, extra_env: dict[str, str]) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
               "REDI_API_KEY": KEY, "REDI_SESSION_SECRET": SESSION_SECRET, "REDI_LOG_DIR": str(work / "logs" / runtime), "REDI_DEVICE": "cpu",
               "PYTHONPATH": str(REPO), "REDI_STORE_DIR": str(store_dir), "REDI_MODEL_CACHE": str(work / "cache"),
               "REDI_RUNTIME": runtime, "REDI_RETAIN": "off", "REDI_RELOAD_INTERVAL_S": "0", **extra_env}
        self.log = open(work / f"server-{runtime}.log", "w")
        bentoml = Path(sys.executable).parent / "bentoml"
        self.proc = subprocess.Popen([str(bentoml), "serve", "serving.service:RediService", "--host", "127.0.0.1",
                                      "--port", self.url.rsplit(":", 1)[1]], cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600  # an ONNX export of a large model takes a while
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited; see {self.log.name}")
            try:
                if requests.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"bentoml serve did not become ready; see {self.log.name}")

    def stop(self) -> None:
        """Terminate the server (it stops its workers); kill what is left of its process tree."""
        import psutil

        tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        self.proc.terminate()
        _, alive = psutil.wait_procs(tree, timeout=30)
        for process in alive:  # BentoML's workers have process groups of their own
            process.kill()
        self.log.close()


def in_process(served_line, images: list[bytes], clients: int, seconds: float) -> tuple[float, np.ndarray]:
    """(images/s, per-image latencies ms) of decode -> preprocess -> run in batches of ``clients``."""
    size = served_line.detector.image_size

    def batch(start: int) -> None:
        rgbs = [decode_rgb(images[(start + i) % len(images)]) for i in range(clients)]
        served_line.run(preprocess(rgbs, size))

    batch(0)  # warm-up
    latencies, done, started = [], 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        begin = time.perf_counter()
        batch(done)
        latencies.extend([(time.perf_counter() - begin) * 1000.0] * clients)
        done += clients
    return done / (time.perf_counter() - started), np.array(latencies)


def served(url: str, images: list[bytes], clients: int, seconds: float) -> tuple[float, np.ndarray, int, int]:
    """(answers/s, latencies ms, failures, largest batch) of ``clients`` closed-loop clients for ``seconds``."""
    stop = threading.Event()

    def client(seed: int) -> tuple[list[float], int, int]:
        session, latencies, failures, largest, i = requests.Session(), [], 0, 0, seed
        while not stop.is_set():
            begin = time.perf_counter()
            response = session.post(f"{url}/predict", files={"image": ("x.png", images[i % len(images)])},
                                    data={"line": LINE, "return_regions": "false"}, headers={"X-API-Key": KEY},
                                    timeout=300)
            if response.status_code == 200:
                latencies.append((time.perf_counter() - begin) * 1000.0)
                largest = max(largest, int(response.json().get("batch_size", 0)))
            else:
                failures += 1
            i += clients
        return latencies, failures, largest

    requests.post(f"{url}/predict", files={"image": ("x.png", images[0])}, data={"line": LINE},
                  headers={"X-API-Key": KEY}, timeout=300)  # warm-up
    with cf.ThreadPoolExecutor(clients) as pool:
        started = time.perf_counter()
        futures = [pool.submit(client, seed) for seed in range(clients)]
        time.sleep(seconds)
        stop.set()
        results = [f.result() for f in futures]
        elapsed = time.perf_counter() - started  # includes the requests in flight at the stop
    latencies = np.array([ms for lat, _, _ in results for ms in lat])
    return len(latencies) / elapsed, latencies, sum(f for _, f, _ in results), max(b for _, _, b in results)


def wait_for_quiet(limit: float = 1.0, max_wait_s: float = 120.0) -> float:
    """Wait until the 1-minute load average (which still counts our previous measurement) falls
    below ``limit``, at most ``max_wait_s``; returns the load average when measuring starts."""
    deadline = time.monotonic() + max_wait_s
    while os.getloadavg()[0] >= limit and time.monotonic() < deadline:
        time.sleep(5)
    load = os.getloadavg()[0]
    LOADS.append(load)
    return load


LOADS: list[float] = []


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else float("nan")


def measure(profile: str, runtime: str, detector: Path, images: list[bytes], work: Path, clients: list[int],
            seconds: float, extra_env: dict[str, str]) -> list[Row]:
    """Every client count of one profile and runtime, in-process and served back to back."""
    from serving.detector_service import load_line
    from serving.model_source import ModelRef
    from redi.core.utils import sha256_file

    store_dir = work / profile / "store"
    publish(detector, store_dir)
    server = Server(work / profile, store_dir, runtime, extra_env)
    try:
        # the in-process reference gets every core (torch and onnxruntime threads), whatever the server uses
        torch.set_num_threads(usable_cpus())
        ref = ModelRef(line=LINE, version="v1", path=detector, sha256=sha256_file(detector), source="store",
                       tag="bench", metrics={})
        saved = {k: os.environ.get(k) for k in ("REDI_TORCH_THREADS", "REDI_DETECTOR_WORKERS")}
        os.environ.update(REDI_TORCH_THREADS=str(usable_cpus()), REDI_DETECTOR_WORKERS="1")
        try:
            line = load_line(ref, torch.device("cpu"), runtime, work / profile / "cache", None)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        rows = []
        for c in clients:
            wait_for_quiet()
            local_rate, local_lat = in_process(line, images, c, seconds)
            rate, lat, failures, largest = served(server.url, images, c, seconds)
            rows.append(Row(profile, runtime, c, local_rate, _pct(local_lat, 50), _pct(local_lat, 99), rate,
                            _pct(lat, 50), _pct(lat, 99), int(lat.size), failures, largest, line.chunk))
            print(f"{profile} {runtime} clients {c}: in-process {local_rate:.2f}/s, served {rate:.2f}/s "
                  f"({100 * rate / local_rate:.0f} %), p50 {_pct(lat, 50):.0f} ms, p99 {_pct(lat, 99):.0f} ms, "
                  f"batch <= {largest}, failures {failures}", flush=True)
        return rows
    finally:
        server.stop()


def table(rows: list[Row], header: list[str]) -> str:
    """The markdown report."""
    lines = [*header, "",
             "| profile | runtime | clients | in-process images/s | in-process p50 / p99 ms | served images/s | "
             "served / in-process | served p50 / p99 ms | largest batch | model batch | requests | failed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.profile} | {r.runtime} | {r.clients} | {r.local_rate:.2f} | {r.local_p50:.0f} / "
                     f"{r.local_p99:.0f} | {r.served_rate:.2f} | {100 * r.served_rate / r.local_rate:.0f} % | "
                     f"{r.served_p50:.0f} / {r.served_p99:.0f} | {r.max_batch} | {r.chunk} | {r.served_n} | {r.failures} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", nargs="+", default=["tiny", "cpu"])
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=20.0, help="per measurement (in-process, served)")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--server-env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra environment of the server, e.g. REDI_TORCH_THREADS=1")
    parser.add_argument("--out", default="runs/bench/bench_serving.md")
    args = parser.parse_args()
    extra_env = dict(item.split("=", 1) for item in args.server_env)
    work = Path(args.work or tempfile.mkdtemp(prefix="redi-bench-serving-"))
    header = ["# Serving benchmark: `bentoml serve` vs in-process, same detector, one run", "",
              f"CPU: {_cpu_name()}; torch {torch.__version__}; {usable_cpus()} usable cores. Server: "
              f"{detector_workers()} detector worker(s) x {detector_threads()} thread(s) (the defaults"
              f"{', server env ' + ' '.join(args.server_env) if args.server_env else ''}); in-process reference: "
              f"{usable_cpus()} threads. {args.seconds:.0f} s per measurement. Produced by "
              f"`bench/bench_serving.py`.", ""]
    rows: list[Row] = []
    for profile in args.profiles:
        detector, images = make_detector(profile, work)
        LOADS.clear()
        for runtime in args.runtimes:
            rows.extend(measure(profile, runtime, detector, images, work, args.clients, args.seconds, extra_env))
        header.append(f"- `{profile}`: {len(images)} distinct {decode_rgb(images[0]).shape[0]} px images; 1-minute "
                      f"load average before each measurement {min(LOADS):.2f}-{max(LOADS):.2f} (it still counts "
                      f"the previous measurement: the script waits for < 1.0, at most 2 min)")
    report = table(rows, header)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
