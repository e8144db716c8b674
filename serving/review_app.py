"""The review station: a server-rendered web page next to the API (mounted at ``/review``).

Why server-rendered (Starlette + Jinja2, no JavaScript framework): it is a list of images and
forms. Every page works with plain HTML forms and links, needs no build step or npm, and runs in
the service's own process behind the same guard as the API. The images (kept upload, overlay,
thresholded mask) are rendered from the object store on request.

Routes (under ``/review``; ``login`` is public, the rest needs an operator's session or the API
key, see ``serving/review_auth.py``):

- ``GET|POST /login`` the login form (operator accounts: ``redi review user add``); ``POST /logout``
- ``GET /`` every line with its summary (flagged today, confirmed, false-alarm rate by model version)
- ``GET /line/<line>`` the queue, newest first; filters ``model_version``, ``date_from``, ``date_to``,
  ``min_score``, ``max_score``, ``status`` (pending/judged/all), ``kind`` (flagged/sampled/disagreement/all)
- ``GET /item/<request_id>`` one image, its map, mask, boxes and verdict history
- ``POST /item/<request_id>/verdict`` form or JSON: ``verdict`` (defect / false_alarm / bad_image),
  ``defect_type`` (one of the line's ``line.defect_types``), ``accept_mask``, ``note``, ``drawn_mask``
  (a defect's mask drawn on the page: a PNG data URL of the image's size)
  (``by``/``X-Operator`` when called with the API key)
- ``POST /item/<request_id>/undo`` withdraw the verdict that counts (the operator's undo)
- ``GET /item/<request_id>/{image,map,overlay,mask,threshold_mask}.png`` the pictures
  (``serving/review_pictures.py``); ``drawn_mask.png`` the mask drawn with the verdict that counts
- ``GET /shadow/<line>`` shadow mode: the candidate beside production on live traffic (agreement, each
  model's flag rate, the parts where they disagree with links to judge them), from the shadow log
  (``redi.ops.shadow``, ``<REDI_LOG_DIR>/shadow/``); ``?version=`` picks an earlier candidate
- ``GET /api/summary/<line>`` and ``GET /api/queue/<line>`` the same data as JSON; ``GET /api/shadow/<line>``
  the shadow report
"""

from __future__ import annotations

import os
import threading
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import urlencode

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from redi.core.config import LineConfig, read_config_file
from redi.core.errors import RediError
from redi.ops.monitoring import check_line_name
from redi.ops.retention import load_map
from redi.ops.shadow import fmt_rate, shadow_report, shadow_rows
from redi.ops.review import KEPT_KINDS, InvalidVerdict, ReviewDB, ReviewError, default_db_url
from redi.ops.review_accounts import LOGIN_MAX_FAILURES, LOGIN_WINDOW_S, OperatorAccounts
from redi.ops.object_store import ObjectStore, store_from_env
from serving.settings import ServingSettings, serving_store
from serving.review_auth import (SESSION_ID, Principal, ReviewGuard, ReviewSecurity, ReviewSessions, csrf_ok,
                                 csrf_token, principal_of, safe_next, same_origin)

from serving.review_pictures import PICTURES, colour_stops, drawn_mask_png, render

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))
TEMPLATES.env.globals["colour_stops"] = colour_stops()
TEMPLATES.env.filters["yes_no"] = lambda value: "Yes" if value else "No"
TEMPLATES.env.filters["rate"] = fmt_rate
TEMPLATES.env.globals["VERDICT_LABELS"] = {"defect": "real defect", "false_alarm": "false alarm",
                                           "bad_image": "bad image / not a part"}
PAGE_SIZE = 50
SHADOW_PAGE = 200  # disagreeing parts listed on the shadow page (newest first)
MAX_DRAWN_MASK_BYTES = 16 * 1024 * 1024  # a drawn mask's data URL (a mostly flat PNG: far less in practice)
LINES_DIR_ENV = "REDI_LINES_DIR"  # where the line config files are (default pipelines/lines, from the service's cwd)


def line_defect_types(line: str) -> list[str]:
    """The defect types the line's config file lists (``line.defect_types``), else the schema's default.

    Read on every call (a small YAML file): a supervisor who adds a type sees it on the next page."""
    path = Path(os.environ.get(LINES_DIR_ENV, "").strip() or "pipelines/lines") / f"{line}.yaml"
    types = read_config_file(path).get("line", {}).get("defect_types") if path.is_file() else None
    return [str(t) for t in types] if types else list(LineConfig().defect_types)


def _checked_defect_type(line: str, verdict: str, defect_type: str) -> str:
    """A defect verdict's type: one of the line's types (the first when none is given)."""
    if verdict != "defect":
        return ""
    allowed = line_defect_types(line)
    chosen = defect_type.strip() or allowed[0]
    if chosen not in allowed:
        raise InvalidVerdict(f"defect type {chosen!r} is not one of line {line}'s types {allowed}; a supervisor adds "
                             f"a new type to line.defect_types in its line file ({LINES_DIR_ENV}/{line}.yaml)")
    return chosen


class ReviewContext:
    """The store, the database, the accounts and the secrets, opened once per worker on first use."""

    _instance: "ReviewContext | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.security = ReviewSecurity.from_env()
        # the serving store's short timeouts: a hung store fails a review page quickly instead of holding it
        self.store: ObjectStore = serving_store(ServingSettings.from_env()) or store_from_env()
        self.db = ReviewDB(default_db_url())
        self.accounts = OperatorAccounts(self.db)

    @classmethod
    def get(cls) -> "ReviewContext":
        with cls._lock:
            if cls._instance is None:
                cls._instance = ReviewContext()
            return cls._instance


def _who(request: Request, ctx: ReviewContext) -> tuple[str | None, str]:
    """The logged-in operator (None for the API key or open mode) and their forms' CSRF token."""
    principal = principal_of(request.scope)
    if principal is None or principal.kind != "session":
        return None, ""
    return principal.username, csrf_token(ctx.security.session_secret, principal.token)


def _error(request: Request, status: int, message: str) -> Response:
    if "application/json" in request.headers.get("accept", "") or request.url.path.startswith("/review/api/"):
        return JSONResponse({"error": message, "status": status}, status_code=status)
    return TEMPLATES.TemplateResponse(request, "review_error.html", {"status": status, "message": message},
                                      status_code=status)


def _here(request: Request) -> str:
    """The page's own path and query without a previous ``judged``/``undone`` note (where a form returns)."""
    query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k not in ("judged", "undone")])
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
    if status not in ("all", "pending", "judged") or kind not in (*KEPT_KINDS, "all"):
        raise ReviewError(f"status must be all, pending or judged; kind one of {', '.join((*KEPT_KINDS, 'all'))}")
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
    user, csrf = _who(request, ctx)
    summaries = [ctx.db.summary(line) for line in ctx.db.lines()]
    return TEMPLATES.TemplateResponse(request, "review_index.html", {"summaries": summaries, "user": user,
                                                                         "csrf": csrf})


def line_page(request: Request) -> Response:
    """The line's queue, newest first, with filters, pictures, boxes and verdict forms."""
    ctx = ReviewContext.get()
    line = request.path_params["line"]
    try:
        check_line_name(line)
        filters = _filters(request)
    except RediError as exc:
        return _error(request, 422, str(exc))
    user, csrf = _who(request, ctx)
    items = ctx.db.queue(line, limit=PAGE_SIZE, **filters)
    kept = {k: v for k, v in filters.items() if v not in ("", None) and k != "offset"}
    older = (f"?{urlencode({**kept, 'offset': filters['offset'] + PAGE_SIZE})}" if len(items) == PAGE_SIZE else "")
    return TEMPLATES.TemplateResponse(request, "review_line.html", {
        "line": line, "items": items, "filters": filters, "summary": ctx.db.summary(line), "user": user,
        "versions": ctx.db.model_versions(line), "csrf": csrf, "defect_types": line_defect_types(line),
        "older": older, "here": _here(request), "kinds": [*KEPT_KINDS, "all"]})


def item_page(request: Request) -> Response:
    """One kept image with its verdict history."""
    ctx = ReviewContext.get()
    try:
        item = ctx.db.get(request.path_params["request_id"])
    except ReviewError as exc:
        return _error(request, exc.status, str(exc))
    user, csrf = _who(request, ctx)
    return TEMPLATES.TemplateResponse(request, "review_item.html", {
        "item": item, "user": user, "csrf": csrf, "defect_types": line_defect_types(item["line"]),
        "here": _here(request)})


def _shadow(request: Request) -> dict[str, Any]:
    """The line's shadow report (the candidate of ``?version=``, default the newest logged) and which of
    its disagreeing parts are in the review database (kept: they can be judged)."""
    line = check_line_name(request.path_params["line"])
    version = request.query_params.get("version", "").strip() or None
    rows = shadow_rows(ServingSettings.from_env().log_dir, line)
    report = shadow_report(rows, line, version)
    report["candidates"] = sorted({str(r.get("shadow_version")) for r in rows})
    ctx = ReviewContext.get()
    report["n_disagreements"] = len(report["disagreements"])
    report["disagreements"] = report["disagreements"][::-1][:SHADOW_PAGE]  # newest first; the CLI lists all
    for part in report["disagreements"]:
        try:
            item = ctx.db.get(str(part["request_id"]))
            part["kept"], part["kind"], part["verdict"] = True, item.get("kind"), item.get("verdict")
        except ReviewError:  # not kept (retention off, or its copy is still on the way)
            part["kept"], part["kind"], part["verdict"] = False, None, None
    return report


def shadow_page(request: Request) -> Response:
    """Shadow mode's comparison for one line (see the module docstring)."""
    try:
        report = _shadow(request)
    except RediError as exc:
        return _error(request, 422, str(exc))
    user, csrf = _who(request, ReviewContext.get())
    return TEMPLATES.TemplateResponse(request, "review_shadow.html", {
        "line": report["line"], "report": report, "user": user, "csrf": csrf})


def api_shadow(request: Request) -> Response:
    """The shadow page's data as JSON."""
    try:
        return JSONResponse(_shadow(request))
    except RediError as exc:
        return _error(request, 422, str(exc))


def picture(request: Request) -> Response:
    """``image.png`` (the kept upload), ``map.png``, ``overlay.png`` (map over image) or ``mask.png``
    (where the map is above the threshold): ``serving/review_pictures.py``."""
    from redi.core.images import decode_rgb
    from redi.core.visualize import to_png_bytes

    ctx = ReviewContext.get()
    try:
        item = ctx.db.get(request.path_params["request_id"])
    except ReviewError as exc:
        return _error(request, exc.status, str(exc))
    what = request.path_params["what"]
    if what == "drawn_mask":
        key = (item["verdict"] or {}).get("mask_key")
        drawn = ctx.store.get_bytes(key) if key else None
        if drawn is None:
            return _error(request, 404, f"request {item['request_id']}'s verdict has no drawn mask")
        return Response(drawn, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
    if what not in PICTURES:
        return _error(request, 404, f"no picture {what!r}: use one of {', '.join(p + '.png' for p in PICTURES)}")
    image = ctx.store.get_bytes(item["image_key"])
    if image is None:
        ctx.db.mark_expired([item["request_id"]])
        return _error(request, 410, f"the image of request {item['request_id']} is no longer kept (retention limits)")
    if what == "image":
        return Response(image, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
    amap = load_map(ctx.store, item["map_key"])
    if amap is None:
        return _error(request, 410, f"the anomaly map of request {item['request_id']} is no longer kept")
    png = to_png_bytes(render(what, decode_rgb(image), np.asarray(amap), float(item["threshold"])))
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


async def verdict(request: Request) -> Response:
    """Store a verdict (form post from the page, or JSON with the API key).

    A logged-in operator's verdict names their account (``by`` and ``operator``); with the API key
    (scripts) or in open mode, ``by`` is whoever the request names (``by`` / ``X-Operator``)."""
    ctx = ReviewContext.get()
    principal: Principal = principal_of(request.scope)  # the guard let nobody else in
    is_json = request.headers.get("content-type", "").startswith("application/json")
    # a drawn mask travels as a PNG data URL in one field: allow it more than Starlette's 1 MB part default
    data: dict[str, Any] = (dict(await request.json()) if is_json else
                            dict(await request.form(max_files=0, max_part_size=MAX_DRAWN_MASK_BYTES)))
    if not csrf_ok(ctx.security.session_secret, principal,
                   str(data.get("csrf") or request.headers.get("x-csrf-token", ""))):
        return _error(request, 403, "the form is stale or came from another site (CSRF check failed); "
                                    "reload the page and judge again")
    by = principal.username if principal.kind == "session" else str(data.get("by") or
                                                                    request.headers.get("x-operator", "")).strip()
    request_id = request.path_params["request_id"]

    def store() -> dict[str, Any]:
        item = ctx.db.get(request_id)
        kind = str(data.get("verdict", ""))
        defect_type = _checked_defect_type(item["line"], kind, str(data.get("defect_type", "")))
        mask_key = _store_drawn_mask(ctx, item, str(data.get("drawn_mask") or "")) if kind == "defect" else None
        return ctx.db.add_verdict(request_id, kind, by=by, note=str(data.get("note", "")),
                                  defect_type=defect_type, mask_key=mask_key,
                                  accept_mask=str(data.get("accept_mask", "")).lower() in ("1", "true", "on", "yes"),
                                  image_exists=ctx.store.exists(item["image_key"]), operator=principal.operator)

    try:
        stored = await run_in_threadpool(store)
    except ReviewError as exc:
        return _error(request, exc.status, str(exc))
    if is_json or "application/json" in request.headers.get("accept", ""):
        return JSONResponse(stored)
    target = safe_next(str(data.get("next") or ""))  # only back into the review pages
    return RedirectResponse(target + ("&" if "?" in target else "?") + f"judged={request_id}#item-{request_id}",
                            status_code=303)


def _store_drawn_mask(ctx: ReviewContext, item: dict[str, Any], data_url: str) -> str | None:
    """Check the drawn mask and store it in the kept image's folder (retention deletes it with the image);
    its key, or None when none was drawn."""
    if not data_url:
        return None
    try:
        png = drawn_mask_png(data_url, int(item["width"]), int(item["height"]))
    except ValueError as exc:
        raise InvalidVerdict(f"{exc}; nothing was stored") from exc
    key = f"{item['image_key'].rsplit('/', 1)[0]}/drawn_mask_{uuid.uuid4().hex[:12]}.png"
    ctx.store.put_bytes(key, png)
    return key


async def undo(request: Request) -> Response:
    """Withdraw the verdict that counts (form post from the page, or JSON with the API key); the previous
    verdict, or none, counts again. An exported verdict cannot be undone (judge again instead)."""
    ctx = ReviewContext.get()
    principal: Principal = principal_of(request.scope)
    is_json = request.headers.get("content-type", "").startswith("application/json")
    data: dict[str, Any] = dict(await request.json()) if is_json else dict(await request.form(max_files=0))
    if not csrf_ok(ctx.security.session_secret, principal,
                   str(data.get("csrf") or request.headers.get("x-csrf-token", ""))):
        return _error(request, 403, "the form is stale or came from another site (CSRF check failed); "
                                    "reload the page and undo again")
    by = principal.username if principal.kind == "session" else str(data.get("by") or
                                                                    request.headers.get("x-operator", "")).strip()
    request_id = request.path_params["request_id"]
    try:
        now_counts = await run_in_threadpool(ctx.db.withdraw_verdict, request_id, by)
    except ReviewError as exc:
        return _error(request, exc.status, str(exc))
    if is_json or "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"request_id": request_id, "verdict": now_counts})
    target = safe_next(str(data.get("next") or ""))
    return RedirectResponse(target + ("&" if "?" in target else "?") + f"undone={request_id}#item-{request_id}",
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
def _client(request: Request) -> str:
    """The address the rate limit counts (the peer; behind a proxy every operator shares the proxy's)."""
    return request.client.host if request.client else "unknown"


def _login_page(request: Request, ctx: ReviewContext, target: str, error: str = "", status: int = 200,
                username: str = "", headers: dict[str, str] | None = None) -> Response:
    return TEMPLATES.TemplateResponse(request, "review_login.html", {
        "next": target, "error": error, "username": username, "logins": ctx.security.logins,
        "open_mode": ctx.security.open_mode, "max_failures": LOGIN_MAX_FAILURES}, status_code=status,
        headers=headers)


def login_form(request: Request) -> Response:
    """The login form (public)."""
    ctx = ReviewContext.get()
    return _login_page(request, ctx, safe_next(request.query_params.get("next")))


async def login(request: Request) -> Response:
    """Check the operator's name and password (rate limited); start a session; go where they were going."""
    ctx = ReviewContext.get()
    if (request.headers.get("origin") or request.headers.get("referer")) and not same_origin(request.headers):
        return _error(request, 403, "this login form came from another site (Origin/Referer is not this host)")
    # a public route: no file parts, few small fields (nothing is spooled to disk)
    form = await request.form(max_files=0, max_fields=8, max_part_size=4096)
    username, password = str(form.get("username", "")).strip(), str(form.get("password", ""))
    target = safe_next(str(form.get("next") or ""))
    if not ctx.security.logins:
        return _login_page(request, ctx, target, "logins are off: this service runs in open mode without "
                                                 "REDI_SESSION_SECRET; the pages are open to everyone", 503)
    if not username or not password:
        return _login_page(request, ctx, target, "type your username and password", 401, username)
    result = await run_in_threadpool(ctx.accounts.login, username, password, _client(request))
    if result.retry_after:
        return _login_page(request, ctx, target, f"too many failed logins ({LOGIN_MAX_FAILURES} within "
                                                 f"{LOGIN_WINDOW_S / 60:g} minutes for this name or from this "
                                                 f"address); try again in {result.retry_after} s", 429, username,
                           headers={"Retry-After": str(result.retry_after)})
    if not result.ok:
        return _login_page(request, ctx, target, "wrong username or password (operator accounts are created with "
                                                 "`redi review user add`; the service's API key is not a password)",
                           401, username)
    request.session.clear()
    request.session[SESSION_ID] = result.token  # the cookie carries only this (signed); the DB holds its hash
    return RedirectResponse(target, status_code=303)


async def logout(request: Request) -> Response:
    """End the session: revoked in the database (a copy of the cookie stops working too) and forgotten."""
    ctx = ReviewContext.get()
    principal: Principal = principal_of(request.scope)
    if principal.kind == "session":
        form = await request.form(max_files=0, max_fields=8, max_part_size=4096)
        if not csrf_ok(ctx.security.session_secret, principal, str(form.get("csrf", ""))):
            return _error(request, 403, "the logout form is stale (CSRF check failed); reload the page")
        await run_in_threadpool(ctx.accounts.logout, principal.token)
    if "session" in request.scope:
        request.session.clear()
    return RedirectResponse("/review/login", status_code=303)


@asynccontextmanager
async def _lifespan(_app: Starlette) -> AsyncIterator[None]:
    """Refuse to serve without the session signing secret (unless open mode). ``bentoml serve`` already exits
    with the reason before any worker starts (``serving.service.check_access``); this holds wherever the app
    is mounted without that hook (BentoML runs a mounted Starlette app's lifespan in each worker)."""
    ReviewSecurity.from_env().check()
    yield


def create_review_app() -> Starlette:
    """The ASGI app the service mounts at ``/review``."""
    def security() -> ReviewSecurity:
        return ReviewContext.get().security

    def accounts() -> OperatorAccounts:
        return ReviewContext.get().accounts

    return Starlette(lifespan=_lifespan, middleware=[
        Middleware(ReviewSessions, security=security),  # outermost: the signed cookie -> request.session
        Middleware(ReviewGuard, security=security, accounts=accounts),
    ], routes=[
        Route("/", index), Route("/login", login_form, methods=["GET"]), Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/line/{line}", line_page), Route("/item/{request_id}", item_page),
        Route("/item/{request_id}/{what:str}.png", picture),
        Route("/item/{request_id}/verdict", verdict, methods=["POST"]),
        Route("/item/{request_id}/undo", undo, methods=["POST"]),
        Route("/api/summary/{line}", api_summary), Route("/api/queue/{line}", api_queue),
        Route("/shadow/{line}", shadow_page), Route("/api/shadow/{line}", api_shadow),
    ])


__all__ = ["PAGE_SIZE", "ReviewContext", "create_review_app"]
