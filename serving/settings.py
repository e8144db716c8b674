"""Settings shared by the API service and the detector service, read from the environment.

Also the measured CPU budget: how many cores this process may use (its CPU affinity, capped by a
cgroup CPU quota when one is set), from which the detector service takes its torch threads.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from redi.errors import RediError

RUNTIMES = ("torch", "onnx")


def env_int(name: str, default: int) -> int:
    """A positive integer setting from the environment, with a clear error for a bad value."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(float(raw))
    except ValueError as exc:
        raise RediError(f"environment variable {name}={raw!r} is not a number; unset it or give an integer") from exc
    if value <= 0:
        raise RediError(f"environment variable {name}={raw!r} must be positive")
    return value


def _cgroup_cpu_limit(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """The cgroup v2 CPU quota in cores (``cpu.max``: ``quota period``), or None when unlimited/absent."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return float(quota) / float(period)
    except (ValueError, ZeroDivisionError):
        return None


def usable_cpus() -> int:
    """Cores this process may run on: its affinity mask (not ``os.cpu_count()``, which counts the
    host's cores even inside a container or a ``taskset``), capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def detector_threads() -> int:
    """Torch intra-op threads of a detector worker: ``REDI_TORCH_THREADS``, else every usable core.

    Why every core: the detector batch is the only CPU-heavy step and BentoML's batching keeps it
    busy; the API service's per-request work (multipart parse, PNG decode, resize, JSON, log) runs
    while the detector waits for its next batch and in the gaps of its OpenMP regions. The
    benchmark (docs/benchmarks.md) measured the alternatives.
    """
    return env_int("REDI_TORCH_THREADS", usable_cpus())


@dataclass
class ServingSettings:
    """The services' settings, read from the environment (see ``serving/service.py``'s docstring)."""

    lines: list[str] = field(default_factory=list)
    api_key: str = ""
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    log_dir: Path = Path("production_logs")
    device: str = "auto"
    model_source: str = "auto"
    reload_interval_s: float = 30.0
    model_cache: Path | None = None
    runtime: str = "torch"

    @classmethod
    def from_env(cls) -> "ServingSettings":
        """Read every ``REDI_*`` setting."""
        interval = os.environ.get("REDI_RELOAD_INTERVAL_S", "").strip()
        try:
            reload_interval_s = float(interval) if interval else 30.0
        except ValueError as exc:
            raise RediError(f"REDI_RELOAD_INTERVAL_S={interval!r} is not a number of seconds (0 turns polling "
                            f"off)") from exc
        runtime = os.environ.get("REDI_RUNTIME", "torch").strip().lower() or "torch"
        if runtime not in RUNTIMES:
            raise RediError(f"REDI_RUNTIME={runtime!r} is not one of {RUNTIMES}")
        cache = os.environ.get("REDI_MODEL_CACHE", "").strip()
        return cls(
            lines=[x.strip() for x in os.environ.get("REDI_LINES", "").split(",") if x.strip()],
            api_key=os.environ.get("REDI_API_KEY", ""),
            max_upload_bytes=env_int("REDI_MAX_UPLOAD_BYTES", 20 * 1024 * 1024),
            max_pixels=env_int("REDI_MAX_PIXELS", 40_000_000),
            log_dir=Path(os.environ.get("REDI_LOG_DIR", "production_logs")),
            device=os.environ.get("REDI_DEVICE", "auto"),
            model_source=os.environ.get("REDI_MODEL_SOURCE", "auto").strip() or "auto",
            reload_interval_s=max(0.0, reload_interval_s),
            model_cache=Path(cache) if cache else None,
            runtime=runtime,
        )


__all__ = ["RUNTIMES", "ServingSettings", "detector_threads", "env_int", "usable_cpus"]
