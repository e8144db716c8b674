"""The review station as an operator meets it, in headless Chromium against ``bentoml serve`` + S3 + SQLite.

What the operator sees and does, each point asserted in the browser: captions on the four pictures
(part, anomaly map, overlay, above-threshold region), the map's colour bar with its range and
threshold, numbered defect boxes, a mask picture that is not a blank tile, defect types from the
line's config file (a type a supervisor adds appears on the next page), the third verdict "bad
image / not a part" (stored, and never exported into the line's data), judged cards collapsed to
their verdict with undo, keyboard judging (``b``, ``d``, ``j``/``k``), times in the browser's time
zone with UTC in the tooltip, the camera a record names, "mask accepted" as Yes/No, and a black frame
sent to the service marked "probably not a part" with its reasons.

Screenshots go to the test's tmp folder (``REDI_REVIEW_SCREENSHOTS=<dir>`` copies them there too, which
is how ``docs/img/`` got its pictures).
"""

from __future__ import annotations

import datetime as _dt
import io
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
import requests
from test_production_truth import BIN, KEY, _redi
from test_review import make_data_repo
from test_review_station import (CHROMIUM, CHROMIUM_ARGS, DEFECT_TYPES, LINE, OPERATOR, PASSWORD, _indexed,
                                 every_part_kept, serve,
                                 trained)  # noqa: F401 - the module-scoped fixture (a line of this module's own)

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def station(request: pytest.FixtureRequest, trained: dict):
    """A station of this module's own, its review database on SQLite (the page is the same on either
    backend: tests/test_review_station.py runs the service on both)."""
    with serve(request, trained, "sqlite") as running:
        yield running


TIME_ZONE = "America/Chicago"  # UTC-6 in December, UTC-5 in summer: never the server's UTC


def _png(page, url: str) -> np.ndarray:
    response = page.request.get(url)  # with the browser's session cookie
    assert response.status == 200, response.text()
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


def _keep_flagged_parts(station: dict) -> list[str]:
    """Send every probe; the flagged ones are kept and indexed. Returns their request ids."""
    server, db = station["server"], station["db"]
    flagged = []
    for path in station["scores"]:  # one at a time: the one-slot retention queue empties between requests
        answer = server.predict(path)
        if answer["anomalous"]:
            flagged.append(answer["request_id"])
        time.sleep(0.5)
    _indexed(db, set(flagged))
    return flagged


def _with_camera(station: dict, request_id: str, camera: str) -> str:
    """Index one more kept part whose record names its camera (the pictures of ``request_id``)."""
    db, store = station["db"], station["store"]
    record = dict(store.get_json(db.get(request_id)["record_key"]))
    later = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(seconds=5)  # newest: first on the page
    record.update(request_id=f"{request_id[:20]}cam", camera=camera, time=later.isoformat())
    db.add_retained(record)
    return record["request_id"]


def _login(page, url: str) -> None:
    page.goto(f"{url}/review/line/{LINE}")
    page.fill("#username", OPERATOR)
    page.fill("#password", PASSWORD)
    page.click("#login")
    page.wait_for_url(f"{url}/review/line/{LINE}")
    page.wait_for_function("() => [...document.querySelectorAll('.pics img')].every(i => i.complete && "
                           "i.naturalWidth > 0)", timeout=60000)


def _current(page) -> str:
    return page.locator(".card.current").get_attribute("data-request-id")


def test_operator_judges_a_queue_in_the_browser(station: dict, tmp_path: Path) -> None:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium): the browser test cannot run")
    from playwright.sync_api import sync_playwright

    server, db = station["server"], station["db"]
    flagged = _keep_flagged_parts(station)
    assert len(flagged) == 3
    with_camera = _with_camera(station, flagged[0], "cam-7")
    shots = tmp_path / "shots"
    shots.mkdir()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 900}, timezone_id=TIME_ZONE).new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            _login(page, server.url)
            cards = page.locator(".card")
            assert cards.count() == 4 and cards.first.get_attribute("data-request-id") == with_camera

            # captions, colour bar, numbered boxes
            first = cards.nth(1)
            captions = first.locator("figcaption").all_inner_texts()
            assert [c.split(",")[0] for c in captions] == ["Part", "Anomaly map", "Overlay", "Above threshold"]
            assert page.locator(".card.pending figcaption").count() == 16
            legend = first.locator(".legend")
            assert legend.is_visible() and "linear-gradient" in legend.locator(".bar").get_attribute("style")
            threshold = db.get(first.get_attribute("data-request-id"))["threshold"]
            assert f"threshold {threshold:.3g}" in legend.inner_text() and f"{2 * threshold:.3g}" in legend.inner_text()
            numbers = page.locator(".card").nth(1).locator(".box-num").all_inner_texts()
            assert numbers and numbers == [str(i + 1) for i in range(len(numbers))]
            assert page.locator(".card").nth(1).locator(".regions li").count() == len(numbers)

            # the pictures: the mask shows the part (no blank white tile), the overlay's hot region is outlined
            rid = first.get_attribute("data-request-id")
            image = _png(page, f"{server.url}/review/item/{rid}/image.png")
            mask = _png(page, f"{server.url}/review/item/{rid}/mask.png")
            overlay = _png(page, f"{server.url}/review/item/{rid}/overlay.png")
            assert mask.shape == image.shape and (mask == 255).all(axis=2).mean() < 0.05  # not a blank tile
            assert mask.mean() < 0.8 * image.mean()  # the part dimmed around the region
            assert ((mask == (255, 40, 40)).all(axis=2)).sum() > 0  # the region's red outline
            assert ((overlay == (0, 255, 255)).all(axis=2)).sum() > 0  # the cyan outline of the hot region

            # camera and local time (the browser's zone; UTC in the tooltip)
            assert "camera cam-7" in cards.first.locator(".meta").inner_text()
            shown = cards.first.locator("time.local").first
            record_time = db.get(with_camera)["time"]
            assert shown.get_attribute("title") == record_time[:19].replace("T", " ") + " UTC"
            assert "UTC" not in shown.inner_text() and ("CST" in shown.inner_text() or "CDT" in shown.inner_text())

            # defect types from the line's config file
            options = first.locator("select[name=defect_type] option").all_inner_texts()
            assert options == list(DEFECT_TYPES)
            page.screenshot(path=str(shots / "review_queue.png"))

            # keyboard: the first pending card is selected; j/k move; b judges "bad image / not a part"
            assert _current(page) == with_camera
            page.keyboard.press("j")
            assert _current(page) == rid
            page.keyboard.press("k")
            assert _current(page) == with_camera
            page.keyboard.press("b")
            page.wait_for_selector("#judged-note")
            assert db.get(with_camera)["verdict"]["verdict"] == "bad_image"
            assert db.get(with_camera)["verdict"]["by"] == OPERATOR

            # the judged card collapsed to its verdict, with undo; the next pending card is selected
            judged = page.locator(f"#item-{with_camera}")
            assert "collapsed" in judged.get_attribute("class") and not judged.locator(".pics").is_visible()
            assert "bad image / not a part" in judged.locator(".verdict").inner_text()
            assert _current(page) == rid
            page.screenshot(path=str(shots / "review_judged.png"))
            judged.locator("button.btn-expand").click()
            assert judged.locator(".pics").is_visible()
            judged.locator("button.btn-undo").click()
            page.wait_for_selector("#undone-note")
            assert db.get(with_camera)["verdict"] is None
            assert db.get(with_camera)["history"][0]["withdrawn_by"] == OPERATOR
            assert "pending" in page.locator(f"#item-{with_camera}").get_attribute("class")
            page.locator(f"#item-{with_camera}").locator("button.btn-bad-image").click()  # judged again, by click
            page.wait_for_selector("#judged-note")

            # a defect by keyboard with a chosen type and the mask accepted
            card = page.locator(f"#item-{rid}")
            card.locator("select[name=defect_type]").select_option("dent")
            card.locator("input[name=accept_mask]").check()
            page.locator("h1").click()  # keys typed into a field are the field's, not shortcuts
            assert _current(page) == rid
            page.keyboard.press("d")
            page.wait_for_selector("#judged-note")
            stored = db.get(rid)["verdict"]
            assert (stored["verdict"], stored["defect_type"], stored["accept_mask"]) == ("defect", "dent", True)

            # a type outside the line's list is refused; a supervisor's new type appears on the next page
            other = next(f for f in flagged if db.get(f)["verdict"] is None)
            refused = requests.post(f"{server.url}/review/item/{other}/verdict", timeout=30,
                                    json={"verdict": "defect", "defect_type": "crack", "by": "bob"},
                                    headers={"X-API-Key": KEY, "Accept": "application/json"})
            assert refused.status_code == 422 and "line.defect_types" in refused.json()["error"]
            assert db.get(other)["verdict"] is None
            lines_file = station["lines_dir"] / f"{LINE}.yaml"
            lines_file.write_text(lines_file.read_text().replace("short_shot]", "short_shot, crack]"))
            page.reload()
            assert page.locator(f"#item-{other} select[name=defect_type] option").all_inner_texts()[-1] == "crack"

            # a mask drawn in the browser (brush, then eraser over part of it) goes with the verdict
            card = page.locator(f"#item-{other}")
            card.locator(".mask-editor summary").click()
            page.wait_for_selector(f"#item-{other} .mask-editor[data-ready='1']")
            card.locator(".btn-clear").click()
            box = card.locator(".mask-editor canvas").bounding_box()
            x0, x1, y = box["x"] + 0.2 * box["width"], box["x"] + 0.6 * box["width"], box["y"] + 0.3 * box["height"]
            page.mouse.move(x0, y)
            page.mouse.down()
            page.mouse.move(x1, y, steps=12)
            page.mouse.up()
            card.locator("input[value=eraser]").check()
            page.mouse.move(box["x"] + 0.5 * box["width"], y)
            page.mouse.down()
            page.mouse.move(box["x"] + 0.7 * box["width"], y, steps=6)
            page.mouse.up()
            card.locator("select[name=defect_type]").select_option("crack")
            card.screenshot(path=str(shots / "review_mask_editor.png"))
            card.locator("button.btn-defect").click()
            page.wait_for_selector("#judged-note")
            stored = db.get(other)["verdict"]
            assert (stored["verdict"], stored["defect_type"]) == ("defect", "crack") and stored["mask_key"]
            drawn = np.asarray(Image.open(io.BytesIO(station["store"].get_bytes(stored["mask_key"]))))
            height, width = drawn.shape
            assert (width, height) == (db.get(other)["width"], db.get(other)["height"])
            rows, cols = np.nonzero(drawn)
            assert set(np.unique(drawn)) == {0, 255} and abs(rows.mean() / height - 0.3) < 0.06
            assert 0.15 < cols.min() / width < 0.25 and 0.4 < cols.max() / width < 0.55  # erased from 50 %
            assert "mask drawn" in page.locator(f"#item-{other} .verdict").inner_text()

            # the item page: verdict history, mask accepted as Yes/No
            page.goto(f"{server.url}/review/item/{rid}")
            assert page.locator("tr.history td.mask-accepted").all_inner_texts() == ["Yes"]
            assert "False" not in page.inner_text("table") and "True" not in page.inner_text("table")
            page.goto(f"{server.url}/review/item/{with_camera}")
            assert [r.split("\t")[2] for r in page.locator("tr.history").all_inner_texts()] == [
                "bad image / not a part", "bad image / not a part"]
            assert errors == [], errors
        finally:
            browser.close()
    copy_to = os.environ.get("REDI_REVIEW_SCREENSHOTS", "").strip()
    if copy_to:
        shutil.copytree(shots, copy_to, dirs_exist_ok=True)

    # the export: the bad image goes nowhere; the confirmed defect goes to test/dent
    repo = make_data_repo(tmp_path, station["data"])
    done = _redi({**station["env"], "REDI_REVIEW_DB": station["db_url"]},
                 "review", "export", "--line", LINE, "--data-repo", str(repo), "--by", OPERATOR)
    assert done.returncode == 0, done.stderr
    revision = done.stdout.split("revision ", 1)[1].split()[0]
    fetched = tmp_path / "fetched"
    subprocess.run([str(BIN / "dvc"), "get", str(repo), f"data/lines/{LINE}", "--rev", revision, "-o", str(fetched)],
                   check=True, capture_output=True)
    exported = sorted(str(p.relative_to(fetched)) for p in fetched.rglob("review_*"))
    assert not any(with_camera in p for p in exported), exported
    assert any(p.startswith("test/dent/") and rid in p for p in exported) or any(
        p.startswith("needs_mask/dent/") and rid in p for p in exported), exported
    assert {e["request_id"] for e in db.exports(LINE)} == {rid, other}
    day = db.get(other)["date"]
    exported_mask = fetched / f"ground_truth/crack/review_{day}_{other}_mask.png"
    assert exported_mask.read_bytes() == station["store"].get_bytes(db.get(other)["verdict"]["mask_key"])
    assert (fetched / f"test/crack/review_{day}_{other}.png").is_file()


def test_a_black_frame_shows_as_probably_not_a_part(station: dict, tmp_path: Path) -> None:
    """A black frame sent to the real service (kept: the threshold is lowered for the test) gets a card
    whose note says why it looks unlike the line's parts; the operator judges it a bad image."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium): the browser test cannot run")
    from playwright.sync_api import sync_playwright

    from redi.core.images import load_rgb

    server, db = station["server"], station["db"]
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros_like(load_rgb(next(iter(station["scores"]))))).save(black)
    with every_part_kept(station):
        answer = server.predict(black)
    assert answer["anomalous"] and answer["unlike_part"], answer
    rid = answer["request_id"]
    _indexed(db, {rid})
    shots = tmp_path / "shots"
    shots.mkdir()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 900}, timezone_id=TIME_ZONE).new_page()
            _login(page, server.url)
            card = page.locator(f"#item-{rid}")
            note = card.locator(".unlike-part")
            assert note.is_visible() and note.inner_text().startswith("Probably not a part")
            assert "brightness" in note.inner_text() and "bad image" in note.inner_text()
            assert page.locator(".unlike-part").count() == 1  # real parts carry no such note
            card.screenshot(path=str(shots / "review_not_a_part.png"))
            card.locator("button.btn-bad-image").click()
            page.wait_for_selector("#judged-note")
            assert db.get(rid)["verdict"]["verdict"] == "bad_image"
        finally:
            browser.close()
    copy_to = os.environ.get("REDI_REVIEW_SCREENSHOTS", "").strip()
    if copy_to:
        shutil.copytree(shots, copy_to, dirs_exist_ok=True)
