"""Settings shared by the API service and the detector service, read from the environment.

Also the measured CPU budget: how many cores this process may use (its CPU affinity, capped by a
cgroup CPU quota when one is set), from which the detector service takes its torch threads.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from redi.core.errors import RediError

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


def has_gpu() -> bool:
    """Whether the detector service runs on a GPU (torch sees one and ``REDI_DEVICE`` is not cpu)."""
    if os.environ.get("REDI_DEVICE", "auto").strip().lower() == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def detector_workers() -> int:
    """Detector service processes: ``REDI_DETECTOR_WORKERS``, else 1 on a GPU and one per usable core on the CPU.

    Why one single-threaded worker per core on the CPU (measured, docs/benchmarks.md): a server
    process shares its cores with its event loop, the HTTP parsing and the API service; an OpenMP
    team of several threads waits at every barrier for whichever of its threads was preempted, so
    one 2-thread worker reached 69-81 % of the in-process throughput of the same model with 16
    clients, two 1-thread workers 98-102 %. The cost: each worker holds every model, and one image
    alone is scored by one core.
    """
    return env_int("REDI_DETECTOR_WORKERS", 1 if has_gpu() else usable_cpus())


def detector_threads() -> int:
    """Torch intra-op threads of a detector worker: ``REDI_TORCH_THREADS``, else the usable cores
    shared out between the workers (1 each with the default worker count)."""
    return env_int("REDI_TORCH_THREADS", max(1, usable_cpus() // detector_workers()))


def model_cache(settings: "ServingSettings") -> Path:
    """The folder of downloaded models and ONNX exports (``REDI_MODEL_CACHE``, else a temp folder)."""
    import tempfile

    return settings.model_cache or Path(tempfile.gettempdir()) / "redi-model-cache"


def reload_generation_file(settings: "ServingSettings") -> Path:
    """The file whose content changes at every ``/admin/reload``: how a reload that reaches one
    worker (BentoML sends a request to one) reaches every detector and API worker of the host."""
    return model_cache(settings) / "reload-generation"


def read_generation(path: Path) -> str:
    """The current reload generation ('' before the first reload)."""
    try:
        return path.read_text()
    except OSError:
        return ""


def bump_generation(path: Path) -> str:
    """Start a new reload generation; returns it."""
    generation = f"{time.time_ns()}-{os.getpid()}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(generation)
    os.replace(tmp, path)  # readers see the old or the new value, never half of one
    return generation


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


__all__ = ["RUNTIMES", "ServingSettings", "bump_generation", "detector_threads", "detector_workers", "env_int",
           "has_gpu", "model_cache", "read_generation", "reload_generation_file", "usable_cpus"]
