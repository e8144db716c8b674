"""Inference cost of each candidate of a fitted line, side by side in one run (issue 17):
ms per image at a batch size, median of repeats, the same random-free input for every candidate.

    python bench/bench_candidates.py runs/caps --threads 2 --batch 8 --repeats 5
    python bench/bench_candidates.py runs/strip_squash/s0_grid runs/strip_native/s0_grid   # two canvases

Each run folder is a ``redi train`` run with candidates (``candidates/<name>/detector.pt``); several
runs are timed in one process, side by side. Every detector gets input at its own ``input_hw``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from redi.methods.base import load_detector


def time_candidate(path: Path, batch: int, repeats: int) -> tuple[float, int, tuple[int, int]]:
    detector = load_detector(path)
    height, width = detector.input_hw
    x = torch.linspace(0, 1, batch * 3 * height * width).reshape(batch, 3, height, width)  # speed does not depend on pixels
    detector.predict(x)  # warm-up: allocations, kernel choice
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        detector.predict(x)
        times.append(time.perf_counter() - started)
    bank = getattr(detector, "memory_bank", None)
    return 1000 * statistics.median(times) / batch, (0 if bank is None else int(bank.shape[0])), (height, width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"Machine: {platform.machine()}, {args.threads} torch threads, torch {torch.__version__}, batch {args.batch}, "
          f"median of {args.repeats}")
    print("\n| run | candidate | input (h x w) | memory bank rows | ms / image | images / s |\n"
          "|---|---|---|---:|---:|---:|")
    for run in args.runs:
        for path in sorted((run / "candidates").glob("*/detector.pt")):
            ms, bank, (height, width) = time_candidate(path, args.batch, args.repeats)
            print(f"| {run} | {path.parent.name} | {height} x {width} | {bank or '-'} | {ms:.1f} | {1000 / ms:.1f} |")


if __name__ == "__main__":
    main()
