"""Shadow mode's cost to production: ``/predict`` latency with and without a shadow candidate, one run.

    python bench/bench_shadow.py --profiles tiny cpu --clients 1 4 --seconds 20 --rounds 2 \
        --out runs/bench/bench_shadow.md

For each profile: a 1-epoch detector on the synthetic demo line (``bench_serving.make_detector``),
published and promoted in a local store, and a candidate of the same cost (the same weights saved
again: another file, another version, so the candidate's compute equals production's, as for a
retrain). One ``bentoml serve`` (as deployed: API key, production log with group commit,
retention off). For each client count C, ``--rounds`` rounds of two phases, alternating so that
drift in the machine's load hits both alike:

- off: no shadow pointer;
- on: the candidate in shadow (``redi model shadow``; the service follows after ``/admin/reload``).

Each phase runs C closed-loop clients for ``--seconds`` (``bench_serving.served``: each sends its
next image as soon as it has an answer, so the CPU is saturated), or, for ``-R``, one client
pacing R requests per second (parts arriving at a line's rate, below saturation), after the shadow
queue has drained. Reported: p50 / p95 latency and answers/s of each condition (pooled
over the rounds) and their ratios, with the shadow rows written and requests dropped by the
bounded queue (``/metadata`` ``shadow``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import (KEY, LINE, REPO, Server, _cpu_name, _pct, make_detector, publish, served,  # noqa: E402
                           wait_for_quiet)


def _candidate(detector: Path, store_dir: Path, work: Path) -> None:
    """Publish the same weights as another version (gate-passed) for the shadow."""
    from redi.methods.base import load_detector, save_detector
    from redi.ops.model_registry import publish_version, version_index
    from redi.ops.object_store import LocalStore

    store = LocalStore(store_dir)
    if version_index(store, LINE, "cand") is None:
        path = save_detector(load_detector(detector, "cpu"), work / "candidate.pt", {"version": "candidate"})
        publish_version(store, LINE, "cand", {"detector.pt": path}, {"promote": True})


def paced(url: str, images: list[bytes], rate: float, seconds: float) -> tuple[float, np.ndarray, int, int]:
    """One client sending a request every ``1/rate`` s (a line's parts arriving; the next one is sent at
    once when an answer came late): (answers/s, latencies ms, failures, 0), like ``served``."""
    session, latencies, failures = requests.Session(), [], 0
    started = time.perf_counter()
    i = 0
    while time.perf_counter() - started < seconds:
        due = started + i / rate
        time.sleep(max(0.0, due - time.perf_counter()))
        begin = time.perf_counter()
        response = session.post(f"{url}/predict", files={"image": ("x.png", images[i % len(images)])},
                                data={"line": LINE, "return_regions": "false"}, headers={"X-API-Key": KEY}, timeout=300)
        if response.status_code == 200:
            latencies.append((time.perf_counter() - begin) * 1000.0)
        else:
            failures += 1
        i += 1
    return len(latencies) / (time.perf_counter() - started), np.array(latencies), failures, 0


def _metadata(url: str) -> dict:
    return requests.post(f"{url}/metadata", json={}, headers={"X-API-Key": KEY}, timeout=120).json()


def _set_shadow(url: str, store_dir: Path, on: bool) -> None:
    """Move the shadow pointer, make the service follow, and wait until its queue is empty."""
    from redi.ops.model_registry import move_shadow
    from redi.ops.object_store import LocalStore

    move_shadow(LocalStore(store_dir), LINE, "cand" if on else None, by="bench", reason="benchmark")
    requests.post(f"{url}/admin/reload", json={}, headers={"X-API-Key": KEY}, timeout=300)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        shadow = _metadata(url)["shadow"]
        if shadow["lines"] == ({LINE: "cand"} if on else {}) and shadow["queued"] == 0:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the service did not follow the shadow pointer (on={on}): {shadow}")


def measure(profile: str, work: Path, clients: list[int], seconds: float, rounds: int) -> list[dict]:
    detector, images = make_detector(profile, work)
    store_dir = work / profile / "store"
    publish(detector, store_dir)
    _candidate(detector, store_dir, work / profile)
    server = Server(work / profile, store_dir, "torch", {"REDI_RELOAD_INTERVAL_S": "0"})
    rows = []
    try:
        for c in clients:
            lat: dict[bool, list[np.ndarray]] = {False: [], True: []}
            rate: dict[bool, list[float]] = {False: [], True: []}
            before = _metadata(server.url)["shadow"]
            loads = []
            for _ in range(rounds):
                for on in (False, True):
                    _set_shadow(server.url, store_dir, on)
                    loads.append(wait_for_quiet(max_wait_s=30.0))
                    per_s, latencies, failures, _ = (served(server.url, images, c, seconds) if c > 0 else
                                                     paced(server.url, images, -c, seconds))
                    if failures:
                        raise RuntimeError(f"{failures} failed requests (profile {profile}, {c} clients, shadow {on})")
                    lat[on].append(latencies)
                    rate[on].append(per_s)
            _set_shadow(server.url, store_dir, False)
            after = _metadata(server.url)["shadow"]
            off_ms, on_ms = np.concatenate(lat[False]), np.concatenate(lat[True])
            rows.append({"profile": profile, "clients": c, "n_off": off_ms.size, "n_on": on_ms.size,
                         "p50_off": _pct(off_ms, 50), "p50_on": _pct(on_ms, 50), "p95_off": _pct(off_ms, 95),
                         "p95_on": _pct(on_ms, 95), "rps_off": float(np.mean(rate[False])),
                         "rps_on": float(np.mean(rate[True])),
                         "scored": (after["agree"] + after["disagree"]) - (before["agree"] + before["disagree"]),
                         "dropped": after["dropped"] - before["dropped"], "failed": after["failed"] - before["failed"],
                         "load": max(loads)})
            print(rows[-1], flush=True)
    finally:
        server.stop()
    return rows


def table(rows: list[dict]) -> str:
    head = ("| profile | clients | p50 off ms | p50 on ms | p50 on/off | p95 off ms | p95 on ms | p95 on/off | "
            "answers/s off | answers/s on | requests off / on | shadow scored | dropped | failed | load avg |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        who = f"paced {-r['clients']}/s" if r["clients"] < 0 else str(r["clients"])
        lines.append(f"| {r['profile']} | {who} | {r['p50_off']:.1f} | {r['p50_on']:.1f} | "
                     f"{r['p50_on'] / r['p50_off']:.2f} | {r['p95_off']:.1f} | {r['p95_on']:.1f} | "
                     f"{r['p95_on'] / r['p95_off']:.2f} | {r['rps_off']:.2f} | {r['rps_on']:.2f} | "
                     f"{r['n_off']} / {r['n_on']} | {r['scored']} | {r['dropped']} | {r['failed']} | {r['load']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", nargs="+", default=["tiny", "cpu"])
    parser.add_argument("--clients", nargs="+", type=int, default=[-5, 1, 4],
                        help="closed-loop clients; a negative -R: one client pacing R requests/s (a line's rate)")
    parser.add_argument("--seconds", type=float, default=20.0, help="per phase")
    parser.add_argument("--rounds", type=int, default=2, help="off/on rounds per client count")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--out", default="runs/bench/bench_shadow.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        rows = [row for profile in args.profiles
                for row in measure(profile, work, args.clients, args.seconds, args.rounds)]
    text = (f"CPU: {_cpu_name()}; {args.rounds} rounds of off/on, {args.seconds:g} s each\n\n{table(rows)}\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
