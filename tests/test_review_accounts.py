"""The review page's operator accounts against a real ``bentoml serve`` and the real review database, on
SQLite and on a real PostgreSQL (every test here that touches the database runs on both).

Operators log in with their own account (``redi review user add``, scrypt hashes in the review
DB), not the machine API key; the session cookie is signed by Starlette's ``SessionMiddleware``
under ``REDI_SESSION_SECRET`` and carries only a session id the database can revoke (logout,
``redi review user disable``); failed logins are rate limited (429 + Retry-After); ``next`` never
leaves ``/review/``; a session's POST from a foreign ``Origin`` is refused; verdicts name the
account. The service refuses to start without the signing secret. The pure functions (hashing,
``safe_next``, ``same_origin``, the settings check) are tested without a server first.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from sqlalchemy import delete
from sqlalchemy.orm import Session
from starlette.datastructures import Headers
from tiny_line import make_line, train_tiny

from redi.core.images import load_rgb
from redi.methods.base import load_detector
from redi.ops.model_registry import promote, publish_version
from redi.ops.object_store import LocalStore
from redi.ops.review import LoginFailure, ReviewDB
from redi.ops.review_accounts import (AccountError, OperatorAccounts, hash_password, verify_password)
from redi.ops.thresholds import set_threshold_override
from serving.review_auth import COOKIE, ReviewSecurity, ReviewSecurityError, safe_next, same_origin

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LINE = "bottle_caps"
KEY = "accounts-test-api-key"
SECRET = "a-session-signing-secret-of-its-own-0123456789"
PASSWORD = "valve seat 4711"


# ----------------------------------------------------------------------------- without a server
def test_password_hash_is_salted_scrypt_and_checks_in_constant_time_api() -> None:
    first, second = hash_password(PASSWORD), hash_password(PASSWORD)
    assert first.startswith("scrypt$16384$8$1$") and first != second  # a salt per password
    assert PASSWORD not in first
    assert verify_password(PASSWORD, first) and verify_password(PASSWORD, second)
    assert not verify_password(PASSWORD + "x", first)
    assert not verify_password(PASSWORD, "md5$whatever") and not verify_password(PASSWORD, "garbage")


@pytest.mark.parametrize("target", [
    "//evil.example/review/", "https://evil.example/review/", "http:/review/", "/\\evil.example",
    "/review/\\..\\..\\admin", "/review/../admin/reload", "/review/%2e%2e/metadata", "/review/..%2f..%2fmetadata",
    "/review/./../docs", "/review/\t/x", "/review/\n/x", "javascript:alert(1)", "/admin/reload", "", None])
def test_safe_next_refuses_everything_outside_review(target: str | None) -> None:
    assert safe_next(target) == "/review/"


@pytest.mark.parametrize("target", ["/review/", "/review/line/bottle_caps?status=pending&min_score=2",
                                    "/review/item/abc123#item-abc123"])
def test_safe_next_keeps_review_pages(target: str) -> None:
    assert safe_next(target) == target


def test_same_origin_needs_origin_or_referer_naming_the_host() -> None:
    host = {"host": "plant:3000"}
    assert same_origin(Headers({**host, "origin": "http://plant:3000"}))
    assert same_origin(Headers({**host, "referer": "http://plant:3000/review/line/x"}))
    assert not same_origin(Headers({**host, "origin": "http://evil.example"}))
    assert not same_origin(Headers({**host, "origin": "http://plant:3000.evil.example"}))
    assert not same_origin(Headers({**host, "origin": "null"}))
    assert not same_origin(Headers(host))  # the browser said nothing: not known to be ours


def test_security_settings_need_a_separate_strong_secret_unless_open_mode() -> None:
    with pytest.raises(ReviewSecurityError, match="REDI_SESSION_SECRET is not set"):
        ReviewSecurity(api_key=KEY).check()
    with pytest.raises(ReviewSecurityError, match="at least 32"):
        ReviewSecurity(api_key=KEY, session_secret="short").check()
    with pytest.raises(ReviewSecurityError, match="equals REDI_API_KEY"):
        ReviewSecurity(api_key=SECRET, session_secret=SECRET).check()
    ReviewSecurity(api_key=KEY, session_secret=SECRET).check()
    ReviewSecurity(open_mode=True).check()  # open mode: no logins, nothing to sign
    assert ReviewSecurity.from_env({"REDI_OPEN_MODE": "1"}).open_mode


def test_rate_limit_counts_per_name_and_per_address_and_forgets_after_the_window(review_db_url: str) -> None:
    accounts = OperatorAccounts(ReviewDB(review_db_url), window_s=2.0)
    accounts.add("ann", PASSWORD)
    for _ in range(5):
        assert not accounts.login("ann", "wrong", "10.0.0.1").ok
    blocked = accounts.login("ann", PASSWORD, "10.0.0.2")  # right password, other address: the name is blocked
    assert not blocked.ok and 1 <= blocked.retry_after <= 3
    for name in ("x1", "x2", "x3", "x4", "x5"):
        accounts.login(name, "wrong", "10.0.0.9")
    assert accounts.login("someone-else", "wrong", "10.0.0.9").retry_after > 0  # the address is blocked
    time.sleep(2.2)
    assert accounts.login("ann", PASSWORD, "10.0.0.2").ok  # the failures left the window
    with pytest.raises(AccountError, match="at least 10"):
        accounts.add("bob", "short")
    with pytest.raises(AccountError, match="exists already"):
        accounts.add("ANN", PASSWORD)


def test_cli_reads_the_password_from_stdin_never_from_argv(tmp_path: Path, review_db_url: str) -> None:
    from sqlalchemy import text

    env = {**os.environ, "REDI_REVIEW_DB": review_db_url}
    done = _cli(env, "add", "--name", "Eve", stdin=PASSWORD + "\n")
    assert done.returncode == 0 and "operator eve added" in done.stdout, done.stderr
    refused = subprocess.run([str(BIN / "redi"), "review", "user", "add", "--name", "eve", "--password", PASSWORD],
                             env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "unrecognized arguments" in refused.stderr
    no_tty = _cli(env, "add", "--name", "zed")  # no --password-stdin and stdin is not a terminal
    assert no_tty.returncode == 2 and "--password-stdin" in no_tty.stderr
    listed = json.loads(_cli(env, "list", "--json").stdout)
    assert [(u["username"], u["active"]) for u in listed] == [("eve", True)]
    with ReviewDB(review_db_url).engine.connect() as connection:
        stored = repr(connection.execute(text("SELECT * FROM operators")).all())
    assert "eve" in stored and "scrypt$" in stored and PASSWORD not in stored
    if review_db_url.startswith("sqlite"):  # nor anywhere in the file (a deleted page, the WAL)
        assert PASSWORD not in (tmp_path / "review.db").read_bytes().decode("latin-1")


def test_a_review_db_from_before_accounts_gets_the_operator_column(review_db_url: str) -> None:
    from sqlalchemy import inspect, text

    url = review_db_url
    with ReviewDB(url).engine.begin() as connection:  # the verdicts table as it was before accounts
        connection.execute(text("ALTER TABLE verdicts DROP COLUMN operator"))
    db = ReviewDB(url)
    assert "operator" in {c["name"] for c in inspect(db.engine).get_columns("verdicts")}
    db.add_retained({"request_id": "r1", "line": LINE, "time": "2026-01-01T00:00:00+00:00", "score": 2.0,
                     "threshold": 1.0, "anomalous": True, "width": 8, "height": 8, "image_key": "i", "map_key": "m",
                     "record_key": "r"})
    stored = db.add_verdict("r1", "false_alarm", by="ann", operator="ann")
    assert (stored["by"], stored["operator"]) == ("ann", "ann")
    assert db.add_verdict("r1", "defect", by="script")["operator"] is None  # sent with the API key


# ----------------------------------------------------------------------------- a real server
def _cli(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    extra = ["--password-stdin"] if stdin is not None else []
    return subprocess.run([str(BIN / "redi"), "review", "user", *args, *extra], env=env, input=stdin,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def line_store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny line promoted in a local store, every probe flagged (an override below all scores)."""
    root = tmp_path_factory.mktemp("accounts")
    data = make_line(root, LINE)
    detector_path = train_tiny(data, root / "run", LINE)
    store = LocalStore(root / "store")
    publish_version(store, LINE, "v1", {"detector.pt": detector_path}, {"promote": True})
    promote(store, LINE, "v1", by="qa", reason="fixture")
    detector = load_detector(detector_path)
    probes = sorted((data / "test").rglob("*.png"))[:2]
    low = min(float(detector.predict(detector.preprocess([load_rgb(p)])).score[0]) for p in probes)
    assert low > 0
    set_threshold_override(store, LINE, low / 2, "flag every probe", by="qa")
    return {"root": root, "probes": probes}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def station(request: pytest.FixtureRequest, line_store: dict):
    """The service on the line's store with an API key and a session secret, its review database on
    SQLite or on PostgreSQL (the param), and operator accounts made with the CLI."""
    from pg_server import review_database

    root = line_store["root"] / request.param
    root.mkdir()
    with review_database(request, request.param, root / "logs") as db_url:
        yield from _station(line_store["root"], root, line_store["probes"], db_url)


def _station(line_root: Path, root: Path, probes: list[Path], db_url: str):
    from test_serving import _start_server, _stop_server

    env = {**os.environ, "BENTOML_HOME": str(root / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
           "REDI_API_KEY": KEY, "REDI_SESSION_SECRET": SECRET, "REDI_LOG_DIR": str(root / "logs"),
           "REDI_DEVICE": "cpu", "PYTHONPATH": str(REPO), "REDI_STORE_DIR": str(line_root / "store"),
           "REDI_MODEL_CACHE": str(root / "cache"), "REDI_RELOAD_INTERVAL_S": "0",
           "REDI_RETAIN_NORMAL_RATE": "0", "REDI_RETAIN_SWEEP_S": "0", "REDI_REVIEW_DB": db_url}
    env.pop("REDI_OPEN_MODE", None)
    for name in ("ann", "bob", "carl", "dave"):
        done = _cli(env, "add", "--name", name, stdin=PASSWORD + "\n")
        assert done.returncode == 0, done.stderr
    proc, url, log_file = _start_server(env, root / "server.log")
    try:
        db = ReviewDB(db_url)
        kept = []
        for probe in probes:
            answer = requests.post(f"{url}/predict", files={"image": (probe.name, probe.read_bytes())},
                                   data={"line": LINE}, headers={"X-API-Key": KEY}, timeout=120)
            assert answer.status_code == 200 and answer.json()["anomalous"], answer.text
            kept.append(answer.json()["request_id"])
        deadline = time.monotonic() + 60
        while not set(kept) <= {i["request_id"] for i in db.queue(LINE, kind="all")}:
            assert time.monotonic() < deadline, "the flagged probes were not indexed in the review DB"
            time.sleep(0.3)
        yield {"url": url, "env": env, "db": db, "kept": kept, "root": root}
    finally:
        _stop_server(proc, log_file)


@pytest.fixture(autouse=True)
def _forgive_failed_logins(request: pytest.FixtureRequest):
    """Every test logs in from 127.0.0.1: clear the failures one test leaves so the next starts unblocked."""
    yield
    if "station" in request.fixturenames:
        db = request.getfixturevalue("station")["db"]
        with Session(db.engine) as session, session.begin():
            session.execute(delete(LoginFailure))


def _origin(url: str) -> dict[str, str]:
    return {"Origin": url}


def _login(station: dict, username: str, password: str = PASSWORD, next_: str = "/review/",
           client: requests.Session | None = None) -> requests.Response:
    client = client or requests.Session()
    return client.post(f"{station['url']}/review/login", data={"username": username, "password": password,
                                                               "next": next_},
                       headers=_origin(station["url"]), allow_redirects=False, timeout=30)


def _logged_in(station: dict, username: str) -> requests.Session:
    client = requests.Session()
    answer = _login(station, username, client=client)
    assert answer.status_code == 303 and answer.headers["location"] == "/review/", answer.text
    return client


def _csrf(client: requests.Session, station: dict, page: str = "/review/") -> str:
    html = client.get(f"{station['url']}{page}", allow_redirects=False, timeout=30)
    assert html.status_code == 200, html.status_code
    return re.search(r'name="csrf" value="([0-9a-f]+)"', html.text).group(1)


def test_login_with_an_account_works_and_the_verdict_names_the_operator(station: dict) -> None:
    client = _logged_in(station, "Ann")  # names are case-insensitive
    cookie = client.cookies.get(COOKIE, path="/review")
    signed = json.loads(base64.b64decode(cookie.split(".")[0]))
    assert list(signed) == ["sid"] and "ann" not in json.dumps(signed)  # the cookie carries only the session id
    page = client.get(f"{station['url']}/review/line/{LINE}", timeout=30)
    assert page.status_code == 200 and '<span id="operator">ann</span>' in page.text
    rid = station["kept"][0]
    judged = client.post(f"{station['url']}/review/item/{rid}/verdict",
                         data={"verdict": "false_alarm", "csrf": _csrf(client, station), "by": "mallory",
                               "next": f"/review/line/{LINE}"},
                         headers=_origin(station["url"]), allow_redirects=False, timeout=30)
    assert judged.status_code == 303 and judged.headers["location"].startswith(f"/review/line/{LINE}?judged={rid}")
    verdict = station["db"].get(rid)["verdict"]
    assert (verdict["by"], verdict["operator"]) == ("ann", "ann")  # the account, not what the form claims


def test_wrong_password_and_the_api_key_do_not_log_in(station: dict) -> None:
    wrong = _login(station, "ann", "not the password")
    assert wrong.status_code == 401 and "wrong username or password" in wrong.text
    assert COOKIE not in wrong.cookies
    for name in ("ann", "admin", ""):
        with_key = _login(station, name or "x", KEY)
        assert with_key.status_code == 401 and COOKIE not in with_key.cookies
    old_form = requests.post(f"{station['url']}/review/login", data={"name": "ann", "key": KEY},
                             allow_redirects=False, timeout=30)  # the form of the shared-key days
    assert old_form.status_code == 401 and COOKIE not in old_form.cookies
    assert requests.get(f"{station['url']}/review/", cookies={COOKIE: "forged"}, allow_redirects=False,
                        timeout=30).status_code == 303  # to the login form
    # scripts keep the machine key: JSON with X-API-Key and X-Operator (no session)
    api = requests.get(f"{station['url']}/review/api/summary/{LINE}", headers={"X-API-Key": KEY}, timeout=30)
    assert api.status_code == 200 and api.json()["line"] == LINE


def test_six_quick_failures_get_429_with_retry_after(station: dict) -> None:
    for attempt in range(5):
        assert _login(station, "bob", f"guess {attempt}").status_code == 401
    blocked = _login(station, "bob", "guess 5")
    assert blocked.status_code == 429, blocked.text
    assert 1 <= int(blocked.headers["Retry-After"]) <= 300 and "too many failed logins" in blocked.text
    right = _login(station, "bob")  # even the right password waits: the name is blocked
    assert right.status_code == 429 and COOKIE not in right.cookies


def test_logout_revokes_the_session_and_a_replayed_cookie_is_refused(station: dict) -> None:
    client = _logged_in(station, "carl")
    old_cookie = client.cookies.get(COOKIE, path="/review")
    csrf = _csrf(client, station)
    out = client.post(f"{station['url']}/review/logout", data={"csrf": csrf}, headers=_origin(station["url"]),
                      allow_redirects=False, timeout=30)
    assert out.status_code == 303 and out.headers["location"] == "/review/login"
    replay = requests.Session()
    replay.cookies.set(COOKIE, old_cookie, path="/review")
    page = replay.get(f"{station['url']}/review/", allow_redirects=False, timeout=30)
    assert page.status_code == 303 and page.headers["location"].startswith("/review/login")
    api = replay.get(f"{station['url']}/review/api/summary/{LINE}", timeout=30)
    assert api.status_code == 401
    verdict = replay.post(f"{station['url']}/review/item/{station['kept'][1]}/verdict",
                          data={"verdict": "defect", "csrf": csrf}, headers=_origin(station["url"]),
                          allow_redirects=False, timeout=30)
    assert verdict.status_code == 401 and station["db"].get(station["kept"][1])["history"] == []


def test_a_disabled_operators_session_is_refused_at_once(station: dict) -> None:
    client = _logged_in(station, "dave")
    assert client.get(f"{station['url']}/review/api/summary/{LINE}", timeout=30).status_code == 200
    done = _cli(station["env"], "disable", "--name", "dave")
    assert done.returncode == 0 and "1 session(s) logged out" in done.stdout, done.stderr
    assert client.get(f"{station['url']}/review/api/summary/{LINE}", timeout=30).status_code == 401
    assert _login(station, "dave").status_code == 401
    listed = json.loads(_cli(station["env"], "list", "--json").stdout)
    assert {u["username"]: u["active"] for u in listed}["dave"] is False


@pytest.mark.parametrize("target", ["//evil.example/", "https://evil.example/review/", "/\\evil.example",
                                    "/review/../admin/reload", "/review/%2e%2e/metadata", "/review/\\..\\..\\x"])
def test_login_never_redirects_outside_review(station: dict, target: str) -> None:
    answer = _login(station, "ann", next_=target)
    assert answer.status_code == 303 and answer.headers["location"] == "/review/"
    form = requests.get(f"{station['url']}/review/login", params={"next": target}, timeout=30)
    assert 'name="next" value="/review/"' in form.text


def test_login_keeps_a_review_page_as_next(station: dict) -> None:
    target = f"/review/line/{LINE}?status=pending"
    assert _login(station, "ann", next_=target).headers["location"] == target
    redirect = requests.get(f"{station['url']}{target}", allow_redirects=False, timeout=30)
    assert redirect.status_code == 303 and "next=%2Freview%2Fline%2Fbottle_caps%3Fstatus%3Dpending" in \
        redirect.headers["location"]


def test_a_post_from_a_foreign_origin_is_refused(station: dict) -> None:
    client = _logged_in(station, "ann")
    csrf = _csrf(client, station)
    url = f"{station['url']}/review/item/{station['kept'][1]}/verdict"
    form = {"verdict": "defect", "csrf": csrf}
    for headers in ({"Origin": "http://evil.example"}, {"Referer": "http://evil.example/page"}, {},
                    {"Origin": "null"}):
        refused = client.post(url, data=form, headers=headers, allow_redirects=False, timeout=30)
        assert refused.status_code == 403, (headers, refused.text)
    assert station["db"].get(station["kept"][1])["history"] == []
    login = requests.post(f"{station['url']}/review/login", data={"username": "ann", "password": PASSWORD},
                          headers={"Origin": "http://evil.example"}, allow_redirects=False, timeout=30)
    assert login.status_code == 403 and COOKIE not in login.cookies
    ok = client.post(url, data=form, headers={"Referer": f"{station['url']}/review/"}, allow_redirects=False,
                     timeout=30)
    assert ok.status_code == 303
    assert station["db"].get(station["kept"][1])["verdict"]["operator"] == "ann"


def test_the_service_refuses_to_start_without_a_session_secret(tmp_path: Path) -> None:
    """``bentoml serve`` exits with the reason before any worker starts (the old service started and
    signed its cookies with the API key)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
           "REDI_API_KEY": KEY, "REDI_LOG_DIR": str(tmp_path / "logs"), "REDI_DEVICE": "cpu",
           "PYTHONPATH": str(REPO), "REDI_STORE_DIR": str(tmp_path / "store")}
    env.pop("REDI_SESSION_SECRET", None)
    env.pop("REDI_OPEN_MODE", None)
    proc = subprocess.Popen([str(BIN / "bentoml"), "serve", "serving.service:RediService", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        from test_serving import _kill_9_tree

        _kill_9_tree(proc)
        output, _ = proc.communicate()
        pytest.fail(f"bentoml serve kept running without REDI_SESSION_SECRET:\n{output[-3000:]}")
    assert proc.returncode != 0
    assert "REDI_SESSION_SECRET is not set" in output, output[-3000:]
