"""The detector service: every served line's model behind one batchable list API.

The API service (``serving/service.py``) reaches it with ``bentoml.depends(RediDetector)``;
``bentoml serve serving.service:RediService`` starts it as its own process group and the two
talk over a Unix socket with BentoML's pickle transport (protocol 5, arrays as out-of-band
buffers: no base64, no JSON of pixels). It has no public HTTP port.

APIs (internal):

- ``score(items)`` batchable: each item ``{"line", "pixels"}`` where ``pixels`` is the model input
  of one image (the model's ``input_hw`` = ``(H, W)``), either uint8 ``(H, W, 3)`` (an upload already
  at the model's size: a quarter of the bytes) or float32 ``(3, H, W)`` from
  :func:`redi.core.images.preprocess`. BentoML's adaptive batching groups concurrent calls; one
  detector batch runs per line (and model object). Each answer: ``score``, ``map`` (float32
  ``(H, W)``), ``embedding`` (float32 ``(D,)``), ``version``, ``tag``, ``model_threshold``,
  ``batch_size``; or ``{"error": ..., "status": ...}`` (unknown line; ``stale``: the model changed
  size since the caller preprocessed, with the new ``input_hw`` and ``aspect``).
- ``models()``: the catalogue (what each line serves, threshold override records, reload state).
- ``reload()``: check the production pointers and threshold overrides now; returns what changed.
- ``shadow_score(items)`` batchable: the same items, scored by the line's *shadow candidate* (the
  store's shadow pointer, followed with the production pointers; docs/serving.md, "Shadow mode"):
  ``score``, ``version``, ``tag``, ``model_threshold``, ``threshold`` (the candidate's served one),
  ``anomalous``; or ``{"error", "status"}``. The API service calls it after it has answered, from a
  bounded queue; a candidate that fails to load or score only ever answers errors here. Production
  goes first: each candidate image waits until no ``score`` batch runs (``SHADOW_YIELD_S`` at most).

What each line serves comes from ``serving/model_source.py`` (``store`` production pointers,
polled every ``REDI_RELOAD_INTERVAL_S``, or the models pinned in a built Bento). Threshold
overrides are read here with the pointers (one reader of the store); the API service applies the
threshold to the score it gets back.

``REDI_RUNTIME=onnx`` runs each line's exported ONNX graph (``detector.export_onnx``, :mod:`redi.methods.onnx`) in onnxruntime instead
of the torch detector: a ``detector.onnx`` beside the detector file is used when present, else the
detector is exported once at load time into ``REDI_MODEL_CACHE/onnx/<sha256>/``. The graph gives
score and map; the drift row's embedding comes from the torch backbone alone (one backbone pass,
see docs/serving.md).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
import torch

from redi.core.errors import RediError
from redi.ops.object_store import StorageError
from redi.methods.base import load_detector
from redi.methods.base import AnomalyDetector
from redi.ops.object_store import ObjectStore
from redi.ops.thresholds import effective_threshold, threshold_override
from redi.core.utils import pick_device
from serving.model_source import ModelRef, StoreModels, bento_models, choose_source
from serving.settings import (ServingSettings, bump_generation, detector_threads, detector_workers, env_int, has_gpu,
                              model_cache, read_generation, reload_generation_file, serving_store)

LOG = logging.getLogger("redi.serving.detector")
OUTAGE_RETRY_S = 10.0  # while the store is unreachable, it is tried this often (whatever the reload interval)
# a shadow candidate scores an image only once no production batch runs, waiting at most this long (then
# it runs anyway: under constant load the queue in the API service bounds its work, and drops the rest)
SHADOW_YIELD_S = 1.0


class BusyCount:
    """How many production batches run now; shadow scoring waits for none (production first)."""

    def __init__(self) -> None:
        self._running = 0
        self._idle = threading.Condition()

    def __enter__(self) -> "BusyCount":
        with self._idle:
            self._running += 1
        return self

    def __exit__(self, *_: Any) -> None:
        with self._idle:
            self._running -= 1
            if self._running == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no production batch runs (at most ``timeout_s``); whether it is idle now."""
        with self._idle:
            return self._idle.wait_for(lambda: self._running == 0, timeout_s)


def _resources() -> dict[str, Any]:
    """What the detector service declares: a GPU when there is one, else the cores its threads use."""
    return {"gpu": 1} if has_gpu() else {"cpu": str(detector_threads())}


# ----------------------------------------------------------------------------- one line's model
@dataclass
class LoadedLine:
    """One line's loaded model (torch, optionally an onnxruntime session) and its override record."""

    ref: ModelRef
    detector: AnomalyDetector
    session: Any = None  # onnxruntime.InferenceSession with REDI_RUNTIME=onnx
    override: dict[str, Any] | None = None
    chunk: int = 0  # largest batch the model runs at once (0: any); measured at load, see measure_chunk

    @property
    def threshold(self) -> float:
        """The threshold deciding now: the override when it was set for this version, else the model's."""
        return effective_threshold(float(self.detector.threshold), self.ref.version, self.override)

    @property
    def aspect(self) -> str:
        """How this model's input is resized (``data.aspect``): the API service preprocesses with it."""
        return str(self.detector.cfg.data.aspect)

    def info(self) -> dict[str, Any]:
        """The catalogue entry the API service keeps (everything but the weights)."""
        d, ref = self.detector, self.ref
        return {"line": ref.line, "model_version": ref.version, "model_tag": ref.tag, "sha256": ref.sha256,
                "promoted": ref.promoted, "promoted_by": ref.promoted_by, "metrics": ref.metrics,
                "model_threshold": float(d.threshold), "threshold": self.threshold, "override": self.override,
                "image_size": int(d.image_size), "input_hw": [int(v) for v in d.input_hw], "aspect": self.aspect, "backbone": d.metadata.get("backbone"),
                "profile": d.metadata.get("profile"), "runtime": "onnx" if self.session is not None else "torch",
                "part_profile": (d.metadata.get("calibration") or {}).get("part_profile"),
                "batch_chunk": self.chunk}

    def run(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores (B,), maps (B, H, W), embeddings (B, D)) of a preprocessed float batch, run in
        pieces of at most :attr:`chunk` images (the model's fastest batch size on this machine)."""
        if self.chunk and batch.shape[0] > self.chunk:
            parts = [self.run_once(piece) for piece in batch.split(self.chunk)]
            return tuple(np.concatenate(arrays) for arrays in zip(*parts))  # type: ignore[return-value]
        return self.run_once(batch)

    def run_once(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One model call on the whole batch."""
        if self.session is None:
            out = self.detector.predict(batch)
            return (out.score.float().cpu().numpy(), out.anomaly_map.float().cpu().numpy(),
                    out.embedding.float().cpu().numpy())
        from redi.methods.onnx import run_onnx

        scores, maps = run_onnx(self.session, batch)
        with torch.inference_mode():  # the graph has no embedding output: one torch backbone pass
            embedding = self.detector.backbone(batch.to(self.detector.threshold.device)).embedding
        return np.asarray(scores, np.float32), np.asarray(maps, np.float32), embedding.float().cpu().numpy()


def _onnx_file(ref: ModelRef, detector: AnomalyDetector, cache: Path) -> Path:
    """The line's ONNX graph: ``detector.onnx`` beside the detector, else exported once into the cache.

    The cache key is the detector file's sha256, so a new model never reuses an old export.
    """
    beside = ref.path.with_name("detector.onnx")
    if beside.is_file():
        return beside
    target = cache / "onnx" / ref.sha256[:32] / "detector.onnx"
    if not target.is_file():

        started = time.perf_counter()
        detector.export_onnx(target)  # atomic: a crash mid-export leaves no half file
        LOG.warning("line %s %s: exported to ONNX in %.1f s (%s)", ref.line, ref.version,
                    time.perf_counter() - started, target)
    return target


def measure_chunk(line: LoadedLine, max_batch: int, keep: float = 0.95, stop: float = 0.9,
                  min_seconds: float = 0.3, budget_s: float = 8.0) -> tuple[int, dict[int, float]]:
    """The batch size this model should run at on this machine, timed at load: (size, images/s by size).

    Batches help where the model leaves the cores idle (small models, GPUs) and hurt where it is
    compute-bound with large activations (the ``cpu`` profile on a 2-core CPU: 6.4 images/s at
    batch 1, 4.2 at 16, docs/benchmarks.md). Sizes 1, 2, 4, ... up to ``max_batch`` are timed on
    random input (speed does not depend on the pixels), each after one warm-up call, until one
    falls below ``stop`` x the best or ``budget_s`` is spent (a slow model is not timed at 16 for
    half a minute); the chosen size is the smallest within ``keep`` of the best
    (smaller batches answer sooner). BentoML still gathers up to ``REDI_MAX_BATCH_SIZE`` requests;
    the detector runs them in pieces of this size.
    """
    sample = torch.rand(max_batch, 3, *line.detector.input_hw, generator=torch.Generator().manual_seed(0))
    rates: dict[int, float] = {}
    batch, begun = 1, time.perf_counter()
    while batch <= max_batch and (not rates or time.perf_counter() - begun < budget_s):
        line.run_once(sample[:batch])  # warm-up: kernels and their caches for this shape
        started, done = time.perf_counter(), 0
        while done == 0 or time.perf_counter() - started < min_seconds:
            line.run_once(sample[:batch])
            done += batch
        rates[batch] = done / (time.perf_counter() - started)
        if rates[batch] < stop * max(rates.values()):
            break
        batch *= 2
    best = max(rates.values())
    return min(b for b, r in rates.items() if r >= keep * best), rates


def load_line(ref: ModelRef, device: torch.device, runtime: str, cache: Path,
              override: dict[str, Any] | None, chunk: int | None = None) -> LoadedLine:
    """Load a resolved (hash-checked) production model for ``runtime`` (torch or onnx).

    ``chunk``: the batch size to run at; None measures it (:func:`measure_chunk`).
    """
    detector = load_detector(ref.path, device)
    session = None
    if runtime == "onnx":
        from redi.methods.onnx import onnx_session

        session = onnx_session(_onnx_file(ref, detector, cache), threads=detector_threads())
    line = LoadedLine(ref=ref, detector=detector, session=session, override=override)
    if chunk is None:
        started = time.perf_counter()
        chunk, rates = measure_chunk(line, env_int("REDI_MAX_BATCH_SIZE", 16))
        LOG.warning("line %s %s: runs batches of at most %d (images/s by batch size %s; timed in %.1f s)",
                    ref.line, ref.version, chunk, {b: round(r, 2) for b, r in rates.items()},
                    time.perf_counter() - started)
    line.chunk = chunk
    return line


def _as_input(pixels: np.ndarray, size: tuple[int, int]) -> torch.Tensor | None:
    """One item's array as a (1, 3, H, W) float tensor, or None when it is not this model's size (H, W)."""
    height, width = size
    if pixels.dtype == np.uint8 and pixels.shape == (height, width, 3):
        from redi.core.images import preprocess

        return preprocess([np.ascontiguousarray(pixels)], (height, width))  # the same /255 the API would do
    if pixels.dtype == np.float32 and pixels.shape == (3, height, width):
        return torch.from_numpy(np.ascontiguousarray(pixels)).unsqueeze(0)
    return None


# ----------------------------------------------------------------------------- the service
# runner_connection: BentoML 1.4.40's client of a dependency closes its aiohttp session after
# `max_requests` (default 100) calls or `max_age` (300 s) and opens a new one; closing it aborts the
# calls still in flight on it ("Server disconnected", seen under 8 concurrent clients at every 100th
# call). Over a local Unix socket there is nothing to rebalance, so the session lives on.
@bentoml.service(name="redi-detector", workers=detector_workers(), resources=_resources(),
                 traffic={"timeout": 300}, runner_connection={"max_requests": 2**31 - 1, "max_age": 1e9})
class RediDetector:
    """Every served line's detector; scores batches for the API service (see the module docstring)."""

    def __init__(self) -> None:
        self.settings = ServingSettings.from_env()
        self.device = pick_device(self.settings.device)
        if self.device.type == "cpu":
            torch.set_num_threads(detector_threads())
        self.source = choose_source(self.settings.model_source, getattr(RediDetector, "bento", None))
        self.cache = model_cache(self.settings)
        self.generation_file = reload_generation_file(self.settings)
        self.generation = read_generation(self.generation_file)
        self.store_models: StoreModels | None = None
        # pointers, threshold overrides (a Bento may run without a store); never a long wait (serving_store)
        self.store: ObjectStore | None = serving_store(self.settings)
        # why this service is not serving what production says, by cause ("store", "<line>"); empty: healthy
        self.degraded: dict[str, str] = {}
        self.degraded_since: str | None = None
        self._listing_failed: StorageError | None = None
        self._loading = False  # check_pointers is loading a model (not waiting for the store)
        self.reload_status: dict[str, Any] = {"checked": None, "errors": {}}
        self._reload_lock = threading.Lock()
        self.production_busy = BusyCount()
        if self.source == "store":
            self.store_models = StoreModels.from_env(self.cache, self.settings.lines, store=self.store)
            refs = self._start_refs()
        else:
            refs = [r for r in bento_models(RediDetector.bento)
                    if not self.settings.lines or r.line in self.settings.lines]
        # replaced as a whole on reload (never mutated), so a batch holds one consistent model
        self.lines: dict[str, LoadedLine] = {ref.line: self._load(ref) for ref in refs}
        # shadow candidates (store source only), replaced as a whole like self.lines; never answer /predict
        self.shadows: dict[str, LoadedLine] = {}
        self.shadow_errors: dict[str, dict[str, str]] = {}  # line -> {version, error}: not retried until it moves
        if self.store_models is not None and not self.degraded:
            self._check_shadows(list(self.lines), {}, {})
        LOG.warning("detector service: %s on %s, %d torch threads, runtime %s", sorted(self.lines), self.device,
                    torch.get_num_threads(), self.settings.runtime)
        if self.store is not None and (self.settings.reload_interval_s > 0 or self.degraded):
            threading.Thread(target=self._poll, name="redi-reload", daemon=True).start()

    def _start_refs(self) -> list[ModelRef]:
        """The production models to start with: from the store, or, when it cannot be reached, the last
        ones fetched (the model cache); the service then reports itself degraded and keeps trying."""
        assert self.store_models is not None
        try:
            return [self.store_models.resolve(line) for line in self.store_models.lines()]
        except StorageError as exc:
            refs = self.store_models.cached()
            self._set_degraded("store", f"the object store cannot be reached ({exc}); serving the last production "
                                        f"models fetched: {({r.line: r.version for r in refs}) or 'none'}; "
                                        f"retrying every {self._poll_interval():.0f} s")
            return refs

    def _set_degraded(self, cause: str, message: str | None) -> None:
        """Record (message) or clear (None) one reason the service is degraded; log changes loudly."""
        if message is None:
            if self.degraded.pop(cause, None) is not None:
                LOG.warning("%s: back to normal", cause)
        else:
            if cause not in self.degraded:
                LOG.error("DEGRADED (%s): %s", cause, message)
            self.degraded[cause] = message
        if self.degraded and self.degraded_since is None:
            self.degraded_since = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        elif not self.degraded:
            self.degraded_since = None

    def health(self) -> dict[str, Any]:
        """Degraded or not, why, and since when (``models()``: the API service shows it in /readyz, /metrics)."""
        return {"degraded": bool(self.degraded), "reasons": dict(self.degraded), "since": self.degraded_since}

    def _override(self, line: str) -> dict[str, Any] | None:
        """The line's threshold override; while the store cannot be read, the last one read (cached)."""
        if self.store is None:
            return None
        remembered = self.cache / line / "override.json"
        try:
            override = threshold_override(self.store, line)
        except StorageError as exc:
            self._set_degraded(f"threshold override {line}", f"cannot read the threshold override of {line} ({exc}); "
                                                             f"deciding with the last one read")
            try:
                return json.loads(remembered.read_text())["override"]
            except (OSError, ValueError, KeyError):
                return None
        self._set_degraded(f"threshold override {line}", None)
        remembered.parent.mkdir(parents=True, exist_ok=True)
        tmp = remembered.with_name(f".override.{os.getpid()}.json")
        tmp.write_text(json.dumps({"override": override}, default=str))
        os.replace(tmp, remembered)
        return override

    def _load(self, ref: ModelRef) -> LoadedLine:
        fixed = os.environ.get("REDI_DETECTOR_CHUNK", "auto").strip().lower()
        chunk = None if fixed in ("", "auto") else env_int("REDI_DETECTOR_CHUNK", 1)
        return load_line(ref, self.device, self.settings.runtime, self.cache, self._override(ref.line), chunk)

    # -- the batched model call ---------------------------------------------------------------
    @bentoml.api(batchable=True, max_batch_size=env_int("REDI_MAX_BATCH_SIZE", 16),
                 max_latency_ms=env_int("REDI_MAX_LATENCY_MS", 30000))
    def score(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Score a batch of preprocessed images, one detector batch per line (see the module docstring)."""
        with self.production_busy:  # shadow candidates wait while this runs (shadow_score)
            return self._score(items)

    def _score(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self._follow_reloads()
        lines = self.lines  # one snapshot: a reload mid-batch does not split it
        answers: list[dict[str, Any] | None] = [None] * len(items)
        groups: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for i, item in enumerate(items):
            served = lines.get(str(item.get("line")))
            if served is None:
                answers[i] = {"error": f"unknown line {item.get('line')!r}", "status": 404}
                continue
            pixels = np.asarray(item.get("pixels"))
            tensor = _as_input(pixels, served.detector.input_hw)
            # float input was resized by the caller with its aspect; an H x W uint8 upload is the same either way
            wrong_aspect = pixels.dtype != np.uint8 and str(item.get("aspect", "squash")) != served.aspect
            if tensor is None or wrong_aspect:
                answers[i] = {"error": "stale", "status": 409, "image_size": served.detector.image_size,
                              "input_hw": [int(v) for v in served.detector.input_hw], "aspect": served.aspect}
                continue
            groups.setdefault(served.ref.line, []).append((i, tensor))
        for line, group in groups.items():
            served = lines[line]
            scores, maps, embeddings = served.run(torch.cat([t for _, t in group]))
            for j, (i, _) in enumerate(group):
                answers[i] = {"score": float(scores[j]), "map": maps[j], "embedding": embeddings[j],
                              "version": served.ref.version, "tag": served.ref.tag,
                              "model_threshold": float(served.detector.threshold), "batch_size": len(group),
                              "aspect": served.aspect}
        return answers  # type: ignore[return-value]

    @bentoml.api(batchable=True, max_batch_size=env_int("REDI_MAX_BATCH_SIZE", 16),
                 max_latency_ms=env_int("REDI_MAX_LATENCY_MS", 30000))
    def shadow_score(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Score a batch with each line's shadow candidate (see the module docstring); never raises."""
        shadows = self.shadows  # one snapshot, like score()
        answers: list[dict[str, Any]] = [{}] * len(items)
        groups: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for i, item in enumerate(items):
            line = str(item.get("line"))
            served = shadows.get(line)
            tensor = None if served is None else _as_input(np.asarray(item.get("pixels")),
                                                                     served.detector.input_hw)
            if served is None or tensor is None or str(item.get("version")) != served.ref.version:
                answers[i] = {"error": f"line {line!r} has no shadow candidate {item.get('version')} loaded now",
                              "status": 404}
                continue
            groups.setdefault(line, []).append((i, tensor))
        for line, group in groups.items():
            served = shadows[line]
            try:
                scores = []
                for _, tensor in group:  # one image at a time, each after production's batches in flight
                    self.production_busy.wait_idle(SHADOW_YIELD_S)
                    scores.append(float(served.run(tensor)[0][0]))
            except Exception as exc:  # a broken candidate answers errors, here only
                LOG.error("line %s: shadow candidate %s cannot score: %s", line, served.ref.version, exc)
                for i, _ in group:
                    answers[i] = {"error": f"{type(exc).__name__}: {exc}", "status": 500}
                continue
            threshold = served.threshold
            for j, (i, _) in enumerate(group):
                answers[i] = {"score": float(scores[j]), "version": served.ref.version, "tag": served.ref.tag,
                              "model_threshold": float(served.detector.threshold), "threshold": threshold,
                              "anomalous": bool(scores[j] > threshold)}
        return answers

    def _check_shadows(self, lines: list[str], errors: dict[str, str], changed: dict[str, Any]) -> None:
        """Follow each line's shadow pointer: load a new candidate, drop one turned off. Nothing here
        touches production: a candidate that cannot be loaded is reported (``models()``) and not retried
        until its pointer moves."""
        for line in lines:
            current = self.shadows.get(line)
            try:
                version = self.store_models.shadow_version(line)
            except Exception as exc:  # keep scoring what is loaded; the next check reads it again
                errors[f"{line} shadow"] = f"shadow pointer: {type(exc).__name__}: {exc}"
                continue
            if line in self.lines and version == self.lines[line].ref.version:
                version = None  # promoted meanwhile (the gate, a rollback): production scores it already
            if version is None:
                self.shadow_errors.pop(line, None)  # turned off: an old candidate's failure no longer applies
            if version == (current.ref.version if current else None) or (
                    version is not None and self.shadow_errors.get(line, {}).get("version") == version):
                continue
            shadows = {k: v for k, v in self.shadows.items() if k != line}
            try:
                ref = self.store_models.resolve_shadow(line) if version is not None else None
                if ref is not None:
                    shadows[line] = self._load(ref)
            except Exception as exc:  # the candidate is not scored; production is untouched
                self.shadows = shadows
                self.shadow_errors[line] = {"version": version, "error": f"{type(exc).__name__}: {exc}"}
                errors[f"{line} shadow"] = self.shadow_errors[line]["error"]
                LOG.error("line %s: shadow candidate %s cannot be loaded (production is unaffected): %s", line,
                          version, exc)
                continue
            self.shadows = shadows
            self.shadow_errors.pop(line, None)
            to = shadows[line].ref.version if line in shadows else None
            changed.setdefault(line, {}).update(shadow_from=current.ref.version if current else None, shadow_to=to)
            LOG.warning("line %s: shadow candidate now %s (was %s)", line, to or "none",
                        current.ref.version if current else "none")

    # -- what is served -----------------------------------------------------------------------
    @bentoml.api
    def models(self) -> dict[str, Any]:
        """The catalogue: source, each line's model and override, the last reload check."""
        self._follow_reloads()
        return {"source": self.source, "lines": {name: s.info() for name, s in sorted(self.lines.items())},
                "shadows": {name: s.info() for name, s in sorted(self.shadows.items())},
                "shadow_errors": dict(self.shadow_errors),
                "health": self.health(),
                "reload": {"interval_s": self.settings.reload_interval_s if self.store_models else None,
                           **self.reload_status},
                "runtime": self.settings.runtime, "device": str(self.device), "threads": torch.get_num_threads()}

    @bentoml.api(route="/reload")
    def reload(self) -> dict[str, Any]:
        """Check the pointers and overrides now (see :meth:`check_pointers`); the other workers follow
        before their next answer (:meth:`_follow_reloads`)."""
        self.generation = bump_generation(self.generation_file)
        return self.check_pointers()

    def _follow_reloads(self) -> None:
        """Check the pointers here too when another worker was asked to reload since this one last did.

        The check runs in a thread; this request waits for it while it loads a new model (local work,
        so that once ``/admin/reload`` has answered, later requests get the moved pointer), but not
        longer than ``REDI_STORE_TIMEOUT_S`` for the store: a hung store never holds a request; it is
        then scored by the model served now.
        """
        generation = read_generation(self.generation_file)
        if generation == self.generation:
            return
        self.generation = generation
        checker = threading.Thread(target=self._check_quietly, name="redi-follow-reload", daemon=True)
        checker.start()
        deadline = time.monotonic() + self.settings.store_timeout_s
        while checker.is_alive():
            checker.join(0.05)
            if time.monotonic() > deadline and not self._loading:
                LOG.warning("catching up with a reload: the store has not answered within %.1f s; answering with "
                            "the model served now, the check goes on in the background", self.settings.store_timeout_s)
                return

    def _check_quietly(self) -> None:
        try:
            self.check_pointers()
        except Exception:  # a background check must not die silently, nor take the service with it
            LOG.exception("checking the production pointers failed")

    def check_pointers(self) -> dict[str, Any]:
        """Swap in every line whose production pointer moved and re-read the overrides; return what changed.

        A new model is loaded before it replaces the old one, so batches never wait for a load and
        a batch in flight finishes on the model it started with. A line whose new model cannot be
        loaded keeps its current one; the error is reported (``models()``, ``/metadata``) and logged.
        """
        changed: dict[str, Any] = {}
        errors: dict[str, str] = {}
        with self._reload_lock:  # the poll thread and /admin/reload never load the same model twice
            store_failed = None
            for line in self._lines_to_check(errors):
                if self._listing_failed is not None:
                    errors.setdefault(line, "not checked: the object store did not answer")
                    continue
                try:
                    current = self.lines.get(line)
                    if current is not None and self.store_models.production_version(line) == current.ref.version:
                        if current.ref.source == "cache":  # served from the cache through an outage: confirmed
                            self.lines = {**self.lines, line: replace(current, ref=replace(current.ref, source="store"))}
                        continue
                    ref = self.store_models.resolve(line)
                    self._loading = True  # local work from here: a request catching up may wait for it
                    try:
                        served = self._load(ref)
                    finally:
                        self._loading = False
                    self.lines = {**self.lines, line: served}
                    changed[line] = {"from": current.ref.version if current else None, "to": served.ref.version}
                    LOG.warning("line %s now serves %s (was %s)", line, served.ref.version,
                                current.ref.version if current else "nothing")
                except Exception as exc:  # keep serving the current model; say why
                    errors[line] = f"{type(exc).__name__}: {exc}"
                    if isinstance(exc, StorageError):
                        store_failed = exc
                        self._listing_failed = self._listing_failed or exc  # the rest would wait as long
                    LOG.error("line %s: cannot load its production model, still serving %s: %s", line,
                              self.lines[line].ref.version if line in self.lines else "nothing", exc)
            for line, change in self._apply_overrides(errors).items():
                changed.setdefault(line, {}).update(change)
            if self.store_models is not None and self._listing_failed is None and store_failed is None:
                self._check_shadows(list(self.lines), errors, changed)
            store_failed = store_failed or self._listing_failed
            if self.store_models is not None:
                self._set_degraded("store", None if store_failed is None else
                                   f"the object store cannot be reached ({store_failed}); serving "
                                   f"{({n: s.ref.version for n, s in self.lines.items()}) or 'nothing'} until it "
                                   f"answers (retrying every {self._poll_interval():.0f} s)")
            self.reload_status = {"checked": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                  "errors": errors}
        result: dict[str, Any] = {"source": self.source, "changed": changed, "errors": errors,
                                  "versions": {n: s.ref.version for n, s in sorted(self.lines.items())},
                                  "thresholds": {n: s.threshold for n, s in sorted(self.lines.items())}}
        if self.store_models is None:
            result["note"] = "a Bento serves the models it pins; build a new Bento to change them"
        return result

    def _lines_to_check(self, errors: dict[str, str]) -> list[str]:
        self._listing_failed = None
        if self.store_models is None:
            return []
        try:
            return self.store_models.lines()
        except RediError as exc:
            errors["*"] = str(exc)
            if isinstance(exc, StorageError):
                self._listing_failed = exc
                return []  # the store does not answer: no point asking it once per line
            return list(self.lines)

    def _apply_overrides(self, errors: dict[str, str]) -> dict[str, Any]:
        """Re-read every line's threshold override; swap in lines whose threshold changed."""
        changed: dict[str, Any] = {}
        if self._listing_failed is not None:
            return changed  # the store did not answer a moment ago: keep the thresholds read last
        for line, served in list(self.lines.items()):
            try:
                updated = replace(served, override=self._override(line))
            except Exception as exc:  # keep deciding with the current threshold; say why
                errors[line] = f"threshold override: {type(exc).__name__}: {exc}"
                continue
            if updated.threshold != served.threshold or updated.override != served.override:
                self.lines = {**self.lines, line: updated}
                changed[line] = {"threshold_from": served.threshold, "threshold_to": updated.threshold}
                LOG.warning("line %s now decides with threshold %s (was %s): %s", line, updated.threshold,
                            served.threshold, (updated.override or {}).get("reason", "override cleared"))
        return changed

    def _poll_interval(self) -> float:
        """Seconds to the next pointer check: the reload interval, and at most OUTAGE_RETRY_S while degraded."""
        interval = self.settings.reload_interval_s
        if self.degraded:
            return min(interval, OUTAGE_RETRY_S) if interval > 0 else OUTAGE_RETRY_S
        return interval if interval > 0 else OUTAGE_RETRY_S

    def _poll(self) -> None:
        while True:
            time.sleep(self._poll_interval())
            if self.settings.reload_interval_s <= 0 and not self.degraded:
                continue  # polling is off; this thread only retries a store that was unreachable
            try:
                self.check_pointers()  # not self.reload(): an API method called on self goes through HTTP
            except Exception:  # the poll thread must outlive any one failure
                LOG.exception("checking the production pointers failed")


def configured_store(patient: bool = False) -> ObjectStore | None:
    """The object store when one is configured (``REDI_S3_ENDPOINT`` or ``REDI_STORE_DIR``), else None;
    built without a round trip, with the services' short timeouts unless ``patient``
    (:func:`serving.settings.serving_store`)."""
    return serving_store(ServingSettings.from_env(), patient=patient)


__all__ = ["LoadedLine", "RediDetector", "configured_store", "load_line"]
