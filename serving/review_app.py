"""The review station: a server-rendered web page next to the API (mounted at ``/review``).

Why server-rendered (Starlette + Jinja2, no JavaScript framework): it is a list of images and
forms. Every page works with plain HTML forms and links, needs no build step or npm, and runs in
the service's own process behind the same guard as the API. The images (kept upload, overlay,
thresholded mask) are rendered from the object store on request.

Routes (under ``/review``; ``login`` is public, the rest needs the session cookie or the API key,
see ``serving/review_auth.py``):

- ``GET /`` every line with its summary (flagged today, confirmed, false-alarm rate by model version)
- ``GET /line/<line>`` the queue, newest first; filters ``model_version``, ``date_from``, ``date_to``,
  ``min_score``, ``max_score``, ``status`` (pending/judged/all), ``kind`` (flagged/sampled/all)
- ``GET /item/<request_id>`` one image, its map, mask, boxes and verdict history
- ``POST /item/<request_id>/verdict`` form or JSON: ``verdict`` (defect / false_alarm),
  ``defect_type``, ``accept_mask``, ``note`` (``by``/``X-Operator`` when called with the API key)
- ``GET /item/<request_id>/{image,overlay,mask}.png`` the pictures
- ``GET /api/summary/<line>`` and ``GET /api/queue/<line>`` the same data as JSON
"""

from __future__ import annotations

import hmac
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from redi.core.errors import RediError
from redi.ops.monitoring import check_line_name
from redi.ops.retention import load_map
from redi.ops.review import ReviewDB, ReviewError, default_db_url
from redi.ops.object_store import ObjectStore, store_from_env
from serving.review_auth import COOKIE, cookie_value, csrf_token, make_session, read_session

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))
PAGE_SIZE = 50


class ReviewContext:
    """The store, the database and the key, opened once per worker on first use."""

    _instance: "ReviewContext | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.api_key = os.environ.get("REDI_API_KEY", "")
        self.store: ObjectStore = store_from_env()
        self.db = ReviewDB(default_db_url())

    @classmethod
    def get(cls) -> "ReviewContext":
        with cls._lock:
            if cls._instance is None:
                cls._instance = ReviewContext()
            return cls._instance


def _session(request: Request, ctx: ReviewContext) -> tuple[str | None, str]:
    token = cookie_value(request.headers.get("cookie", ""))
    return read_session(ctx.api_key, token), token


def _header_key_ok(request: Request, ctx: ReviewContext) -> bool:
    given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    return bool(given) and hmac.compare_digest(given.encode(), ctx.api_key.encode())


def _error(request: Request, status: int, message: str) -> Response:
    if "application/json" in request.headers.get("accept", "") or request.url.path.startswith("/review/api/"):
        return JSONResponse({"error": message, "status": status}, status_code=status)
    return TEMPLATES.TemplateResponse(request, "review_error.html", {"status": status, "message": message},
                                      status_code=status)


def _here(request: Request) -> str:
    """The page's own path and query without a previous ``judged`` note (where a verdict form returns)."""
    query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "judged"])
    return request.url.path + (f"?{query}" if query else "")


def _float_arg(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError as exc:
        raise ReviewError(f"filter {name}={raw!r} is not a number") from exc


def _filters(request: Request) -> dict[str, Any]:
    q = request.query_params
    status, kind = q.get("status", "all"), q.get("kind", "flagged")
    if status not in ("all", "pending", "judged") or kind not in ("flagged", "sampled", "all"):
        raise ReviewError("status must be all, pending or judged; kind flagged, sampled or all")
    try:
        offset = max(0, int(q.get("offset", "0") or 0))
    except ValueError as exc:
        raise ReviewError(f"offset={q.get('offset')!r} is not a number") from exc
    return {"model_version": q.get("model_version", "").strip(), "date_from": q.get("date_from", "").strip(),
            "date_to": q.get("date_to", "").strip(), "min_score": _float_arg(request, "min_score"),
            "max_score": _float_arg(request, "max_score"), "status": status, "kind": kind, "offset": offset}


# ----------------------------------------------------------------------------- pages
def index(request: Request) -> Response:
    """Every line and its summary."""
    ctx = ReviewContext.get()
    user, _ = _session(request, ctx)
    summaries = [ctx.db.summary(line) for line in ctx.db.lines()]
    return TEMPLATES.TemplateResponse(request, "review_index.html", {"summaries": summaries, "user": user})


def line_page(request: Request) -> Response:
    """The line's queue, newest first, with filters, pictures, boxes and verdict forms."""
    ctx = ReviewContext.get()
    line = request.path_params["line"]
    try:
        check_line_name(line)
        filters = _filters(request)
    except RediError as exc:
        return _error(request, 422, str(exc))
    user, token = _session(request, ctx)
    items = ctx.db.queue(line, limit=PAGE_SIZE, **filters)
    kept = {k: v for k, v in filters.items() if v not in ("", None) and k != "offset"}
    older = (f"?{urlencode({**kept, 'offset': filters['offset'] + PAGE_SIZE})}" if len(items) == PAGE_SIZE else "")
    return TEMPLATES.TemplateResponse(request, "review_line.html", {
        "line": line, "items": items, "filters": filters, "summary": ctx.db.summary(line), "user": user,
        "versions": ctx.db.model_versions(line), "csrf": csrf_token(ctx.api_key, token) if user else "",
        "older": older, "here": _here(request)})


def item_page(request: Request) -> Response:
    """One kept image with its verdict history."""
    ctx = ReviewContext.get()
    try:
        item = ctx.db.get(request.path_params["request_id"])
    except ReviewError as exc:
        return _error(request, exc.status, str(exc))
    user, token = _session(request, ctx)
    return TEMPLATES.TemplateResponse(request, "review_item.html", {
        "item": item, "user": user, "csrf": csrf_token(ctx.api_key, token) if user else "",
        "here": _here(request)})


def picture(request: Request) -> Response:
    """``image.png`` (the kept upload), ``overlay.png`` (map over image) or ``mask.png`` (map > threshold)."""
    from redi.core.images import decode_rgb
    from redi.core.visualize import display_range, overlay, resize_map, to_png_bytes

    ctx = ReviewContext.get()
    try:
        item = ctx.db.get(request.path_params["request_id"])
    except ReviewError as exc:
        return _error(request, exc.status, str(exc))
    what = request.path_params["what"]
    if what not in ("image", "overlay", "mask"):
        return _error(request, 404, f"no picture {what!r}: use image.png, overlay.png or mask.png")
    image = ctx.store.get_bytes(item["image_key"])
    if image is None:
        ctx.db.mark_expired([item["request_id"]])
        return _error(request, 410, f"the image of request {item['request_id']} is no longer kept (retention limits)")
    if what == "image":
        return Response(image, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
    amap = load_map(ctx.store, item["map_key"])
    if amap is None:
        return _error(request, 410, f"the anomaly map of request {item['request_id']} is no longer kept")
    rgb = decode_rgb(image)
    if what == "overlay":
        vmin, vmax = display_range(item["threshold"], amap)
        png = to_png_bytes(overlay(rgb, amap, vmin, vmax))
    else:
        mask = resize_map(amap, rgb.shape[:2]) > item["threshold"]
        png = to_png_bytes(np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=2))
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


async def verdict(request: Request) -> Response:
    """Store a verdict (form post from the page, or JSON with the API key)."""
    from starlette.concurrency import run_in_threadpool

    ctx = ReviewContext.get()
    is_json = request.headers.get("content-type", "").startswith("application/json")
    data: dict[str, Any] = dict(await request.json()) if is_json else dict(await request.form())
    user, token = _session(request, ctx)
    if user and not _header_key_ok(request, ctx):
        if not hmac.compare_digest(str(data.get("csrf", "")), csrf_token(ctx.api_key, token)):
            return _error(request, 403, "the form is stale or came from another site (CSRF check failed); "
                                        "reload the page and judge again")
    by = user or str(data.get("by") or request.headers.get("x-operator", "")).strip()
    request_id = request.path_params["request_id"]

    def store() -> dict[str, Any]:
        item = ctx.db.get(request_id)
        return ctx.db.add_verdict(request_id, str(data.get("verdict", "")), by=by, note=str(data.get("note", "")),
                                  defect_type=str(data.get("defect_type", "")),
                                  accept_mask=str(data.get("accept_mask", "")).lower() in ("1", "true", "on", "yes"),
                                  image_exists=ctx.store.exists(item["image_key"]))

    try:
        stored = await run_in_threadpool(store)
    except ReviewError as exc:
        return _error(request, exc.status, str(exc))
    if is_json or "application/json" in request.headers.get("accept", ""):
        return JSONResponse(stored)
    target = str(data.get("next") or "/review/")
    if not target.startswith("/review/"):  # only back into the review pages
        target = "/review/"
    return RedirectResponse(target + ("&" if "?" in target else "?") + f"judged={request_id}#item-{request_id}",
                            status_code=303)


def api_summary(request: Request) -> Response:
    """The line's summary as JSON."""
    return JSONResponse(ReviewContext.get().db.summary(request.path_params["line"], request.query_params.get("day")))


def api_queue(request: Request) -> Response:
    """The line's queue as JSON (same filters as the page)."""
    try:
        filters = _filters(request)
    except RediError as exc:
        return _error(request, 422, str(exc))
    return JSONResponse(ReviewContext.get().db.queue(request.path_params["line"], limit=PAGE_SIZE, **filters))


# ----------------------------------------------------------------------------- login
def login_form(request: Request) -> Response:
    """The login form (public)."""
    ctx = ReviewContext.get()
    return TEMPLATES.TemplateResponse(request, "review_login.html", {
        "next": request.query_params.get("next", "/review/"), "needs_key": bool(ctx.api_key), "error": ""})


async def login(request: Request) -> Response:
    """Check name and key; set the session cookie; go where the operator was going."""
    ctx = ReviewContext.get()
    form = await request.form()
    name, key = str(form.get("name", "")).strip(), str(form.get("key", ""))
    target = str(form.get("next") or "/review/")
    target = target if target.startswith("/review/") else "/review/"
    error = ""
    if not name:
        error = "type your name: it is recorded with every verdict"
    elif ctx.api_key and not hmac.compare_digest(key.encode(), ctx.api_key.encode()):
        error = "wrong key: use the service's API key (REDI_API_KEY)"
    if error:
        return TEMPLATES.TemplateResponse(request, "review_login.html", {
            "next": target, "needs_key": bool(ctx.api_key), "error": error}, status_code=401)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, make_session(ctx.api_key, name), max_age=12 * 3600, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/review")
    return response


def logout(request: Request) -> Response:
    """Forget the session cookie."""
    response = RedirectResponse("/review/login", status_code=303)
    response.delete_cookie(COOKIE, path="/review")
    return response


def create_review_app() -> Starlette:
    """The ASGI app the service mounts at ``/review``."""
    return Starlette(routes=[
        Route("/", index), Route("/login", login_form, methods=["GET"]), Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST", "GET"]),
        Route("/line/{line}", line_page), Route("/item/{request_id}", item_page),
        Route("/item/{request_id}/{what:str}.png", picture),
        Route("/item/{request_id}/verdict", verdict, methods=["POST"]),
        Route("/api/summary/{line}", api_summary), Route("/api/queue/{line}", api_queue),
    ])


__all__ = ["PAGE_SIZE", "ReviewContext", "create_review_app"]
