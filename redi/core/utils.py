"""Small helpers shared across the package: atomic file writes, torch loads, devices, seeding,
progress."""

from __future__ import annotations

import functools
import hashlib
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

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


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write a file through ``write(tmp_path)`` and a rename, so a kill never leaves it half-written.

    The temporary file is unique and sits in the target's folder (a rename is atomic only within
    one file system); it is removed when ``write`` fails. Returns the target path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`); returns the path."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`); returns the path."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.device,
                  torch.Size)


def plain_data(obj, where: str = "payload"):
    """``obj`` as tensors and plain Python data only, which ``torch.load(weights_only=True)`` reads back.

    numpy scalars become Python numbers, numpy arrays tensors, dataclasses dicts, paths strings;
    dicts (``OrderedDict`` and ``Counter`` kept), lists, tuples and sets are converted item by item.

    Raises:
        TypeError: an object of another kind (naming where it sits), which a weights-only load
            would refuse: better to fail when saving than to write a file nobody can load safely.
    """
    import dataclasses
    import enum
    from collections import Counter, OrderedDict

    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, enum.Enum):
        return plain_data(obj.value, where)
    if isinstance(obj, np.generic):  # first: np.float64 is also a float, but pickles as numpy
        return obj.item()
    if isinstance(obj, _PLAIN_SCALARS):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj, copy=True))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain_data(dataclasses.asdict(obj), where)
    if isinstance(obj, dict):
        items = {plain_data(k, f"{where} key"): plain_data(v, f"{where}[{k!r}]") for k, v in obj.items()}
        if type(obj) is Counter:
            return Counter(items)
        if isinstance(obj, OrderedDict):  # a state dict: keep its _metadata (module versions), as torch does
            ordered = OrderedDict(items)
            if getattr(obj, "_metadata", None) is not None:
                ordered._metadata = plain_data(obj._metadata, f"{where}._metadata")  # type: ignore[attr-defined]
            return ordered
        return items
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [plain_data(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items) if isinstance(obj, tuple) else set(items)
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which a weights-only load "
                    f"refuses: store tensors and plain Python data (dict, list, str, numbers) instead")


def atomic_torch_save(payload, path) -> Path:
    """torch.save of :func:`plain_data` ``(payload)`` through a temporary file and a rename: a kill never
    leaves a half-written file, and the file loads weights-only (no pickled code)."""
    plain = plain_data(payload, Path(path).name)
    return atomic_write(path, lambda tmp: _torch_save_to(plain, tmp))


def _torch_save_to(plain, tmp: Path) -> None:
    # through a handle: torch.save to a path names the zip's records after that (random) temporary
    # file, so equal tensors would give files with different bytes (DVC would see a changed output)
    with open(tmp, "wb") as handle:
        torch.save(plain, handle)


UNSAFE_FILE_FIX = ("If the file is your own, written by an earlier redi, convert it once with `redi model "
                   "convert-artifact PATH --trust` (this loads it the old, unsafe way, so only for files you trust); "
                   "otherwise retrain it")


def load_torch_file(path, what: str, fix: str, weights_only: bool = True):
    """torch.load a file onto the CPU, weights-only; a missing or unreadable file is a WeightsError naming ``fix``.

    Only tensors and plain Python data load: a file holding any other pickled object (which could
    run code while loading) is refused with a :class:`~redi.core.errors.WeightsError` that says how
    to convert a trusted old file (:data:`UNSAFE_FILE_FIX`).

    Args:
        path: the file.
        what: how to name it in the message (e.g. "recover checkpoint").
        fix: what the user should do (e.g. "rerun the recover stage").
        weights_only: False only for an explicit, trusted conversion (``redi model convert-artifact``).
    """
    import pickle

    from redi.core.errors import WeightsError

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} {path} does not exist; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        refused = "unsupported global" in str(exc).lower() or "can still be loaded" in str(exc).lower()
        if weights_only and refused:  # an object to unpickle, not a damaged file
            first = next((line.strip() for line in str(exc).splitlines() if "global" in line.lower()), "")
            first = first.split(". Please use")[0].removeprefix("WeightsUnpickler error: ")  # not torch's advice
            raise WeightsError(f"{what} {path} holds pickled Python objects besides tensors and plain data "
                               f"({first or 'not allowed by a weights-only load'}); redi refused to load it, because "
                               f"loading such a file can run any code. "
                               f"{UNSAFE_FILE_FIX.replace('PATH', str(path))}") from None
        raise WeightsError(f"{what} {path} cannot be read ({exc}): it is corrupt or not that kind of file; {fix}") from exc
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise WeightsError(f"{what} {path} cannot be read ({exc}): it is corrupt or not that kind of file; {fix}") from exc


def pick_device(name: str = "auto") -> torch.device:
    """Return CUDA when asked for 'auto' and present, else the CPU; explicit names are honoured."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


BF16_MIN_SPEEDUP = 1.3  # a clear margin, so timing noise cannot flip the choice between runs


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether a module should run under bf16 autocast. 'auto' measures it on the running machine
    (:func:`bf16_speedup`, once per machine and remembered): bf16 when it is clearly faster. CPU flags
    are not enough: AVX512-BF16 without AMX is faster on some CPUs and not on others."""
    if precision == "bf16":
        return True
    if precision != "auto":
        return False
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return False
    if device.type not in ("cpu", "cuda"):
        return False
    return bf16_speedup(device.type) >= BF16_MIN_SPEEDUP


def _processor_name(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # no /proc (not Linux): fall back to the platform's name below
        pass
    import platform

    return platform.processor() or platform.machine()


def _precision_cache() -> Path:
    return Path(os.environ.get("REDI_CACHE_DIR") or Path.home() / ".cache" / "redi") / "bf16_speedup.json"


@functools.lru_cache(maxsize=None)
def bf16_speedup(device_type: str) -> float:
    """fp32 time / bf16 time on this machine, measured once per processor and torch version and
    remembered (``~/.cache/redi/bf16_speedup.json``, or ``REDI_CACHE_DIR``), so every process on
    the machine makes the same choice: a run killed and resumed, or a service next to a training
    job, never flips precision because the cores were busy during one measurement."""
    import json

    key = f"{device_type}|{_processor_name(device_type)}|torch {torch.__version__}"
    cache = _precision_cache()
    try:
        known = json.loads(cache.read_text()) if cache.is_file() else {}
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), (int, float)):
        return float(known[key])
    speedup = _measure_bf16_speedup(device_type)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps({**known, key: speedup}, indent=2))
    except OSError:  # a read-only home: measured again by the next process, still a measurement
        pass
    return speedup


def _measure_bf16_speedup(device_type: str) -> float:
    """fp32 time / bf16 time of a small conv stack shaped like the recover net's (channels-last,
    3x3 convolutions at 32-64 channels). The two precisions run alternately and each keeps its
    fastest run, so another process on the same cores slows both alike. Well under a second."""
    device = torch.device(device_type)
    gen = torch.Generator().manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
                                 torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
                                 torch.nn.Conv2d(64, 32, 3, padding=1)).to(device).eval()
    layers = layers.to(memory_format=torch.channels_last)
    x = torch.randn(2, 32, 128, 128, generator=gen).to(device).to(memory_format=torch.channels_last)

    def run(bf16: bool) -> float:
        with torch.inference_mode(), bf16_autocast(bf16, device):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            layers(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

    for _ in range(2):  # warm-up: kernel selection and weight packing
        run(False), run(True)
    best = {False: float("inf"), True: float("inf")}
    for _ in range(7):
        for bf16 in (False, True):
            best[bf16] = min(best[bf16], run(bf16))
    return best[False] / max(best[True], 1e-9)


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
