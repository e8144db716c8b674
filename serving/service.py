"""The redi BentoML service: every promoted line's detector behind one HTTP API.

    bentoml serve serving.service:RediService --host 127.0.0.1 --port 3000

Endpoints (all POST, as BentoML APIs are):

- ``/predict`` (multipart: ``image`` file, ``line``; optional ``return_map``, ``return_overlay``,
  ``return_regions``): anomaly score, decision, threshold, model version, latency, and on request
  the coloured anomaly map / overlay as base64 PNG and the defect regions' bounding boxes.
- ``/metadata``: served lines, model versions, sha256, source, thresholds, evaluation metrics, limits.
- ``/admin/reload``: check the production pointers now and swap in any line whose version moved
  (store source; requests in flight finish on the model they started with). Needs the API key.
- ``/score_batch``: internal. ``/predict`` decodes and checks one upload, parks the tensor in this
  worker's memory under a random token and calls ``score_batch([token])`` through BentoML's
  in-process self-proxy, so BentoML's adaptive batching groups concurrent requests into one
  detector batch while the public API stays one image per call. A token is only valid inside the
  worker that made it, so calling this route from outside yields nothing.
- BentoML's own ``/livez`` and ``/readyz`` (ready once every detector is loaded) and ``/metrics``
  (Prometheus: BentoML's metrics and the plant's per line, ``serving/review_metrics.py``).
- ``/review/``: the review station, a web page (``serving/review_app.py``, ``docs/review.md``): the
  flagged parts this service kept, operators' verdicts, per-line summaries.

Kept images (``redi.retention``): every flagged image, and a sample of normal ones, is copied with
its map and record to the object store by a background thread behind a bounded queue (a full
queue drops the copy and counts it, never the answer) and indexed in the review database
(``redi.review``). Threshold overrides (``redi.thresholds``, ``redi review threshold``) are read
at start and on every reload, and decide while the model version they were set for is served.

What each line serves is decided in ONE place, its production pointer (``redi.storage``; moved by
the gate, ``redi model promote`` and ``redi model rollback``). ``serving/model_source.py`` resolves it:
from the object store (live: polled, and ``/admin/reload``), or from the models a built Bento pins.

Configuration (environment variables, read when a worker starts):

===========================  =========================================================  =========
``REDI_MODEL_SOURCE``        ``store`` (production pointers in the object store),        auto
                             ``bento`` (the models pinned in the running Bento) or
                             ``auto`` (bento inside a built Bento, else store when one
                             is configured, else an error naming the settings)
``REDI_S3_*``,               the object store (see ``redi.storage``)                      unset
``REDI_STORE_DIR``
``REDI_LINES``               comma-separated lines to serve (default: every line with a  all
                             production pointer / every model in the Bento)
``REDI_RELOAD_INTERVAL_S``   store source: seconds between checks of the pointers        30
                             (0: only ``/admin/reload``)
``REDI_MODEL_CACHE``         store source: folder of downloaded, hash-checked models     tmp dir
``REDI_API_KEY``             when set, every route except the public ones (health,        unset
                             metrics, API docs) needs ``X-API-Key: <key>`` (or
                             ``Authorization: Bearer <key>``): deny by default
``REDI_MAX_UPLOAD_BYTES``    larger uploads get 413                                      20 MiB
``REDI_MAX_PIXELS``          images with more pixels get 413 (checked before decoding)   40 M
``REDI_LOG_DIR``             production log folder (``redi.monitoring.ProductionLog``)   ``production_logs``
``REDI_DEVICE``              ``auto``, ``cpu`` or ``cuda``                               auto
``REDI_MAX_BATCH_SIZE``      adaptive batching: largest batch                            16
``REDI_MAX_LATENCY_MS``      adaptive batching: latency budget of a batch                30000
``REDI_WORKERS``             worker processes (each loads every detector)                1
``REDI_RETAIN``              keep flagged images (and a sample of normal ones): on/off   on
``REDI_RETAIN_NORMAL_RATE``  share of normal images kept: ``0.01`` or                    0.01
                             ``lineA=0.05,lineB=0,*=0.01``
``REDI_RETAIN_DAYS``         kept images older than this are deleted (0: never)          30
``REDI_RETAIN_MAX_PER_LINE`` at most this many kept images per line, oldest deleted      5000
``REDI_RETAIN_QUEUE``        copies waiting for upload; when full, copies are dropped    64
``REDI_RETAIN_SWEEP_S``      seconds between two enforcements of the limits per line     300
``REDI_REVIEW_DB``           SQLAlchemy URL of the review database                       SQLite in
                                                                                         REDI_LOG_DIR
===========================  =========================================================  =========

Every bad request gets a 4xx JSON ``{"error": message, "status": code}`` and the service goes on:
401/403 missing/wrong key, 404 unknown line, 400 unreadable or non-image upload, 413 upload or
image too large, 422 invalid option.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as _dt
import hmac
import json
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import bentoml
import numpy as np
import torch
from starlette.responses import JSONResponse, RedirectResponse

from redi.errors import ImageReadError, InputError, RediError
from redi.images import decode_rgb
from redi.models.detector import Detector, load_detector
from redi.monitoring import ProductionLog, image_feature_row
from redi.retention import RetainedItem, Retainer, RetentionPolicy
from redi.review import ReviewDB, default_db_url
from redi.storage import ObjectStore, store_from_env
from redi.thresholds import effective_threshold, threshold_override
from redi.utils import pick_device
from serving.model_source import ModelRef, StoreModels, bento_models, choose_source
from serving.review_app import create_review_app
from serving.review_auth import cookie_value, read_session
from serving.review_metrics import PlantMetrics

# Deny by default: with REDI_API_KEY set, every route needs the key except these, declared public.
PUBLIC_PATHS = frozenset({
    "/", "/livez", "/readyz", "/healthz",  # health checks (orchestrators probe without keys)
    "/metrics",  # Prometheus scrapes
    "/docs.json", "/schema.json",  # the API's description, no data
    "/score_batch",  # internal batch route: its tokens are valid only inside the worker that made them
    "/review/login",  # the review page's login form (it checks the key itself)
})
REVIEW_PREFIX = "/review/"  # the review pages also accept the signed session cookie (serving/review_auth.py)
PUBLIC_PREFIXES = ("/static_content/", "/assets/")
MULTIPART_SLACK = 64 * 1024  # form boundaries and fields around the file
SELF_CALL_ATTEMPTS = 4
BATCH_WAIT_S = 300.0
LOG = logging.getLogger("redi.serving")
_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _env_int(name: str, default: int) -> int:
    """An integer setting from the environment, with a clear error for a bad value."""
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


@dataclass
class ServingSettings:
    """The service's settings, read from the environment (see the module docstring)."""

    lines: list[str] = field(default_factory=list)
    api_key: str = ""
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    log_dir: Path = Path("production_logs")
    device: str = "auto"
    model_source: str = "auto"
    reload_interval_s: float = 30.0
    model_cache: Path | None = None

    @classmethod
    def from_env(cls) -> "ServingSettings":
        """Read every ``REDI_*`` setting."""
        interval = os.environ.get("REDI_RELOAD_INTERVAL_S", "").strip()
        try:
            reload_interval_s = float(interval) if interval else 30.0
        except ValueError as exc:
            raise RediError(f"REDI_RELOAD_INTERVAL_S={interval!r} is not a number of seconds (0 turns polling "
                            f"off)") from exc
        cache = os.environ.get("REDI_MODEL_CACHE", "").strip()
        return cls(
            lines=[x.strip() for x in os.environ.get("REDI_LINES", "").split(",") if x.strip()],
            api_key=os.environ.get("REDI_API_KEY", ""),
            max_upload_bytes=_env_int("REDI_MAX_UPLOAD_BYTES", 20 * 1024 * 1024),
            max_pixels=_env_int("REDI_MAX_PIXELS", 40_000_000),
            log_dir=Path(os.environ.get("REDI_LOG_DIR", "production_logs")),
            device=os.environ.get("REDI_DEVICE", "auto"),
            model_source=os.environ.get("REDI_MODEL_SOURCE", "auto").strip() or "auto",
            reload_interval_s=max(0.0, reload_interval_s),
            model_cache=Path(cache) if cache else None,
        )


@dataclass
class ServedLine:
    """One line's loaded detector and what the metadata endpoint tells about it."""

    line: str
    ref: ModelRef
    detector: Detector
    threshold: float  # the one deciding: the model's, or a threshold override for this version
    override: dict[str, Any] | None = None  # the line's threshold override record, when one is set

    @property
    def version(self) -> str:
        """The model version (the production pointer's)."""
        return self.ref.version

    @property
    def tag(self) -> str:
        """Where the model came from: its store key or BentoML tag."""
        return self.ref.tag

    @property
    def model_threshold(self) -> float:
        """The threshold the model was calibrated with."""
        return float(self.detector.threshold)

    def with_override(self, override: dict[str, Any] | None) -> "ServedLine":
        """This line deciding with ``override`` (applied only when it was set for this version)."""
        return replace(self, override=override,
                       threshold=effective_threshold(self.model_threshold, self.version, override))


class RequestError(Exception):
    """A bad request: becomes a JSON error response with this HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ----------------------------------------------------------------------------- models
def load_served(ref: ModelRef, device: torch.device) -> ServedLine:
    """Load a resolved (hash-checked) production model."""
    detector = load_detector(ref.path, device)
    return ServedLine(line=ref.line, ref=ref, detector=detector, threshold=float(detector.threshold))


# ----------------------------------------------------------------------------- key and size guard
def is_public(path: str) -> bool:
    """Whether a route is declared public (everything else needs the API key when one is set)."""
    return path in PUBLIC_PATHS or path.rstrip("/") in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class GuardMiddleware:
    """ASGI middleware: API key on the public APIs, and refusal of oversized bodies by Content-Length.

    Responses are written here (not by raising inside BentoML), so the client gets the message
    that says what to do instead of BentoML's generic 'Authorization error'.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.settings = ServingSettings.from_env()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or is_public(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        problem = self.check(headers, review=path.startswith(REVIEW_PREFIX) or path == REVIEW_PREFIX.rstrip("/"))
        if problem is None:
            await self.app(scope, receive, send)
            return
        if (problem.status in (401, 403) and path.startswith("/review") and not path.startswith("/review/api/")
                and scope.get("method") == "GET"):
            # a browser on a review page: to the login form, then back
            from urllib.parse import quote

            await RedirectResponse(f"/review/login?next={quote(path)}", status_code=303)(scope, receive, send)
            return
        await JSONResponse({"error": problem.message, "status": problem.status}, status_code=problem.status)(
            scope, receive, send)

    def check(self, headers: dict[str, str], review: bool = False) -> RequestError | None:
        """The first problem with a request's headers, or None.

        ``review``: a ``/review/`` route, where a valid signed session cookie stands in for the key.
        """
        key = self.settings.api_key
        if key and review and read_session(key, cookie_value(headers.get("cookie", ""))):
            key = ""  # logged in on the review page
        if key:
            given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not given:
                return RequestError(401, "this service needs an API key: send the header 'X-API-Key: <key>' "
                                         "(the key is the server's REDI_API_KEY)")
            if not hmac.compare_digest(given.encode(), key.encode()):
                return RequestError(403, "the API key is wrong; send the key the server was started with "
                                         "(REDI_API_KEY)")
        length = headers.get("content-length", "")
        limit = self.settings.max_upload_bytes + MULTIPART_SLACK
        if length.isdigit() and int(length) > limit:
            return RequestError(413, f"the request body is {int(length)} bytes, more than the upload limit of "
                                     f"{self.settings.max_upload_bytes} bytes (REDI_MAX_UPLOAD_BYTES); send a "
                                     f"smaller image")
        return None


# ----------------------------------------------------------------------------- the service
def _png_b64(rgb: np.ndarray) -> str:
    from redi.visualize import to_png_bytes

    return base64.b64encode(to_png_bytes(rgb)).decode("ascii")


@bentoml.service(name="redi", workers=_env_int("REDI_WORKERS", 1), traffic={"timeout": 120})
class RediService:
    """Anomaly detection for every promoted product line (see the module docstring)."""

    def __init__(self) -> None:
        self.settings = ServingSettings.from_env()
        self.device = pick_device(self.settings.device)
        self.source = choose_source(self.settings.model_source, getattr(RediService, "bento", None))
        self.store_models: StoreModels | None = None
        if self.source == "store":
            cache = self.settings.model_cache or Path(tempfile.gettempdir()) / "redi-model-cache"
            self.store_models = StoreModels.from_env(cache, self.settings.lines)
            refs = [self.store_models.resolve(line) for line in self.store_models.lines()]
        else:
            refs = [r for r in bento_models(RediService.bento) if not self.settings.lines or r.line in self.settings.lines]
        # the store of pointers, threshold overrides and kept images (a Bento may run without one)
        self.store: ObjectStore | None = self.store_models.store if self.store_models else _configured_store()
        # replaced as a whole on reload (never mutated), so a request holds one consistent model
        self.lines: dict[str, ServedLine] = {
            ref.line: load_served(ref, self.device).with_override(self._override(ref.line)) for ref in refs}
        self.reload_status: dict[str, Any] = {"checked": None, "errors": {}}
        self._reload_lock = threading.Lock()
        self.log = ProductionLog(self.settings.log_dir)
        self.metrics = PlantMetrics.get()
        for served in self.lines.values():
            self.metrics.serving(served.line, served.version, served.threshold)
        self.retention = RetentionPolicy.from_env()
        self.retainer = self._start_retainer()
        self._parked: dict[str, tuple[ServedLine, torch.Tensor, threading.Event]] = {}
        self._results: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()  # the two dicts are touched from the event loop and the batch thread
        if self.store is not None and self.settings.reload_interval_s > 0:
            threading.Thread(target=self._poll_pointers, name="redi-reload", daemon=True).start()

    def _start_retainer(self) -> Retainer | None:
        """The background writer of kept images (None without a store or with ``REDI_RETAIN=off``)."""
        if self.store is None or not self.retention.enabled:
            if self.retention.enabled:
                LOG.warning("no object store is configured (REDI_S3_* / REDI_STORE_DIR): flagged images are not kept")
            return None
        try:
            index: ReviewDB | None = ReviewDB(default_db_url())
        except Exception as exc:  # the images are still kept; `redi review sync` indexes them later
            LOG.error("the review database cannot be opened (%s); images are kept but not indexed", exc)
            index = None
        return Retainer(self.store, self.retention, index=index, on_event=self.metrics.retention_event)

    def _override(self, line: str) -> dict[str, Any] | None:
        """The line's threshold override record (None without a store or when none is set)."""
        return threshold_override(self.store, line) if self.store is not None else None

    def _apply_overrides(self, errors: dict[str, str]) -> dict[str, Any]:
        """Re-read every line's threshold override; swap in lines whose threshold changed."""
        changed = {}
        for line, served in list(self.lines.items()):
            try:
                updated = served.with_override(self._override(line))
            except Exception as exc:  # keep deciding with the current threshold; say why
                errors[line] = f"threshold override: {type(exc).__name__}: {exc}"
                continue
            if updated.threshold != served.threshold or updated.override != served.override:
                self.lines = {**self.lines, line: updated}
                changed[line] = {"threshold_from": served.threshold, "threshold_to": updated.threshold}
                LOG.warning("line %s now decides with threshold %s (was %s): %s", line, updated.threshold,
                            served.threshold, (updated.override or {}).get("reason", "override cleared"))
        return changed

    # -- following the production pointers ----------------------------------------------------
    def reload(self) -> dict[str, Any]:
        """Swap in every line whose production pointer moved; return what changed.

        A new model is loaded before it replaces the old one, so requests never wait for a load,
        and requests in flight finish on the model they started with. A line whose new model
        cannot be loaded (unreachable store, hash mismatch) keeps serving its current model and
        the error is reported in ``/metadata`` and the log.
        """
        changed: dict[str, Any] = {}
        errors: dict[str, str] = {}
        with self._reload_lock:  # the poll thread and /admin/reload never load the same model twice
            lines: list[str] = []
            if self.store_models is not None:
                try:
                    lines = self.store_models.lines()
                except RediError as exc:
                    lines, errors["*"] = list(self.lines), str(exc)
            for line in lines:
                try:
                    current = self.lines.get(line)
                    if current is not None and self.store_models.production_version(line) == current.version:
                        continue
                    served = load_served(self.store_models.resolve(line), self.device).with_override(
                        self._override(line))
                    self.lines = {**self.lines, line: served}
                    changed[line] = {"from": current.version if current else None, "to": served.version}
                    LOG.warning("line %s now serves %s (was %s)", line, served.version,
                                current.version if current else "nothing")
                except Exception as exc:  # keep serving the current model; say why
                    errors[line] = f"{type(exc).__name__}: {exc}"
                    LOG.error("line %s: cannot load its production model, still serving %s: %s", line,
                              self.lines[line].version if line in self.lines else "nothing", exc)
            for line, change in self._apply_overrides(errors).items():
                changed.setdefault(line, {}).update(change)
            for served in self.lines.values():
                self.metrics.serving(served.line, served.version, served.threshold)
            self.reload_status = {"checked": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                  "errors": errors}
        result = {"source": self.source, "changed": changed, "errors": errors,
                  "versions": {name: s.version for name, s in sorted(self.lines.items())},
                  "thresholds": {name: s.threshold for name, s in sorted(self.lines.items())}}
        if self.store_models is None:
            result["note"] = "a Bento serves the models it pins; build a new Bento to change them"
        return result

    def _poll_pointers(self) -> None:
        while True:
            time.sleep(self.settings.reload_interval_s)
            try:
                self.reload()
            except Exception:  # the poll thread must outlive any one failure
                LOG.exception("checking the production pointers failed")

    # -- the batched model call ---------------------------------------------------------------
    @bentoml.api(batchable=True, max_batch_size=_env_int("REDI_MAX_BATCH_SIZE", 16),
                 max_latency_ms=_env_int("REDI_MAX_LATENCY_MS", 30000))
    def score_batch(self, tokens: list[str]) -> list[str]:
        """Internal: score the parked inputs named by ``tokens`` in one batch per line."""
        with self._lock:
            items = [(t, self._parked.pop(t, None)) for t in tokens]
        # grouped by the model object each request started with (a reload may swap a line mid-batch)
        by_model: dict[int, tuple[ServedLine, list[tuple[str, torch.Tensor, threading.Event]]]] = {}
        for token, item in items:
            if item is not None:
                by_model.setdefault(id(item[0]), (item[0], []))[1].append((token, item[1], item[2]))
        scored = set()
        for served, group in by_model.values():
            try:
                out = served.detector.predict(torch.cat([tensor for _, tensor, _ in group]))
                with self._lock:
                    for i, (token, _, _) in enumerate(group):
                        self._results[token] = {"score": float(out.score[i]),
                                                "map": out.anomaly_map[i].float().cpu(),
                                                "embedding": out.embedding[i].float().cpu(), "batch_size": len(group)}
                        scored.add(token)
            finally:
                for _, _, done in group:  # wake the waiting requests, with or without a result
                    done.set()
        return [token if token in scored else "" for token in tokens]

    # -- the public API ------------------------------------------------------------------------
    @bentoml.api(route="/predict")
    async def predict(self, image: Path, line: str, return_map: bool = False, return_overlay: bool = False,
                      return_regions: bool = True, min_region_area: int = 16) -> dict:
        """Score one image of a product line.

        Returns ``line, anomaly_score, anomalous, decision, threshold, model_version, model_tag,
        latency_ms, image_size`` and, on request, ``anomaly_map_png`` / ``overlay_png`` (base64
        PNG at the model's input size) and ``defect_regions`` (boxes in the uploaded image's pixels).
        """
        started = time.perf_counter()
        try:
            return await self._predict(image, line, return_map, return_overlay, return_regions, min_region_area,
                                       started)
        except RequestError as exc:
            return JSONResponse({"error": exc.message, "status": exc.status}, status_code=exc.status)

    async def _predict(self, image: Path, line: str, return_map: bool, return_overlay: bool, return_regions: bool,
                       min_region_area: int, started: float) -> dict:
        served = self.lines.get(line)
        if served is None:
            raise RequestError(404, f"unknown line {line!r}; this service serves {sorted(self.lines)} "
                                    f"(see /metadata)")
        if min_region_area < 1:
            raise RequestError(422, f"min_region_area must be at least 1, got {min_region_area}")
        rgb, tensor = await asyncio.to_thread(self._decode, image, served.detector)
        result = await self._score(served, tensor)
        return await asyncio.to_thread(self._respond, served, rgb, result, return_map, return_overlay,
                                       return_regions, min_region_area, started)

    async def _score(self, served: ServedLine, tensor: torch.Tensor) -> dict[str, Any]:
        """Park the input, have the batchable API score it, and collect this request's result.

        The self-proxy's in-process HTTP connection can drop under concurrency (aiohttp
        "Server disconnected", BentoML issue #4971). Then the input is either still parked (the
        call never arrived: send it again) or already taken by a batch (wait for that batch).
        """
        token, done = uuid.uuid4().hex, threading.Event()
        with self._lock:
            self._parked[token] = (served, tensor, done)
        try:
            for attempt in range(1, SELF_CALL_ATTEMPTS + 1):
                try:
                    await self.to_async.score_batch([token])
                    break
                except (aiohttp.ClientError, ConnectionError) as exc:
                    with self._lock:
                        still_parked = token in self._parked
                    if not still_parked:
                        break  # a batch has it; its result arrives through `done`
                    if attempt == SELF_CALL_ATTEMPTS:
                        raise
                    LOG.warning("internal batch call failed (%s); retrying (%d/%d)", exc, attempt,
                                SELF_CALL_ATTEMPTS)
            # normally set already; only after a dropped connection does this wait for a running batch
            if not done.is_set() and not await asyncio.to_thread(done.wait, BATCH_WAIT_S):
                raise RuntimeError(f"no batch result within {BATCH_WAIT_S} s")
        finally:
            with self._lock:
                self._parked.pop(token, None)
                result = self._results.pop(token, None)
        if result is None:
            raise RuntimeError("the batch did not return this request's result")
        return result

    def _decode(self, image: Path, detector: Detector) -> tuple[np.ndarray, torch.Tensor]:
        """Upload file -> uint8 RGB and the model's input tensor; bad uploads become 4xx."""
        size = image.stat().st_size
        if size > self.settings.max_upload_bytes:
            raise RequestError(413, f"the upload is {size} bytes, more than the limit of "
                                    f"{self.settings.max_upload_bytes} bytes (REDI_MAX_UPLOAD_BYTES); send a "
                                    f"smaller image")
        try:
            rgb = decode_rgb(image.read_bytes(), max_pixels=self.settings.max_pixels, name="the uploaded image")
        except InputError as exc:
            raise RequestError(413, f"{exc} (limit: REDI_MAX_PIXELS)") from exc
        except ImageReadError as exc:
            # Pillow names the in-memory buffer ("<_io.BytesIO object at 0x...>"): noise to a client
            raise RequestError(400, _BUFFER_REPR.sub("the upload", str(exc))) from exc
        return rgb, detector.preprocess([rgb])

    def _respond(self, served: ServedLine, rgb: np.ndarray, result: dict[str, Any], return_map: bool,
                 return_overlay: bool, return_regions: bool, min_region_area: int, started: float) -> dict:
        """Build the response and log the production row (before answering: nothing unlogged)."""
        score = result["score"]
        anomalous = bool(score > served.threshold)
        body: dict[str, Any] = {
            "line": served.line, "anomaly_score": score, "anomalous": anomalous,
            "decision": "anomalous" if anomalous else "normal", "threshold": served.threshold,
            "model_version": served.version, "model_tag": served.tag,
            "image_size": {"width": int(rgb.shape[1]), "height": int(rgb.shape[0])},
            "batch_size": result["batch_size"],
        }
        self._add_pictures(body, served, rgb, result["map"].numpy(), return_map, return_overlay, return_regions,
                           min_region_area)
        body["latency_ms"] = round((time.perf_counter() - started) * 1000.0, 3)
        row = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
               "request_id": uuid.uuid4().hex, "line": served.line, "model_version": served.version,
               "model_tag": served.tag, "score": score, "decision": body["decision"], "anomalous": anomalous,
               "threshold": served.threshold, "latency_ms": body["latency_ms"],
               "width": int(rgb.shape[1]), "height": int(rgb.shape[0])}
        row.update(image_feature_row(rgb, score, result["embedding"]))
        try:
            self.log.append(row)
        except OSError as exc:
            raise RequestError(503, f"the production log {self.settings.log_dir} cannot be written ({exc}); the "
                                    f"result was not recorded - retry, and check REDI_LOG_DIR") from exc
        body["request_id"] = row["request_id"]
        self.metrics.observe(served.line, body["decision"], score, served.threshold, body["latency_ms"] / 1000.0)
        self._retain(served, row, rgb, result["map"])
        return body

    def _retain(self, served: ServedLine, row: dict[str, Any], rgb: np.ndarray, amap: torch.Tensor) -> None:
        """Queue a copy of a flagged (or sampled normal) image; never waits, never fails the answer."""
        kind = self.retention.wants(served.line, bool(row["anomalous"])) if self.retainer else None
        if kind is None or self.retainer is None:
            return
        info = {k: row[k] for k in ("score", "threshold", "anomalous", "decision", "model_version", "model_tag",
                                    "latency_ms")}
        info.update(model_threshold=served.model_threshold, threshold_override=served.override is not None
                    and served.threshold != served.model_threshold)
        self.retainer.offer(RetainedItem(request_id=row["request_id"], line=served.line,
                                         time=_dt.datetime.fromisoformat(row["time"]), kind=kind, rgb=rgb,
                                         anomaly_map=amap.numpy(), info=info))

    @staticmethod
    def _add_pictures(body: dict[str, Any], served: ServedLine, rgb: np.ndarray, amap: np.ndarray, return_map: bool,
                      return_overlay: bool, return_regions: bool, min_region_area: int) -> None:
        """Map / overlay PNGs and region boxes, as asked."""
        if not (return_map or return_overlay or return_regions):
            return
        from redi.images import resize_rgb
        from redi.visualize import defect_regions, display_range, heatmap_rgb, overlay

        vmin, vmax = display_range(served.threshold, amap)
        if return_map:
            body["anomaly_map_png"] = _png_b64(heatmap_rgb(amap, vmin, vmax))
        if return_overlay:
            body["overlay_png"] = _png_b64(overlay(resize_rgb(rgb, amap.shape[0]), amap, vmin, vmax))
        if return_regions:
            sy, sx = rgb.shape[0] / amap.shape[0], rgb.shape[1] / amap.shape[1]
            regions = defect_regions(amap, served.threshold, min_area=min_region_area)
            body["defect_regions"] = [
                {"x0": int(r["x0"] * sx), "y0": int(r["y0"] * sy), "x1": int(round(r["x1"] * sx)),
                 "y1": int(round(r["y1"] * sy)), "area_map_pixels": r["area"], "max_score": r["max_score"]}
                for r in regions]

    @bentoml.api(route="/metadata")
    def metadata(self) -> dict:
        """Served lines with version, sha256, source, promotion, threshold, input size and evaluation metrics."""
        return {
            "source": self.source,
            "lines": {
                name: {"model_version": s.version, "model_tag": s.tag, "sha256": s.ref.sha256,
                       "promoted": s.ref.promoted, "promoted_by": s.ref.promoted_by, "threshold": s.threshold,
                       "model_threshold": s.model_threshold,
                       "threshold_override": None if s.override is None else {
                           **s.override, "active": str(s.override.get("model_version")) == s.version},
                       "image_size": s.detector.image_size, "backbone": s.detector.metadata.get("backbone"),
                       "profile": s.detector.metadata.get("profile"), "metrics": s.ref.metrics}
                for name, s in sorted(self.lines.items())},
            "reload": {"interval_s": self.settings.reload_interval_s if self.store_models else None,
                       **self.reload_status},
            "limits": {"max_upload_bytes": self.settings.max_upload_bytes, "max_pixels": self.settings.max_pixels},
            "api_key_required": bool(self.settings.api_key),
            "production_log": str(self.settings.log_dir),
            "retention": self._retention_status(),
        }

    def _retention_status(self) -> dict[str, Any]:
        """Retention settings and this worker's counts (``/metadata``)."""
        policy = self.retention
        status: dict[str, Any] = {
            "enabled": self.retainer is not None, "normal_rate": policy.normal_rate, "line_rates": policy.line_rates,
            "max_days": policy.max_days, "max_per_line": policy.max_per_line, "queue_size": policy.queue_size}
        if self.retainer is not None:
            r = self.retainer
            status.update(queued=r.queue.qsize(), stored=r.stored, dropped=r.dropped, failed=r.failed,
                          deleted=r.deleted, review_db=repr(r.index) if r.index else None)
        return status

    @bentoml.api(route="/admin/reload")
    async def admin_reload(self) -> dict:
        """Check the production pointers now and swap in moved lines (see :meth:`reload`)."""
        return await asyncio.to_thread(self.reload)


def _configured_store() -> ObjectStore | None:
    """The object store when one is configured (``REDI_S3_ENDPOINT`` or ``REDI_STORE_DIR``), else None."""
    if os.environ.get("REDI_S3_ENDPOINT", "").strip() or os.environ.get("REDI_STORE_DIR", "").strip():
        return store_from_env()
    return None


RediService.mount_asgi_app(create_review_app(), path="/review")
RediService.add_asgi_middleware(GuardMiddleware)
