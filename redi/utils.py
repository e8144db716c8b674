"""Small helpers shared across the package: devices, seeding, progress."""

from __future__ import annotations

import hashlib
import random
import sys
import time
from typing import Iterable, Iterator, TypeVar

import numpy as np
import torch

T = TypeVar("T")


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_torch_save(payload, path) -> None:
    """torch.save through a temporary file and a rename: a kill never leaves a half-written file."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def atomic_write_text(path, text: str) -> None:
    """Write a text file through a temporary file and a rename: readers never see half a file."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def load_torch_file(path, what: str, fix: str):
    """torch.load a stage's file; a missing or unreadable file is a WeightsError naming ``fix``."""
    from pathlib import Path

    from redi.errors import WeightsError

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} {path} does not exist; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise WeightsError(f"{what} {path} cannot be read ({exc}): it is corrupt or not a redi file; {fix}") from exc


def pick_device(name: str = "auto") -> torch.device:
    """Return CUDA when asked for 'auto' and present, else the CPU; explicit names are honoured."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether a module should run under bf16 autocast: 'auto' picks it on CUDA and on CPUs with
    bf16 matrix units (AMX or AVX512-BF16), where it is several times faster than fp32."""
    if precision == "bf16":
        return True
    if precision != "auto":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return False


def bf16_autocast(enabled: bool, device: torch.device):
    """A bf16 autocast context for the device (a no-op context when disabled)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


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
