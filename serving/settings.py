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
from typing import Any, Mapping

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


# Every route but the upload routes takes at most this many body bytes (review forms, JSON of a few
# fields): a public form cannot be used to spool megabytes to disk.
FORM_BODY_BYTES = 64 * 1024
MULTIPART_SLACK = 64 * 1024  # form boundaries and fields around an uploaded file
DEFAULT_MAX_PIXELS = 5120 * 5120  # a 26 MP camera frame; about 10 bytes per pixel while a request runs
MIN_API_KEY_LENGTH = 16
# keys from examples and defaults: anyone who read the docs knows them
KNOWN_EXAMPLE_KEYS = frozenset({"change-me", "changeme", "change_me", "secret", "password", "api-key", "apikey",
                                "test", "redi", "admin", "default", "example"})
OPEN_MODE_WARNING = ("REDI_OPEN_MODE=1: this service runs WITHOUT an API key; anyone who reaches its port can "
                     "score images, reload models and record review verdicts that become training data")


def env_flag(name: str, env: Mapping[str, str] | None = None) -> bool:
    """An on/off setting: 1/true/yes/on, or 0/false/no/off/unset; anything else is an error."""
    raw = (os.environ if env is None else env).get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise RediError(f"{name}={raw!r}: use 1 or 0")


def env_seconds(name: str, default: float, env: Mapping[str, str] | None = None) -> float:
    """A non-negative number of seconds from the environment, with a clear error for a bad value."""
    raw = (os.environ if env is None else env).get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise RediError(f"environment variable {name}={raw!r} is not a number of seconds") from exc
    if value < 0 or math.isnan(value):
        raise RediError(f"environment variable {name}={raw!r} must be at least 0")
    return value


def api_key_problem(api_key: str, open_mode: bool) -> str | None:
    """Why the service must not start with this key / open-mode pair, or None when it may.

    No key needs an explicit ``REDI_OPEN_MODE=1`` (an unset variable must not open the service);
    a key from the docs' examples or a short one is refused (anyone could guess it).
    """
    key = api_key.strip()
    if not key:
        if open_mode:
            return None
        return ("REDI_API_KEY is not set: refusing to start an open service (anyone could reload models and record "
                "verdicts that become training data). Set REDI_API_KEY to a random key of at least "
                f"{MIN_API_KEY_LENGTH} characters (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
                ", or set REDI_OPEN_MODE=1 to run without a key on purpose (a closed test bench only)")
    if open_mode:
        return "REDI_OPEN_MODE=1 and REDI_API_KEY are both set; unset one of them (open mode means no key)"
    if key.lower() in KNOWN_EXAMPLE_KEYS:
        return (f"REDI_API_KEY={key!r} is an example key from the documentation, which anyone can read; set a random "
                f"key of at least {MIN_API_KEY_LENGTH} characters")
    if len(key) < MIN_API_KEY_LENGTH:
        return (f"REDI_API_KEY is {len(key)} characters long; a key needs at least {MIN_API_KEY_LENGTH} (a short key "
                f"can be guessed): e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return None


@dataclass
class ServingSettings:
    """The services' settings, read from the environment (see ``serving/service.py``'s docstring)."""

    lines: list[str] = field(default_factory=list)
    api_key: str = ""
    open_mode: bool = False
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    log_dir: Path = Path("production_logs")
    device: str = "auto"
    model_source: str = "auto"
    reload_interval_s: float = 30.0
    model_cache: Path | None = None
    runtime: str = "torch"
    store_timeout_s: float = 5.0
    shadow_queue: int = 32  # shadow mode: requests waiting for the candidate; beyond it they are dropped
    shadow_queue_bytes: int = 128 * 1024 * 1024  # decoded images those requests may hold
    shadow_rate: float = 1.0  # share of answered requests offered to the candidate (bounds its CPU share)

    @property
    def max_body_bytes(self) -> int:
        """The largest request body of an upload route (``/predict``): the file plus the form around it."""
        return self.max_upload_bytes + MULTIPART_SLACK

    def body_limit(self, path: str) -> int:
        """The largest request body accepted on ``path``: uploads on ``/predict``, a small form elsewhere."""
        return self.max_body_bytes if path.rstrip("/") == "/predict" else FORM_BODY_BYTES

    @classmethod
    def from_env(cls) -> "ServingSettings":
        """Read every ``REDI_*`` setting."""
        runtime = os.environ.get("REDI_RUNTIME", "torch").strip().lower() or "torch"
        if runtime not in RUNTIMES:
            raise RediError(f"REDI_RUNTIME={runtime!r} is not one of {RUNTIMES}")
        cache = os.environ.get("REDI_MODEL_CACHE", "").strip()
        store_timeout_s = env_seconds("REDI_STORE_TIMEOUT_S", 5.0)
        if store_timeout_s <= 0:
            raise RediError("REDI_STORE_TIMEOUT_S must be more than 0 seconds (a hung store must not hang requests)")
        return cls(
            lines=[x.strip() for x in os.environ.get("REDI_LINES", "").split(",") if x.strip()],
            api_key=os.environ.get("REDI_API_KEY", ""),
            open_mode=env_flag("REDI_OPEN_MODE"),
            max_upload_bytes=env_int("REDI_MAX_UPLOAD_BYTES", 20 * 1024 * 1024),
            max_pixels=env_int("REDI_MAX_PIXELS", DEFAULT_MAX_PIXELS),
            log_dir=Path(os.environ.get("REDI_LOG_DIR", "production_logs")),
            device=os.environ.get("REDI_DEVICE", "auto"),
            model_source=os.environ.get("REDI_MODEL_SOURCE", "auto").strip() or "auto",
            reload_interval_s=env_seconds("REDI_RELOAD_INTERVAL_S", 30.0),
            model_cache=Path(cache) if cache else None,
            runtime=runtime,
            store_timeout_s=store_timeout_s,
            shadow_queue=max(1, env_int("REDI_SHADOW_QUEUE", 32)),
            shadow_queue_bytes=env_int("REDI_SHADOW_QUEUE_BYTES", 128 * 1024 * 1024),
            shadow_rate=_rate("REDI_SHADOW_RATE", 1.0),
        )


def _rate(name: str, default: float) -> float:
    """A share in [0, 1] from the environment; a bad value stops the service with the reason."""
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError as exc:
        raise RediError(f"{name}={raw!r} is not a number; give a share in [0, 1], e.g. 0.25") from exc
    if not 0.0 <= value <= 1.0:
        raise RediError(f"{name}={raw} must lie in [0, 1] (the share of requests), e.g. 0.25")
    return value


def serving_store(settings: ServingSettings, env: Mapping[str, str] | None = None, patient: bool = False) -> Any:
    """The configured object store for the services, or None when none is configured.

    Built without a round trip, so a hung store cannot stop the service from starting. Unlike the
    command line's store, it never waits long: every S3 call gets ``REDI_STORE_TIMEOUT_S`` to connect
    and to read, and one retry (minio's own default waits up to 300 s per attempt, 5 retries), so a
    hung store cannot hold a request for minutes. ``patient``: minio's own timeouts, for background
    work that no request waits for (the upload of kept images: a short outage delays a copy
    instead of losing it).
    """
    from redi.ops.object_store import store_from_env

    env = os.environ if env is None else env
    if not (env.get("REDI_S3_ENDPOINT", "").strip() or env.get("REDI_STORE_DIR", "").strip()):
        return None
    if not env.get("REDI_S3_ENDPOINT", "").strip():
        return store_from_env(env)
    if patient:
        return store_from_env(env, check_bucket=False)
    import certifi
    import urllib3

    timeout = settings.store_timeout_s
    client = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=min(timeout, 2.0), read=timeout), maxsize=10,
        cert_reqs="CERT_REQUIRED", ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=1, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]))
    return store_from_env(env, http_client=client, check_bucket=False)


__all__ = ["DEFAULT_MAX_PIXELS", "FORM_BODY_BYTES", "MIN_API_KEY_LENGTH", "MULTIPART_SLACK", "OPEN_MODE_WARNING",
           "RUNTIMES", "ServingSettings", "api_key_problem", "bump_generation", "detector_threads", "detector_workers",
           "env_flag", "env_int", "env_seconds", "has_gpu", "model_cache", "read_generation", "reload_generation_file",
           "serving_store", "usable_cpus"]
