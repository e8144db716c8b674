"""Small helpers shared across the package: devices, seeding, progress."""

from __future__ import annotations

import random
import sys
import time
from typing import Iterable, Iterator, TypeVar

import numpy as np
import torch

T = TypeVar("T")


def pick_device(name: str = "auto") -> torch.device:
    """Return CUDA when asked for 'auto' and present, else the CPU; explicit names are honoured."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so that a run with the same seed repeats."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def format_seconds(seconds: float) -> str:
    """Format a duration as H:MM:SS for progress lines."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress(items: Iterable[T], total: int, label: str, every: int = 1, stream=sys.stderr) -> Iterator[T]:
    """Yield items while printing 'label i/total, rate, ETA' lines (plain text, log friendly)."""
    start = time.perf_counter()
    for index, item in enumerate(items, start=1):
        yield item
        if index % every == 0 or index == total:
            elapsed = time.perf_counter() - start
            rate = index / elapsed if elapsed > 0 else float("inf")
            eta = (total - index) / rate if rate > 0 else 0.0
            print(f"{label} {index}/{total}  {rate:.1f}/s  ETA {format_seconds(eta)}", file=stream, flush=True)
