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
from redi.ops.shadow import shadow_log, shadow_period_problems, shadow_report, shadow_rows

REPO = Path(__file__).resolve().parents[1]
LINE = "caps"


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
    pointer = production_record(store, LINE)
    assert pointer["version"] == "v2" and pointer["shadow"]["n"] == 4
    assert shadow_record(store, LINE) is None  # the promoted candidate left shadow


def test_shadow_cli_needs_version_or_off(tmp_path: Path) -> None:
    env = {"REDI_STORE_DIR": str(tmp_path / "store"), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "redi.cli", "model", "shadow", "--line", LINE], env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "--version V, or turn the line's shadow off with --off" in out.stderr, out.stderr
    with pytest.raises(RediError):
        GatePolicy(shadow_min_requests=-1)
