"""Who may use the review page: operator accounts, revocable sessions, CSRF and origin checks.

Operators log in at ``/review/login`` with their own account (``redi review user add``; scrypt
hashes in the review database, ``redi.ops.review_accounts``). The session is server-side: the
cookie ``redi_review`` holds only the session's random token, signed by Starlette's
``SessionMiddleware`` under ``REDI_SESSION_SECRET`` (a secret of its own: never the API key),
``HttpOnly``, ``SameSite=Strict``, ``Secure`` on HTTPS, path ``/review``, 12 h. The database keeps
the token's hash, so logout, a password change and ``redi review user disable`` end a session at
once, and a replayed old cookie is refused.

:class:`ReviewGuard` runs inside the review app (``serving/review_app.py``) and denies by
default: every route but ``/login`` needs a live session or the service's API key in a header
(``X-API-Key`` / ``Authorization: Bearer``; scripts). A session's state-changing requests must
come from this host's own pages: the ``Origin`` (or, without one, ``Referer``) header must name
the request's ``Host`` and forms carry a CSRF token derived from the session. Open mode
(``REDI_OPEN_MODE``, no API key) lets anyone in; the verdict then names whoever the form says.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote, unquote, urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.middleware.sessions import SessionMiddleware
from starlette.responses import JSONResponse, RedirectResponse

from redi.core.errors import RediError
from redi.ops.review_accounts import SESSION_HOURS, OperatorAccounts
from serving.settings import env_flag

COOKIE = "redi_review"
SESSION_ID = "sid"  # the only thing the signed cookie carries
PRINCIPAL = "redi.review.principal"  # where the guard leaves who is asking, in the request scope
REVIEW_ROOT = "/review/"
PUBLIC_ROUTES = frozenset({"/login"})  # inside the review app
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SECRET_MIN_CHARS = 32
_UNSAFE_NEXT = re.compile(r"[\\\x00-\x20\x7f]")


class ReviewSecurityError(RediError):
    """The review page's security settings are missing or unsafe: the service refuses to start."""


@dataclass(frozen=True)
class ReviewSecurity:
    """The review page's secrets: the machine API key, the cookie signing secret, and open mode."""

    api_key: str = ""
    session_secret: str = ""
    open_mode: bool = False

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "ReviewSecurity":
        """``REDI_API_KEY``, ``REDI_SESSION_SECRET`` and ``REDI_OPEN_MODE`` from the environment."""
        env = dict(os.environ) if env is None else env
        return cls(api_key=env.get("REDI_API_KEY", ""), session_secret=env.get("REDI_SESSION_SECRET", ""),
                   open_mode=env_flag("REDI_OPEN_MODE", env))

    @property
    def logins(self) -> bool:
        """Whether operator logins are possible (a signing secret is set)."""
        return bool(self.session_secret)

    def check(self) -> None:
        """Raise :class:`ReviewSecurityError` when the page cannot run safely with these settings."""
        how = ("set REDI_SESSION_SECRET to a random string of its own, e.g. the output of "
               "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        if not self.session_secret:
            if self.open_mode:
                return
            raise ReviewSecurityError(
                "REDI_SESSION_SECRET is not set: the review page (/review/) signs its operators' login cookies with "
                f"it; {how}, or run the whole service in open mode (REDI_OPEN_MODE=1: nothing is protected)")
        if len(self.session_secret) < SECRET_MIN_CHARS:
            raise ReviewSecurityError(f"REDI_SESSION_SECRET has {len(self.session_secret)} characters; use at least "
                                      f"{SECRET_MIN_CHARS}: {how}")
        if self.api_key and hmac.compare_digest(self.session_secret.encode(), self.api_key.encode()):
            raise ReviewSecurityError(f"REDI_SESSION_SECRET equals REDI_API_KEY; the two must differ (whoever holds "
                                      f"the machine key must not be able to forge operator logins): {how}")


@dataclass(frozen=True)
class Principal:
    """Who is asking: ``session`` (a logged-in operator), ``key`` (the API key, a script) or ``open`` (open mode)."""

    kind: str
    username: str = ""
    token: str = ""

    @property
    def operator(self) -> str | None:
        """The logged-in account, or None."""
        return self.username if self.kind == "session" else None


def principal_of(scope: dict[str, Any]) -> Principal | None:
    """What :class:`ReviewGuard` found out about this request (None on the public login route without a session)."""
    return scope.get(PRINCIPAL)


def csrf_token(secret: str, session_token: str) -> str:
    """The CSRF token a session's forms carry (HMAC of the session token under the signing secret)."""
    return hmac.new(secret.encode(), b"csrf:" + session_token.encode(), hashlib.sha256).hexdigest()


def csrf_ok(secret: str, principal: Principal, given: str) -> bool:
    """Whether ``given`` is the session's CSRF token (only sessions need one)."""
    return principal.kind != "session" or hmac.compare_digest(str(given).encode(),
                                                              csrf_token(secret, principal.token).encode())


def same_origin(headers: Headers) -> bool:
    """Whether the request's ``Origin`` (or ``Referer`` when the browser sent no Origin) names its ``Host``.

    A request without either header, or with ``Origin: null`` (sandboxed frames, some redirects), is
    not known to come from this host's pages and counts as foreign."""
    host = headers.get("host", "").strip().lower()
    source = headers.get("origin") or headers.get("referer") or ""
    if not host or not source or source == "null":
        return False
    try:
        return urlsplit(source).netloc.lower() == host
    except ValueError:
        return False


def safe_next(target: str | None, default: str = REVIEW_ROOT) -> str:
    """``target`` when it is a path under ``/review/`` of this host, else ``default``.

    Refused: other hosts (``https://...``, ``//host``), backslashes and whitespace (browsers turn
    ``/\\host`` into ``//host`` and drop tabs and newlines), ``.``/``..`` segments, also percent-encoded,
    that would climb out of ``/review/``."""
    target = (target or "").strip()
    if not target.startswith(REVIEW_ROOT) or _UNSAFE_NEXT.search(target):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    path = unquote(parts.path)
    if _UNSAFE_NEXT.search(path) or path.startswith("//") or any(seg in (".", "..") for seg in path.split("/")):
        return default
    if not (posixpath.normpath(path) + "/").startswith(REVIEW_ROOT):
        return default
    return target


def _route_path(scope: dict[str, Any]) -> str:
    """The path inside the review app (the mount's ``root_path`` removed)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


class ReviewSessions:
    """Starlette's ``SessionMiddleware`` for the review cookie, ``Secure`` when the request came over HTTPS.

    Without a signing secret (open mode only, :meth:`ReviewSecurity.check`) there are no sessions."""

    def __init__(self, app: Any, security: Callable[[], ReviewSecurity]) -> None:
        settings = security()
        self.app = app
        self.by_scheme: dict[bool, Any] = {}
        if settings.logins:
            common = dict(secret_key=settings.session_secret, session_cookie=COOKIE, path="/review",
                          max_age=int(SESSION_HOURS * 3600), same_site="strict")
            self.by_scheme = {tls: SessionMiddleware(app, https_only=tls, **common) for tls in (False, True)}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if not self.by_scheme or scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        await self.by_scheme[scope.get("scheme") == "https"](scope, receive, send)


class ReviewGuard:
    """Deny by default: find out who is asking and refuse whoever may not (inside :class:`ReviewSessions`)."""

    def __init__(self, app: Any, security: Callable[[], ReviewSecurity],
                 accounts: Callable[[], OperatorAccounts]) -> None:
        self.app = app
        self.security = security()
        self.accounts = accounts

    def identify(self, scope: dict[str, Any], headers: Headers) -> Principal | None | str:
        """The request's :class:`Principal`, None (nobody), or an error message (a wrong API key)."""
        key = self.security.api_key
        given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
        if given:
            if key and hmac.compare_digest(given.encode(), key.encode()):
                return Principal("key")
            if key:
                return "the API key is wrong; send the key the server was started with (REDI_API_KEY)"
        token = str((scope.get("session") or {}).get(SESSION_ID, ""))
        if token:
            username = self.accounts().session_user(token)
            if username:
                return Principal("session", username=username, token=token)
        if self.security.open_mode and not key:
            return Principal("open")
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            found = await run_in_threadpool(self.identify, scope, headers)
        except Exception as exc:  # the sessions live in the review database: say so, not a bare 500
            await JSONResponse({"error": f"the review database cannot be read to check the login ({exc}); check "
                                         f"REDI_REVIEW_DB and retry", "status": 503}, status_code=503)(
                scope, receive, send)
            return
        route = _route_path(scope)
        if isinstance(found, str):
            await JSONResponse({"error": found, "status": 403}, status_code=403)(scope, receive, send)
            return
        scope[PRINCIPAL] = found
        if found is None and route not in PUBLIC_ROUTES:
            await self._refuse(scope, receive, send, route)
            return
        if (found is not None and found.kind == "session" and scope.get("method") not in SAFE_METHODS
                and not same_origin(headers)):
            await JSONResponse({"error": "this form came from another site, or the browser did not say where it came "
                                         "from (Origin/Referer); reload the review page and try again",
                                "status": 403}, status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: dict, receive: Any, send: Any, route: str) -> None:
        """A browser asking for a page goes to the login form (and back after it); anything else gets 401."""
        if scope.get("method") == "GET" and not route.startswith("/api/"):
            query = scope.get("query_string", b"").decode("latin-1")
            here = scope.get("path", "") + (f"?{query}" if query else "")
            await RedirectResponse(f"/review/login?next={quote(safe_next(here), safe='')}",
                                   status_code=303)(scope, receive, send)
            return
        await JSONResponse({"error": "log in at /review/login, or send the service's API key as 'X-API-Key: <key>' "
                                     "(scripts)", "status": 401}, status_code=401)(scope, receive, send)


__all__ = ["COOKIE", "PUBLIC_ROUTES", "Principal", "ReviewGuard", "ReviewSecurity", "ReviewSecurityError",
           "ReviewSessions", "SESSION_ID", "csrf_ok", "csrf_token", "principal_of", "safe_next", "same_origin"]
