"""The redi BentoML services: every promoted line's detector behind one HTTP API.

    bentoml serve serving.service:RediService --host 127.0.0.1 --port 3000

Two services, composed the way BentoML documents it ("distributed services"): this API service
(``RediService``, the public port) and the detector service (``RediDetector``,
``serving/detector_service.py``), which it reaches with ``bentoml.depends``. ``bentoml serve``
starts both as separate processes; they talk over a Unix socket. The API service does everything
around the model: the key guard, limits, decoding and preprocessing (in a thread pool, while the
detector runs the previous batch), the threshold decision and defect regions on the returned
map, the production log (group commit), kept images, the review page and the plant metrics. The
detector service holds the models (model sources, reload, overrides) and scores lists of
preprocessed images with BentoML's adaptive batching.

Endpoints (all POST, as BentoML APIs are):

- ``/predict`` (multipart: ``image`` file, ``line``; optional ``return_map``, ``return_overlay``,
  ``return_regions``): anomaly score, decision, the threshold it was made at and where that came
  from (``threshold_source``: ``model`` or ``override``), model version, latency, and on request
  the coloured anomaly map / overlay as base64 PNG and the defect regions' bounding boxes.
- ``/metadata``: served lines, model versions, sha256, source, thresholds, evaluation metrics, limits.
- ``/admin/reload``: have the detector service check the production pointers and threshold
  overrides now and swap in any line whose version moved (store source; requests in flight finish
  on the model they started with). Needs the API key.
- BentoML's own ``/livez`` and ``/readyz`` (ready once the detector service serves at least one
  line; JSON: ``ready``, ``degraded`` with reasons and since when, ``open_mode``) and ``/metrics``
  (Prometheus: BentoML's metrics, the plant's per line, ``serving/review_metrics.py``, and
  ``redi_degraded``, ``redi_open_mode``, ``redi_request_body_refused_total``).
- ``/review/``: the review station, a web page (``serving/review_app.py``, ``docs/review.md``): the
  flagged parts this service kept, operators' verdicts, per-line summaries, and each line's shadow
  comparison (``/review/shadow/<line>``).

Shadow mode (docs/serving.md, "Shadow mode"): when a line has a shadow candidate (its shadow
pointer, ``redi model shadow``), ``/predict`` still answers with production alone; the answered
request then goes on a bounded queue (``serving/shadow_queue.py``), the candidate scores it, and
both decisions are written to the shadow log (``<REDI_LOG_DIR>/shadow/``); a disagreement is kept
for review. A full queue drops the request for the candidate (``redi_shadow_total{event="dropped"}``).

Kept images (``redi.ops.retention``): every flagged image, and a sample of normal ones, is copied with
its map and record to the object store by a background thread behind a bounded queue (a full
queue drops the copy and counts it, never the answer) and indexed in the review database
(``redi.ops.review``). Threshold overrides (``redi.ops.thresholds``, ``redi review threshold``) are read
by the detector service at start and on every reload, and decide while the model version they were
set for is served.

What each line serves is decided in ONE place, its production pointer (``redi.ops.model_registry``; moved by
the gate, ``redi model promote`` and ``redi model rollback``). ``serving/model_source.py`` resolves it:
from the object store (live: polled, and ``/admin/reload``), or from the models a built Bento pins.

Configuration (environment variables, read when a worker starts):

============================  =========================================================  =========
``REDI_MODEL_SOURCE``         ``store`` (production pointers in the object store),        auto
                              ``bento`` (the models pinned in the running Bento) or
                              ``auto`` (bento inside a built Bento, else store when one
                              is configured, else an error naming the settings)
``REDI_S3_*``,                the object store (see ``redi.ops.model_registry``)                      unset
``REDI_STORE_DIR``
``REDI_LINES``                comma-separated lines to serve (default: every line with a  all
                              production pointer / every model in the Bento)
``REDI_RELOAD_INTERVAL_S``    store source: seconds between checks of the pointers        30
                              (0: only ``/admin/reload``)
``REDI_MODEL_CACHE``          folder of downloaded, hash-checked models (store source)    tmp dir
                              and of ONNX exports (``REDI_RUNTIME=onnx``)
``REDI_RUNTIME``              ``torch`` or ``onnx`` (the exported graph in onnxruntime)   torch
``REDI_API_KEY``              every route except the public ones (health, metrics, API     required
                              docs) needs ``X-API-Key: <key>`` (or ``Authorization:
                              Bearer <key>``): deny by default. 16+ characters, not an
                              example key, or the service refuses to start
``REDI_OPEN_MODE``            ``1``: run without a key on purpose (said in the log,        0
                              ``/readyz``, ``/metadata``, ``redi_open_mode``)
``REDI_SESSION_SECRET``       signs the review station's session cookie; 32+ characters,   required
                              not the API key (``serving.review_auth``; operators log in
                              with accounts made by ``redi review user add``)
``REDI_MAX_UPLOAD_BYTES``     larger uploads get 413; every request body is bounded        20 MiB
                              before parsing: this + 64 KiB on ``/predict``, 64 KiB
                              elsewhere (``BodyLimitMiddleware``)
``REDI_MAX_PIXELS``           images with more pixels get 413 (checked from the header    26.2 M
                              before decoding; also Pillow's decompression-bomb limit)
``REDI_STORE_TIMEOUT_S``      connect/read timeout of the S3 calls a start or a request   5
                              may wait for (one retry): a hung store never holds either
``REDI_LOG_DIR``              production log folder (``redi.ops.monitoring.ProductionLog``)   ``production_logs``
``REDI_HOST_ID``              this host's name in the shipped log segments                hostname
                              (``production-log/<line>/<host>/...`` in the store, for
                              drift runs over every host; ``redi.ops.log_shipping``)
``REDI_LOG_SHIP_INTERVAL_S``  seconds between two shipments of the log to the store       30
                              (0: rows stay local)
``REDI_DEVICE``               ``auto``, ``cpu`` or ``cuda`` (the detector service asks     auto
                              BentoML for a GPU when there is one and this is not cpu)
``REDI_MAX_BATCH_SIZE``       adaptive batching: largest batch                            16
``REDI_MAX_LATENCY_MS``       adaptive batching: latency budget of a batch                30000
``REDI_WORKERS``              API service worker processes                                1
``REDI_DETECTOR_WORKERS``     detector service worker processes (each loads every model)  1 per usable
                                                                                          core (CPU),
                                                                                          1 (GPU)
``REDI_TORCH_THREADS``        torch threads of a detector worker                          cores/workers
``REDI_DETECTOR_CHUNK``       largest batch a model runs at once (``auto``: timed at      auto
                              load, the fastest size on this machine)
``REDI_SHADOW_QUEUE``         shadow mode: answered requests waiting for the candidate;   32
                              when full, the candidate skips them (counted)
``REDI_SHADOW_QUEUE_BYTES``   bytes of decoded images those requests may hold             128 MiB
``REDI_SHADOW_RATE``          share of answered requests the candidate scores (its CPU     1
                              share on a saturated machine; docs/benchmarks.md)
``REDI_RETAIN``               keep flagged images (and a sample of normal ones): on/off   on
``REDI_RETAIN_NORMAL_RATE``   share of normal images kept: ``0.01`` or                    0.01
                              ``lineA=0.05,lineB=0,*=0.01``
``REDI_RETAIN_DAYS``          kept images older than this are deleted (0: never)          30
``REDI_RETAIN_MAX_PER_LINE``  at most this many kept images per line, oldest deleted      5000
``REDI_RETAIN_QUEUE``         copies waiting for upload; when full, copies are dropped    64
``REDI_RETAIN_QUEUE_BYTES``   bytes of decoded images those copies may hold; beyond it    256 MiB
                              copies are dropped (counted)
``REDI_RETAIN_SWEEP_S``       seconds between two enforcements of the limits per line     300
``REDI_REVIEW_DB``            SQLAlchemy URL of the review database                       SQLite in
                                                                                          REDI_LOG_DIR
============================  =========================================================  =========

Every bad request gets a 4xx JSON ``{"error": message, "status": code}`` and the service goes on:
401/403 missing/wrong key, 404 unknown line, 400 unreadable or non-image upload, 413 body, upload or
image too large, 422 invalid option; 503 while no model is loaded.

Faults (docs/serving.md, "Faults"): a store that is down or hangs at start does not stop the
service: it serves the last production models fetched (the model cache) or a Bento's pins and
says it is degraded (``/readyz``, ``/metadata``, ``redi_degraded``) until the store answers.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures as cf
import datetime as _dt
import hmac
import logging
import math
import random
import re
import time
import uuid
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
import torch
from starlette.responses import JSONResponse, RedirectResponse

from redi.core.errors import ImageReadError, InputError, RediError
from redi.core.images import crop_to_content, decode_rgb, preprocess, size_hw
from redi.ops.idempotency import IdempotencyIndex, check_key
from redi.core.part_check import unlike_line
from redi.ops.monitoring import ProductionLog, image_feature_row
from redi.ops.retention import FLAGGED, RetainedItem, Retainer, RetentionPolicy
from redi.ops.review import ReviewDB, default_db_url
from redi.ops.shadow import shadow_log
from redi.ops.thresholds import effective_threshold
from serving.detector_service import RediDetector, configured_store
from serving.review_app import create_review_app
from serving.review_auth import ReviewSecurity
from serving.review_metrics import PlantMetrics
from serving.shadow_queue import ShadowJob, ShadowScorer
from serving.settings import (FORM_BODY_BYTES, MULTIPART_SLACK, OPEN_MODE_WARNING, ServingSettings, api_key_problem, env_int,
                              read_generation, reload_generation_file, usable_cpus)

# Deny by default: with REDI_API_KEY set, every route needs the key except these, declared public.
PUBLIC_PATHS = frozenset({
    "/", "/livez", "/readyz", "/healthz",  # health checks (orchestrators probe without keys)
    "/metrics",  # Prometheus scrapes
    "/docs.json", "/schema.json",  # the API's description, no data
    "/review/login",  # the review page's login form (it checks the key itself)
})
REVIEW_PREFIX = "/review/"  # the review pages also accept the signed session cookie (serving/review_auth.py)
PUBLIC_PREFIXES = ("/static_content/", "/assets/")
LOG = logging.getLogger("redi.serving")
_CAMERA = re.compile(r"[A-Za-z0-9._-]{1,64}")  # a camera or station name, as line software sends it
_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


class RequestError(Exception):
    """A bad request: becomes a JSON error response with this HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ----------------------------------------------------------------------------- key and size guard
def is_public(path: str) -> bool:
    """Whether a route is declared public (everything else needs the API key when one is set)."""
    return path in PUBLIC_PATHS or path.rstrip("/") in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class GuardMiddleware:
    """ASGI middleware: API key on the public APIs (body sizes: :class:`BodyLimitMiddleware`).

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
        if review:
            key = ""  # the review app admits operator sessions or this key itself (serving/review_auth.py)
        if key:
            given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not given:
                return RequestError(401, "this service needs an API key: send the header 'X-API-Key: <key>' "
                                         "(the key is the server's REDI_API_KEY)")
            if not hmac.compare_digest(given.encode(), key.encode()):
                return RequestError(403, "the API key is wrong; send the key the server was started with "
                                         "(REDI_API_KEY)")
        return None  # body sizes: BodyLimitMiddleware, on every route


# ----------------------------------------------------------------------------- body limit, health
def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


class BodyLimitMiddleware:
    """ASGI middleware: every request body is bounded BEFORE anything parses it, on every route.

    Public routes too (``POST /review/login`` parses multipart, and Starlette spools file parts to
    disk). A declared ``Content-Length`` over the route's limit is answered 413 unread. A body
    without one (``Transfer-Encoding: chunked``) is counted as it arrives: at the limit the client
    gets 413 and the app is told the client left, so it stops parsing and what it spooled is
    dropped. The limits (``ServingSettings.body_limit``): ``REDI_MAX_UPLOAD_BYTES`` plus the form
    around the file on ``/predict``, 64 KiB on every other route.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.settings = ServingSettings.from_env()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = self.settings.body_limit(path)
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await self._refuse(scope, send, path, limit, int(length) if length.isdigit() else None)
            return
        received, over, started = 0, False, False

        async def counted_receive() -> dict:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    if not started:
                        await self._refuse(scope, send, path, limit, None)
                    return {"type": "http.disconnect"}  # the app stops reading and parsing here
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if over:
                return  # answered 413 already; the app's reaction to the 'disconnect' goes nowhere
            started = started or message.get("type") == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:  # noqa: BLE001 - the app failed on the body we cut off: expected, answered
            if not over:
                raise

    async def _refuse(self, scope: dict, send: Any, path: str, limit: int, declared: int | None) -> None:
        if declared is None and _header(scope, b"content-length") not in (None, ""):
            status, message = 400, "the Content-Length header is not a number of bytes"
        else:
            status = 413
            size = f"{declared} bytes" if declared is not None else f"more than {limit} bytes (counted as it arrived)"
            what = (f"the upload limit of {self.settings.max_upload_bytes} bytes (REDI_MAX_UPLOAD_BYTES) plus "
                    f"{MULTIPART_SLACK} bytes of form; send a smaller image" if limit == self.settings.max_body_bytes
                    else f"the {limit} bytes this route accepts (it takes a small form or JSON, no files)")
            message = f"the request body is {size}, more than {what}"
        HealthMetrics.get().body_refused(path)

        async def no_body() -> dict:
            return {"type": "http.disconnect"}

        await JSONResponse({"error": message, "status": status}, status_code=status,
                           headers={"Connection": "close"})(scope, no_body, send)


# This API worker's last view of the detector service's health (``RediService._catalogue`` updates it).
SERVICE_HEALTH: dict[str, Any] = {"degraded": False, "reasons": {}, "since": None}


class HealthMetrics:
    """``redi_degraded``, ``redi_open_mode`` and ``redi_request_body_refused_total``, one per process
    (created on first use, after BentoML set up Prometheus' multiprocess mode)."""

    _instance: "HealthMetrics | None" = None

    def __init__(self) -> None:
        import prometheus_client as prom

        self.degraded = prom.Gauge("redi_degraded", "1 while the service serves but not what production says "
                                   "(e.g. cached models during a store outage)", multiprocess_mode="livemax")
        self.open_mode = prom.Gauge("redi_open_mode", "1 when the service runs without an API key (REDI_OPEN_MODE)",
                                    multiprocess_mode="livemax")
        self.refused = prom.Counter("redi_request_body_refused_total", "Requests refused for their body size",
                                    ["route"])

    @classmethod
    def get(cls) -> "HealthMetrics":
        if cls._instance is None:
            cls._instance = HealthMetrics()
        return cls._instance

    def body_refused(self, path: str) -> None:
        """Count one refused body (the route label is bounded: ``/predict`` or ``other``)."""
        self.refused.labels("/predict" if path.rstrip("/") == "/predict" else "other").inc()


class ReadinessMiddleware:
    """``GET /readyz`` answers JSON: ``ready`` (BentoML's status code: 200 once the detector service
    serves at least one line, else 503), ``degraded`` with its ``reasons`` and ``since`` (serving the
    last fetched models while the store cannot be reached, ...) and ``open_mode`` (no API key)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.open_mode = ServingSettings.from_env().open_mode

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("path") != "/readyz":
            await self.app(scope, receive, send)
            return
        status = 503

        async def capture(message: dict) -> None:
            nonlocal status
            if message.get("type") == "http.response.start":
                status = int(message["status"])

        await self.app(scope, receive, capture)
        body = {"ready": status == 200, **SERVICE_HEALTH, "open_mode": self.open_mode}
        await JSONResponse(body, status_code=status)(scope, receive, send)


def check_access(settings: ServingSettings) -> None:
    """Refuse an open service nobody asked for, and a guessable key (``serving.settings.api_key_problem``);
    say loudly when open mode was asked for."""
    problem = api_key_problem(settings.api_key, settings.open_mode)
    if problem:
        raise RediError(problem)
    ReviewSecurity.from_env().check()  # the review page's own cookie signing secret (serving/review_auth.py)
    if settings.open_mode:
        LOG.error("%s", OPEN_MODE_WARNING)


# ----------------------------------------------------------------------------- the service
def _png_b64(rgb: np.ndarray) -> str:
    from redi.core.visualize import to_png_bytes

    return base64.b64encode(to_png_bytes(rgb)).decode("ascii")


def threshold_source(model_version: str, override: dict[str, Any] | None) -> str:
    """``override`` when the line's override decides for ``model_version``, else ``model``.

    Asked of :func:`redi.ops.thresholds.effective_threshold` itself (NaN for the model's threshold comes
    back NaN only when no override applies), so the two can never disagree on which one decided.
    """
    return "model" if math.isnan(effective_threshold(math.nan, model_version, override)) else "override"


def model_input(rgb: np.ndarray, size: int | tuple[int, int], aspect: str = "squash") -> np.ndarray:
    """What crosses to the detector service for one image: the uint8 pixels themselves when the upload
    is already at the model's input size ``(H, W)`` (no copy; a quarter of the float bytes; every
    aspect leaves such an image as it is), else the float32 ``(3, H, W)`` of
    :func:`redi.core.images.preprocess` with the model's ``data.aspect`` (the resize the threshold
    was calibrated on)."""
    if rgb.shape[:2] == size_hw(size):
        return rgb
    return preprocess([rgb], size, aspect)[0].numpy()


def input_size(entry: dict[str, Any]) -> tuple[int, int]:
    """The model input ``(H, W)`` of a catalogue entry or stale answer (older ones carry only S)."""
    return size_hw(entry.get("input_hw") or int(entry["image_size"]))


def entry_input(rgb: np.ndarray, entry: dict[str, Any]) -> np.ndarray:
    """:func:`model_input` for the model a catalogue entry describes (its input size and aspect)."""
    return model_input(rgb, input_size(entry), entry.get("aspect", "squash"))


@bentoml.service(name="redi", workers=env_int("REDI_WORKERS", 1), traffic={"timeout": 120})
class RediService:
    """Anomaly detection for every promoted product line (see the module docstring)."""

    detector = bentoml.depends(RediDetector)

    @bentoml.on_deployment
    def refuse_unsafe_start() -> None:
        """Run once by ``bentoml serve`` before any worker starts: no key without ``REDI_OPEN_MODE=1``,
        and no example or short key (``serving.settings.api_key_problem``); the server exits with the reason."""
        try:
            check_access(ServingSettings.from_env())
        except RediError as exc:
            raise SystemExit(f"redi service refuses to start: {exc}") from None

    def __init__(self) -> None:
        self.settings = ServingSettings.from_env()
        check_access(self.settings)  # also where no deployment hook ran
        from PIL import Image

        # the decompression-bomb limit of every image this process opens (uploads, the review pages'
        # pictures): Pillow refuses more than twice this before decoding; uploads are held to it exactly
        Image.MAX_IMAGE_PIXELS = self.settings.max_pixels
        self.health_metrics = HealthMetrics.get()
        self.health_metrics.open_mode.set(1 if self.settings.open_mode else 0)
        # this process's torch only resizes one image per pool thread: no nested OpenMP teams
        torch.set_num_threads(1)
        self.pool = cf.ThreadPoolExecutor(max(4, 2 * usable_cpus()), thread_name_prefix="redi-io")
        # kept images, uploaded in the background: patient (an outage delays a copy, never an answer);
        # the detector service reads pointers and overrides with short timeouts
        self.store = configured_store(patient=True)
        self.log = ProductionLog(self.settings.log_dir, ship_to=self.store)  # + this host's segments in the store
        self.idempotency = IdempotencyIndex(self.settings.log_dir)  # a retried Idempotency-Key is answered once
        self.metrics = PlantMetrics.get()
        self.retention = RetentionPolicy.from_env()
        self.retainer = self._start_retainer()
        # shadow mode: candidates score answered requests from a bounded queue, never on the answer's path
        # no fsync: a crash may lose the last shadow rows, which only makes a shadow period count fewer,
        # while two logs fsync-ing would slow production's group commit
        # shipped like the production log, so a promotion anywhere counts every host's shadow decisions
        shadow_rows_log = shadow_log(self.settings.log_dir, fsync=False, ship_to=self.store)
        self.shadow = ShadowScorer(lambda: self.detector, self.pool, shadow_rows_log, entry_input, self.retainer,
                                   self.metrics.shadow_event, self.settings.shadow_queue,
                                   self.settings.shadow_queue_bytes)
        self.catalogue: dict[str, Any] | None = None  # the detector service's models(), refreshed
        self._catalogue_at = 0.0
        self.generation_file = reload_generation_file(self.settings)
        self.generation = read_generation(self.generation_file)

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

    # -- what the detector service serves ---------------------------------------------------------
    async def _catalogue(self, fresh: bool = False) -> dict[str, Any]:
        """The detector service's catalogue; refreshed when asked, after a reload (any worker's) and when
        older than the reload interval."""
        interval = 5.0 if SERVICE_HEALTH["degraded"] else (self.settings.reload_interval_s or 30.0)
        generation = read_generation(self.generation_file)
        if generation != self.generation:
            fresh, self.generation = True, generation
        if fresh or self.catalogue is None or time.monotonic() - self._catalogue_at > interval:
            catalogue = await self.detector.to_async.models()
            self.catalogue, self._catalogue_at = catalogue, time.monotonic()
            self._note_health(catalogue)
            for name, info in catalogue["lines"].items():
                self.metrics.serving(name, info["model_version"], info["threshold"],
                                     threshold_source(info["model_version"], info.get("override")))
        return self.catalogue

    def _note_health(self, catalogue: dict[str, Any]) -> None:
        """Publish the detector service's health (``/readyz``, ``redi_degraded``); no line served is degraded."""
        health = dict(catalogue.get("health") or {"degraded": False, "reasons": {}, "since": None})
        if not catalogue["lines"]:
            health = {**health, "degraded": True,
                      "reasons": {**health.get("reasons", {}), "models": "no line has a model loaded"}}
        SERVICE_HEALTH.clear()
        SERVICE_HEALTH.update(health)
        self.health_metrics.degraded.set(1 if health["degraded"] else 0)

    async def __is_ready__(self) -> bool:
        """Ready once the detector service serves at least one line (degraded or not: ``/readyz`` says which)."""
        try:
            return bool((await self._catalogue(fresh=self.catalogue is None))["lines"])
        except Exception as exc:  # not up yet: /readyz says 503 until it is
            LOG.info("detector service not ready: %s", exc)
            return False

    # -- the public API ------------------------------------------------------------------------
    @bentoml.api(route="/predict")
    async def predict(self, image: Path, line: str, return_map: bool = False, return_overlay: bool = False,
                      return_regions: bool = True, min_region_area: int = 16, camera: str = "",
                      ctx: bentoml.Context = None) -> dict:
        """Score one image of a product line.

        A request with an ``Idempotency-Key`` header (8-128 of ``[A-Za-z0-9._:-]``) whose key was
        answered before (in the production log of today or yesterday) gets that answer again, marked
        ``replayed``, without a second production row (``redi.ops.idempotency``).

        ``camera``: the camera or station that took the image (up to 64 of ``[A-Za-z0-9._-]``), logged
        with the row and shown on the review page.

        Returns ``line, anomaly_score, anomalous, decision, threshold, threshold_source`` (``model``
        or ``override``), ``model_version, model_tag, latency_ms, image_size`` and, on request, ``anomaly_map_png`` / ``overlay_png`` (base64
        PNG at the model's input size) and ``defect_regions`` (boxes in the uploaded image's pixels);
        ``unlike_part`` (reasons) when the image is far off the line's parts (a black frame, a strip:
        ``redi.core.part_check``); it is still scored, and the review page shows the reasons.
        """
        started = time.perf_counter()
        key = ctx.request.headers.get("idempotency-key", "") if ctx is not None else ""
        try:
            if camera and not _CAMERA.fullmatch(camera):
                raise RequestError(422, f"camera {camera[:80]!r} is not a camera name: use up to 64 letters, digits, "
                                        f"'.', '_' or '-'")
            if not key:
                return await self._predict(image, line, return_map, return_overlay, return_regions, min_region_area,
                                           started, camera=camera)
            try:
                check_key(key)
            except InputError as exc:
                raise RequestError(422, str(exc)) from exc
            loop = asyncio.get_running_loop()
            return await self.idempotency.once(
                line, key, lambda: self._predict(image, line, return_map, return_overlay, return_regions,
                                                 min_region_area, started, key, camera),
                lambda: loop.run_in_executor(self.pool, self.idempotency.lookup, line, key))
        except RequestError as exc:
            if ctx is not None:  # BentoML puts ctx's status on any response of an API that takes ctx
                ctx.response.status_code = exc.status
            return JSONResponse({"error": exc.message, "status": exc.status}, status_code=exc.status)

    async def _predict(self, image: Path, line: str, return_map: bool, return_overlay: bool, return_regions: bool,
                       min_region_area: int, started: float, key: str = "", camera: str = "") -> dict:
        info = (await self._catalogue())["lines"].get(line)
        if info is None and not self.catalogue["lines"]:
            raise RequestError(503, f"no model is loaded yet ({SERVICE_HEALTH.get('reasons')}); retry later "
                                    f"(/readyz says when the service is ready)")
        if info is None:
            raise RequestError(404, f"unknown line {line!r}; this service serves {sorted(self.catalogue['lines'])} "
                                    f"(see /metadata)")
        if min_region_area < 1:
            raise RequestError(422, f"min_region_area must be at least 1, got {min_region_area}")
        loop = asyncio.get_running_loop()
        aspect = info.get("aspect", "squash")  # catalogues of older detector services carry none
        rgb, pixels = await loop.run_in_executor(self.pool, self._decode, image, input_size(info), aspect)
        result = await self._score(line, rgb, pixels, aspect)
        info = self.catalogue["lines"].get(line, info)
        body, row, retained = await loop.run_in_executor(
            self.pool, self._respond, line, info, rgb, result, return_map, return_overlay, return_regions,
            min_region_area, started)
        if key:
            row["idempotency_key"] = body["idempotency_key"] = key
        if camera:
            row["camera"] = body["camera"] = camera
            if retained is not None:
                retained.info["camera"] = camera
        try:  # group commit: this answer leaves only after its row is on disk
            await asyncio.wrap_future(self.log.submit(row))
        except OSError as exc:
            raise RequestError(503, f"the production log {self.settings.log_dir} cannot be written ({exc}); the "
                                    f"result was not recorded - retry, and check REDI_LOG_DIR") from exc
        if key:
            self.idempotency.remember(line, key, row)
        self.metrics.observe(line, body["decision"], body["anomaly_score"], body["threshold"],
                             body["latency_ms"] / 1000.0, body["model_version"], body["threshold_source"])
        if retained is not None and self.retainer is not None:
            self.retainer.offer(retained)
        candidate = (self.catalogue or {}).get("shadows", {}).get(line)
        if candidate is not None and random.random() < self.settings.shadow_rate:  # after the row is committed
            amap = crop_to_content(np.asarray(result["map"]), rgb.shape[:2], str(result.get("aspect", aspect)))
            self.shadow.offer(ShadowJob(line, candidate, row, rgb, amap, kept=retained is not None))
        return body

    async def _score(self, line: str, rgb: np.ndarray, pixels: np.ndarray, aspect: str) -> dict[str, Any]:
        """One image through the detector service's batchable ``score``; a model that changed its
        input size or aspect since this request preprocessed (a reload) gets the image again as it wants it."""
        for _ in range(2):
            answer = (await self.detector.to_async.score([{"line": line, "pixels": pixels, "aspect": aspect}]))[0]
            if answer.get("error") != "stale":
                break
            await self._catalogue(fresh=True)
            aspect = str(answer.get("aspect", "squash"))
            pixels = await asyncio.get_running_loop().run_in_executor(self.pool, model_input, rgb,
                                                                      input_size(answer), aspect)
        if "error" in answer:
            raise RequestError(int(answer.get("status", 503)), f"{answer['error']}; see /metadata")
        return answer

    def _decode(self, image: Path, size: tuple[int, int], aspect: str = "squash") -> tuple[np.ndarray, np.ndarray]:
        """Upload file -> uint8 RGB and the model input (:func:`model_input`); bad uploads become 4xx.

        Cheap checks first: the file size, then the pixel count from the image header (in
        ``decode_rgb``), before any pixel is decoded.
        """
        size_bytes = image.stat().st_size
        if size_bytes > self.settings.max_upload_bytes:
            raise RequestError(413, f"the upload is {size_bytes} bytes, more than the limit of "
                                    f"{self.settings.max_upload_bytes} bytes (REDI_MAX_UPLOAD_BYTES); send a "
                                    f"smaller image")
        try:
            rgb = decode_rgb(image.read_bytes(), max_pixels=self.settings.max_pixels, name="the uploaded image")
        except InputError as exc:
            raise RequestError(413, f"{exc} (limit: REDI_MAX_PIXELS)") from exc
        except ImageReadError as exc:
            # Pillow names the in-memory buffer ("<_io.BytesIO object at 0x...>"): noise to a client
            raise RequestError(400, _BUFFER_REPR.sub("the upload", str(exc))) from exc
        return rgb, model_input(rgb, size, aspect)

    def _respond(self, line: str, info: dict[str, Any], rgb: np.ndarray, result: dict[str, Any], return_map: bool,
                 return_overlay: bool, return_regions: bool, min_region_area: int,
                 started: float) -> tuple[dict[str, Any], dict[str, Any], RetainedItem | None]:
        """The response, its production row and the kept copy (if any); the threshold is applied here,
        with the override of the catalogue when it was set for the version that scored the image."""
        score, version, amap = result["score"], str(result["version"]), np.asarray(result["map"])
        # the aspect of the model that scored this image (a reload may have changed the catalogue since)
        aspect = str(result.get("aspect", info.get("aspect", "squash")))
        model_threshold = float(result["model_threshold"])
        override = info.get("override")
        threshold = effective_threshold(model_threshold, version, override)
        anomalous = bool(score > threshold)
        body: dict[str, Any] = {
            "line": line, "anomaly_score": score, "anomalous": anomalous,
            "decision": "anomalous" if anomalous else "normal", "threshold": threshold,
            "threshold_source": threshold_source(version, override), "model_version": version, "model_tag": result["tag"],
            "image_size": {"width": int(rgb.shape[1]), "height": int(rgb.shape[0])},
            "batch_size": result["batch_size"],
        }
        self._add_pictures(body, threshold, rgb, amap, return_map, return_overlay, return_regions, min_region_area,
                           aspect)
        body["latency_ms"] = round((time.perf_counter() - started) * 1000.0, 3)
        row = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
               "request_id": uuid.uuid4().hex, "line": line, "model_version": version,
               "model_tag": result["tag"], "score": score, "decision": body["decision"], "anomalous": anomalous,
               "threshold": threshold, "latency_ms": body["latency_ms"],
               "width": int(rgb.shape[1]), "height": int(rgb.shape[0])}
        row.update(image_feature_row(rgb, score, result["embedding"]))
        unlike = unlike_line(info.get("part_profile"), row)
        if unlike:  # still scored and answered: the hint is for the line software, the log and the review page
            row["unlike_part"] = body["unlike_part"] = unlike
        body["request_id"] = row["request_id"]
        # kept maps cover the image only (letterbox padding cut off), so whoever maps them back to the
        # image's pixels (regions, review page, export masks) just resizes them
        retained = self._retained(line, row, rgb, crop_to_content(amap, rgb.shape[:2], aspect), model_threshold,
                                  body["threshold_source"], aspect)
        return body, row, retained

    def _retained(self, line: str, row: dict[str, Any], rgb: np.ndarray, amap: np.ndarray, model_threshold: float,
                  source: str, aspect: str = "squash") -> RetainedItem | None:
        """The copy to keep of a flagged (or sampled normal) image, or None."""
        kind = self.retention.wants(line, bool(row["anomalous"])) if self.retainer else None
        if kind is None:
            return None
        info = {k: row[k] for k in ("score", "threshold", "anomalous", "decision", "model_version", "model_tag",
                                    "latency_ms")}
        # sample_rate: the chance this answer had to be kept; a verdict on a sampled part stands for
        # 1/sample_rate passed parts when `redi review threshold --suggest` estimates rates
        info.update(model_threshold=model_threshold, threshold_override=source == "override", threshold_source=source,
                    sample_rate=1.0 if kind == FLAGGED else self.retention.rate(line), aspect=aspect)
        if row.get("unlike_part"):
            info["unlike_part"] = row["unlike_part"]
        return RetainedItem(request_id=row["request_id"], line=line, time=_dt.datetime.fromisoformat(row["time"]),
                            kind=kind, rgb=rgb, anomaly_map=amap, info=info)

    @staticmethod
    def _add_pictures(body: dict[str, Any], threshold: float, rgb: np.ndarray, amap: np.ndarray, return_map: bool,
                      return_overlay: bool, return_regions: bool, min_region_area: int, aspect: str = "squash") -> None:
        """Map / overlay PNGs (model space: letterboxed like the input) and region boxes (image pixels), as asked."""
        if not (return_map or return_overlay or return_regions):
            return
        from redi.core.images import resize_rgb
        from redi.core.visualize import defect_regions, display_range, heatmap_rgb, overlay

        vmin, vmax = display_range(threshold, amap)
        if return_map:
            body["anomaly_map_png"] = _png_b64(heatmap_rgb(amap, vmin, vmax))
        if return_overlay:
            body["overlay_png"] = _png_b64(overlay(resize_rgb(rgb, amap.shape[:2], aspect), amap, vmin, vmax))
        if return_regions:
            content = crop_to_content(amap, rgb.shape[:2], aspect)  # no region in the letterbox padding
            sy, sx = rgb.shape[0] / content.shape[0], rgb.shape[1] / content.shape[1]
            regions = defect_regions(content, threshold, min_area=min_region_area)
            body["defect_regions"] = [
                {"x0": int(r["x0"] * sx), "y0": int(r["y0"] * sy), "x1": int(round(r["x1"] * sx)),
                 "y1": int(round(r["y1"] * sy)), "area_map_pixels": r["area"], "max_score": r["max_score"]}
                for r in regions]

    @bentoml.api(route="/metadata")
    async def metadata(self) -> dict:
        """Served lines with version, sha256, source, promotion, threshold, input size and evaluation metrics."""
        catalogue = await self._catalogue(fresh=True)
        lines = {}
        for name, info in catalogue["lines"].items():
            override = info["override"]
            lines[name] = {
                "model_version": info["model_version"], "model_tag": info["model_tag"], "sha256": info["sha256"],
                "promoted": info["promoted"], "promoted_by": info["promoted_by"], "threshold": info["threshold"],
                "model_threshold": info["model_threshold"],
                "threshold_override": None if override is None else {
                    **override, "active": str(override.get("model_version")) == info["model_version"]},
                "image_size": info["image_size"], "input_hw": list(input_size(info)),
                "aspect": info.get("aspect", "squash"), "backbone": info["backbone"], "profile": info["profile"],
                "metrics": info["metrics"], "runtime": info["runtime"]}
        return {
            "source": catalogue["source"], "lines": lines, "reload": catalogue["reload"],
            "detector": {k: catalogue[k] for k in ("runtime", "device", "threads")},
            "limits": {"max_upload_bytes": self.settings.max_upload_bytes, "max_pixels": self.settings.max_pixels,
                       "max_body_bytes": self.settings.max_body_bytes, "max_form_body_bytes": FORM_BODY_BYTES},
            "api_key_required": bool(self.settings.api_key), "open_mode": self.settings.open_mode,
            "health": dict(SERVICE_HEALTH),
            "production_log": str(self.settings.log_dir),
            "retention": self._retention_status(),
            "shadow": {"lines": {n: i["model_version"] for n, i in catalogue.get("shadows", {}).items()},
                       "errors": catalogue.get("shadow_errors", {}), "log": str(self.settings.log_dir / "shadow"),
                       **self.shadow.status()},
        }

    def _retention_status(self) -> dict[str, Any]:
        """Retention settings and this worker's counts (``/metadata``)."""
        policy = self.retention
        status: dict[str, Any] = {
            "enabled": self.retainer is not None, "normal_rate": policy.normal_rate, "line_rates": policy.line_rates,
            "max_days": policy.max_days, "max_per_line": policy.max_per_line, "queue_size": policy.queue_size,
            "queue_bytes": policy.queue_bytes}
        if self.retainer is not None:
            r = self.retainer
            status.update(queued=r.queue.qsize(), queued_bytes=r.queued_bytes, stored=r.stored, dropped=r.dropped, failed=r.failed,
                          deleted=r.deleted, review_db=repr(r.index) if r.index else None)
        return status

    @bentoml.api(route="/admin/reload")
    async def admin_reload(self) -> dict:
        """Have the detector service check the pointers and overrides now (see ``RediDetector.reload``)."""
        result = await self.detector.to_async.reload()
        await self._catalogue(fresh=True)
        return result


RediService.mount_asgi_app(create_review_app(), path="/review")
RediService.add_asgi_middleware(BodyLimitMiddleware)  # outermost of ours: nothing reads a body before it
RediService.add_asgi_middleware(ReadinessMiddleware)
RediService.add_asgi_middleware(GuardMiddleware)
