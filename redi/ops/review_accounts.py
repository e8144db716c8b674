"""The review page's operator accounts, their server-side sessions and the login rate limit.

Stored in the review database (``redi.ops.review``: ``operators``, ``operator_sessions``,
``login_failures``), so every worker of the service and the ``redi review user`` command see the
same accounts.

- Passwords are kept only as ``scrypt`` hashes (standard library ``hashlib.scrypt``, n=2^14, r=8,
  p=1, a 16-byte random salt per password) and compared in constant time. An unknown username
  costs the same hash as a known one, so the answer time does not tell which names exist.
- A login creates a random session token; the browser's cookie carries it (signed by the page,
  ``serving/review_auth.py``), the database only its sha256. Logout, a password change and
  disabling the account revoke sessions here, so a copied or replayed cookie stops working at once.
- The rate limit: ``LOGIN_MAX_FAILURES`` failed logins within ``LOGIN_WINDOW_S`` seconds, counted
  per username and per client address, block further attempts (the page answers 429 with
  ``Retry-After``) until the oldest failure leaves the window.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from redi.ops.review import LoginFailure, Operator, OperatorSession, ReviewDB, ReviewError, now_iso

PASSWORD_MIN_CHARS = 10
SESSION_HOURS = 12.0
LOGIN_MAX_FAILURES = 5
LOGIN_WINDOW_S = 300.0
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN = 2**14, 8, 1, 32
_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")


class AccountError(ReviewError):
    """A bad account request (name, password, unknown or duplicate account)."""

    status = 422


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=length,
                          maxmem=256 * r * n + 4 * 1024 * 1024)


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt$hash`` (base64); the parameters travel with the hash so they can be raised later."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches a :func:`hash_password` string (constant-time comparison)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        given = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p), len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(given, expected)


_DUMMY_HASH: str | None = None


def _dummy_hash() -> str:
    """A hash to check unknown names against, so they cost the same time as known ones."""
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(secrets.token_urlsafe(16))
    return _DUMMY_HASH


def normalize_username(name: str) -> str:
    """The account name as stored (lower case); raises :class:`AccountError` for an invalid one."""
    username = name.strip().lower()
    if not _USERNAME.match(username):
        raise AccountError(f"username {name!r} is invalid: 1-64 characters, letters, digits, '.', '_', '@', '-', "
                           f"starting with a letter or digit")
    return username


def check_password_strength(password: str, username: str) -> None:
    """Refuse passwords that are too short or equal to the name."""
    if len(password) < PASSWORD_MIN_CHARS:
        raise AccountError(f"the password has {len(password)} characters; use at least {PASSWORD_MIN_CHARS}")
    if password.strip().lower() == username:
        raise AccountError("the password must not be the username")


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass
class LoginResult:
    """What a login attempt gave: a session ``token`` (success), or ``retry_after`` seconds (rate limited),
    or neither (wrong name or password)."""

    username: str = ""
    token: str = ""
    retry_after: int = 0

    @property
    def ok(self) -> bool:
        return bool(self.token)


class OperatorAccounts:
    """Accounts, sessions and the login rate limit in one review database."""

    def __init__(self, db: ReviewDB, session_hours: float = SESSION_HOURS, max_failures: int = LOGIN_MAX_FAILURES,
                 window_s: float = LOGIN_WINDOW_S) -> None:
        self.db = db
        self.session_hours = session_hours
        self.max_failures = max_failures
        self.window_s = window_s

    # -- accounts (the ``redi review user`` command) --------------------------------------------
    def add(self, name: str, password: str, by: str = "") -> dict[str, Any]:
        """Create an account; raises :class:`AccountError` when it exists or the password is weak."""
        username = normalize_username(name)
        check_password_strength(password, username)
        exists = AccountError(f"operator {username!r} exists already; use `redi review user passwd` to set a "
                              f"new password or `enable` to let a disabled one in again")
        try:
            with Session(self.db.engine) as session, session.begin():
                if session.get(Operator, username) is not None:
                    raise exists
                now = now_iso()
                session.add(Operator(username=username, password_hash=hash_password(password), created_at=now,
                                     created_by=by, password_set_at=now))
        except IntegrityError as exc:  # made by another process between the check and the insert
            raise exists from exc
        return {"username": username, "created_at": now}

    def _get(self, session: Session, name: str) -> Operator:
        username = normalize_username(name)
        row = session.get(Operator, username)
        if row is None:
            raise AccountError(f"no operator {username!r}; `redi review user list` shows the accounts")
        return row

    def set_password(self, name: str, password: str) -> int:
        """Set a new password; every session of the account is revoked. Returns how many."""
        with Session(self.db.engine) as session, session.begin():
            row = self._get(session, name)
            check_password_strength(password, row.username)
            row.password_hash, row.password_set_at = hash_password(password), now_iso()
            return self._revoke_all(session, row.username, "password changed")

    def disable(self, name: str) -> int:
        """Refuse the account's logins and revoke its sessions now; returns how many were revoked."""
        with Session(self.db.engine) as session, session.begin():
            row = self._get(session, name)
            row.disabled_at = row.disabled_at or now_iso()
            return self._revoke_all(session, row.username, "account disabled")

    def enable(self, name: str) -> None:
        """Let a disabled account log in again (its old sessions stay revoked)."""
        with Session(self.db.engine) as session, session.begin():
            self._get(session, name).disabled_at = None

    def list(self) -> list[dict[str, Any]]:
        """Every account with its state and the number of live sessions (no hashes)."""
        now = time.time()
        live = (select(OperatorSession.username, func.count().label("n"))
                .where(OperatorSession.revoked_at.is_(None), OperatorSession.expires_at > now)
                .group_by(OperatorSession.username).subquery())
        query = (select(Operator, live.c.n).outerjoin(live, live.c.username == Operator.username)
                 .order_by(Operator.username))
        with Session(self.db.engine) as session:
            return [{"username": o.username, "created_at": o.created_at, "created_by": o.created_by,
                     "password_set_at": o.password_set_at, "disabled_at": o.disabled_at,
                     "active": o.disabled_at is None, "live_sessions": int(n or 0)}
                    for o, n in session.execute(query)]

    @staticmethod
    def _revoke_all(session: Session, username: str, why: str) -> int:
        result = session.execute(update(OperatorSession)
                                 .where(OperatorSession.username == username, OperatorSession.revoked_at.is_(None))
                                 .values(revoked_at=now_iso(), revoked_why=why))
        return int(result.rowcount or 0)

    # -- logins (the review page) ---------------------------------------------------------------
    def retry_after(self, username: str, client: str) -> int:
        """Seconds until this name and this client may try again (0: not blocked)."""
        now = time.time()
        since = now - self.window_s
        oldest_blocking = 0.0
        with Session(self.db.engine) as session:
            for column, value in ((LoginFailure.username, username), (LoginFailure.client, client)):
                times = list(session.scalars(select(LoginFailure.at).where(column == value, LoginFailure.at > since)
                                             .order_by(LoginFailure.at.desc()).limit(self.max_failures)))
                if len(times) >= self.max_failures:
                    # blocked until the max_failures-th newest failure leaves the window
                    oldest_blocking = max(oldest_blocking, times[-1] + self.window_s - now)
        return int(oldest_blocking) + 1 if oldest_blocking > 0 else 0

    def login(self, name: str, password: str, client: str) -> LoginResult:
        """Check a name and password (unless rate limited); on success start a session."""
        username = name.strip().lower()[:64]
        client = client[:64]
        wait = self.retry_after(username, client)
        if wait:
            return LoginResult(username=username, retry_after=wait)
        with Session(self.db.engine) as session:
            row = session.get(Operator, username) if _USERNAME.match(username) else None
            stored = row.password_hash if row is not None else _dummy_hash()
            usable = row is not None and row.disabled_at is None
        if not (verify_password(password, stored) and usable):
            self._failed(username, client)
            return LoginResult(username=username)
        token = secrets.token_urlsafe(32)
        with Session(self.db.engine) as session, session.begin():
            session.add(OperatorSession(token_sha256=_token_hash(token), username=username, created_at=now_iso(),
                                        expires_at=time.time() + self.session_hours * 3600, client=client))
            # this name's failures from this client are forgiven; other clients' still count
            session.execute(delete(LoginFailure).where(LoginFailure.username == username,
                                                       LoginFailure.client == client))
        return LoginResult(username=username, token=token)

    def _failed(self, username: str, client: str) -> None:
        now = time.time()
        with Session(self.db.engine) as session, session.begin():
            session.add(LoginFailure(username=username, client=client, at=now))
            session.execute(delete(LoginFailure).where(LoginFailure.at < now - 2 * self.window_s))

    def session_user(self, token: str) -> str | None:
        """The account of a live session token (not revoked, not expired, account enabled), else None."""
        if not token:
            return None
        query = (select(OperatorSession.username).join(Operator, Operator.username == OperatorSession.username)
                 .where(OperatorSession.token_sha256 == _token_hash(token), OperatorSession.revoked_at.is_(None),
                        OperatorSession.expires_at > time.time(), Operator.disabled_at.is_(None)))
        with Session(self.db.engine) as session:
            return session.scalars(query).first()

    def logout(self, token: str) -> bool:
        """Revoke one session; True when it was live."""
        with Session(self.db.engine) as session, session.begin():
            result = session.execute(update(OperatorSession)
                                     .where(OperatorSession.token_sha256 == _token_hash(token),
                                            OperatorSession.revoked_at.is_(None))
                                     .values(revoked_at=now_iso(), revoked_why="logged out"))
            session.execute(delete(OperatorSession).where(  # a month of history is enough
                OperatorSession.expires_at < time.time() - 30 * 86400))
            return bool(result.rowcount)


__all__ = ["AccountError", "LOGIN_MAX_FAILURES", "LOGIN_WINDOW_S", "LoginResult", "OperatorAccounts",
           "PASSWORD_MIN_CHARS", "SESSION_HOURS", "check_password_strength", "hash_password", "normalize_username",
           "verify_password"]
