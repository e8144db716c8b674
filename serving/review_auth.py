"""The review page's login: a signed session cookie, so a browser never keeps the API key.

The operator types their name and the service's API key into ``/review/login`` once; the page
sets the cookie ``redi_review = base64(name, expiry) . HMAC-SHA256(REDI_API_KEY, that)``
(``HttpOnly``, ``SameSite=Strict``, ``Secure`` behind HTTPS). ``GuardMiddleware`` accepts that
cookie in place of the key on ``/review/`` routes only; every other route still needs the key as a
header. Verdict forms carry a CSRF token derived from the session. Changing ``REDI_API_KEY``
logs every browser out. Without ``REDI_API_KEY`` nothing is protected (as for the API) and the
cookie only carries the operator's name for the verdicts' "who".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

COOKIE = "redi_review"
SESSION_HOURS = 12.0


def _sign(key: str, payload: str) -> str:
    return hmac.new(key.encode(), payload.encode(), hashlib.sha256).hexdigest()


def make_session(key: str, user: str, hours: float = SESSION_HOURS) -> str:
    """A session token for ``user`` valid for ``hours``."""
    payload = base64.urlsafe_b64encode(json.dumps({"u": user, "e": time.time() + hours * 3600}).encode()).decode()
    payload = payload.rstrip("=")  # '=' would make the cookie a quoted string
    return f"{payload}.{_sign(key, payload)}"


def read_session(key: str, token: str) -> str | None:
    """The user of a valid, unexpired token signed with ``key``, else None."""
    payload, _, signature = (token or "").partition(".")
    if not payload or not hmac.compare_digest(_sign(key, payload), signature):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(payload.encode() + b"=" * (-len(payload) % 4)))
    except (ValueError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or float(data.get("e", 0)) < time.time() or not str(data.get("u", "")).strip():
        return None
    return str(data["u"])


def csrf_token(key: str, token: str) -> str:
    """The CSRF token the session's forms carry."""
    return _sign(key, "csrf:" + token)


def cookie_value(header: str, name: str = COOKIE) -> str:
    """One cookie's value from a ``Cookie`` header ('' when absent)."""
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v.strip('"')
    return ""
