"""``redi review threshold --suggest`` and ``redi review summary`` through the real ``redi`` entry point.

The kept parts go into a real review database (SQLite and PostgreSQL) (``ReviewDB.add_retained``, what the service's
retention thread calls), the verdicts through ``ReviewDB.add_verdict``. The line is built so that
the weighting decides the answer: 20 sampled good parts kept at a rate of 0.1 stand for 200, so the
weighted false-call rate allows two false alarms above the threshold where the unweighted one
would allow none.
"""

from __future__ import annotations

import datetime as _dt
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from redi.cli.main import main
from redi.ops.review import ReviewDB
from redi.ops.review_threshold import weighted_stats
from redi.ops.object_store import LocalStore
from redi.ops.thresholds import override_history, threshold_override

LINE = "bottle_caps"
START = _dt.datetime(2025, 3, 1, 8, 0, tzinfo=_dt.timezone.utc)
FALSE_ALARMS = (1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8)  # flagged good parts
FLAGGED_DEFECTS = (1.25, 1.45, 1.65, 1.85, 2.0, 2.5)
SAMPLED_GOOD = tuple(float(s) for s in np.linspace(0.05, 0.95, 20))
SAMPLED_DEFECT = 0.9  # an escape the sample found
RATE = 0.1


class Line:
    """Kept parts and verdicts of one line in a real SQLite review database."""

    def __init__(self, db: ReviewDB, line: str = LINE) -> None:
        self.db, self.line, self.n = db, line, 0

    def part(self, score: float, verdict: str | None, kind: str = "", version: str = "v2", threshold: float = 1.0,
             rate: float | None = RATE, record_rate: bool = True) -> str:
        """Keep one part (flagged when score > threshold unless ``kind`` says) and judge it."""
        self.n += 1
        request_id = f"{self.line}-{version}-{self.n:04d}"
        kind = kind or ("flagged" if score > threshold else "sampled")
        record = {"request_id": request_id, "line": self.line, "kind": kind,
                  "time": (START + _dt.timedelta(minutes=self.n)).isoformat(), "score": score,
                  "threshold": threshold, "anomalous": score > threshold, "model_version": version,
                  "width": 64, "height": 64, "image_key": f"k/{request_id}/image.png",
                  "map_key": f"k/{request_id}/map.npy", "record_key": f"k/{request_id}/record.json"}
        if record_rate:
            record["sample_rate"] = 1.0 if kind == "flagged" else rate
        self.db.add_retained(record)
        if verdict is not None:
            self.db.add_verdict(request_id, verdict, by="ann")
        return request_id


def _standard(line: Line, record_rate: bool = True) -> None:
    """v1 (older, another score scale) then v2: the parts in this module's docstring; the latest v2
    part was decided under an override of 1.05."""
    for score, verdict in ((150.0, "defect"), (180.0, "defect"), (120.0, "false_alarm")):  # v1: must not leak into v2
        line.part(score, verdict, version="v1", threshold=100.0)
    for score in SAMPLED_GOOD:
        line.part(score, "false_alarm", record_rate=record_rate)
    line.part(SAMPLED_DEFECT, "defect", record_rate=record_rate)
    for score in FALSE_ALARMS:
        line.part(score, "false_alarm")
    for score in FLAGGED_DEFECTS[:-1]:
        line.part(score, "defect")
    line.part(FLAGGED_DEFECTS[-1], "defect", threshold=1.05)  # after an override: the threshold served now


@pytest.fixture()
def db_url(review_db_url: str) -> str:
    """The review database, on SQLite and on a real PostgreSQL (conftest's ``review_db_url``)."""
    return review_db_url


def _redi(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_suggest_weights_sampled_parts_and_prints_the_audited_command(db_url: str, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    _standard(Line(ReviewDB(db_url)))
    store_dir = tmp_path / "store"
    rc, out, err = _redi(capsys, "review", "threshold", "--line", LINE, "--suggest", "--db", db_url, "--json",
                         "--store-dir", str(store_dir))
    assert rc == 0, err
    result = json.loads(out)
    assert result["model_version"] == "v2" and result["false_call_target"] == 0.01
    assert result["counts"] == {"judged_defects": 7, "judged_good": 28, "judged_flagged": 14, "judged_sampled": 21,
                                "judged_sampled_defects": 1, "judged_sampled_good": 20, "kept_flagged": 14,
                                "kept_sampled": 21}
    assert result["sample_weights"] == [1.0, pytest.approx(10.0)]
    # good parts weigh 8 (flagged) + 20 x 10 (sampled) = 208: at most 2 false alarms above it (<= 2.08);
    # the highest recall there is just above 1.6; unweighted (28 good parts) it would need t >= 1.8
    suggested, served = result["suggested"], result["served"]
    assert suggested["threshold"] == 1.62
    assert suggested["false_call_rate"] == pytest.approx(2 / 208)
    assert suggested["recall"] == pytest.approx(4 / 16) and suggested["escape_rate"] == pytest.approx(12 / 16)
    assert suggested["counts"] == {"tp": 4, "fn": 3, "fp": 2, "tn": 26}
    assert served["threshold"] == 1.05  # the latest v2 part's threshold
    assert served["false_call_rate"] == pytest.approx(8 / 208) and served["recall"] == pytest.approx(6 / 16)
    assert served["flag_rate"] == pytest.approx(14 / 224)
    assert result["served_thresholds"] == {"min": 1.0, "max": 1.05}
    assert result["warnings"] == []
    assert not (store_dir / "lines" / LINE / "threshold_override.json").exists(), "--suggest must apply nothing"

    # the text form names both thresholds and their figures, then the exact command
    rc, out, err = _redi(capsys, "review", "threshold", "--line", LINE, "--suggest", "--db", db_url)
    assert rc == 0, err
    assert "nothing is applied" in out and "7 judged defects and 28 judged good parts" in out
    assert "14 flagged (of 14 kept) and 21 sampled" in out and "1 .. 1.05 (overrides)" in out
    served_row = next(r for r in out.splitlines() if r.startswith("served now"))
    suggested_row = next(r for r in out.splitlines() if r.startswith("suggested (false calls <= 1.0 %)"))
    assert "1.05" in served_row and "37.5 %" in served_row and "3.8 %" in served_row and "6/1/8/20" in served_row
    assert "1.62" in suggested_row and "25.0 %" in suggested_row and "1.0 %" in suggested_row
    command = out.strip().splitlines()[-1].strip()
    assert command.startswith(f"redi review threshold --line {LINE} --version v2 --value 1.62 --reason ")

    # that command, run as printed, sets the audited override for v2
    argv = shlex.split(command)[1:] + ["--store-dir", str(store_dir), "--by", "qa"]
    rc, _, err = _redi(capsys, *argv)
    assert rc == 0, err
    store = LocalStore(store_dir)
    override = threshold_override(store, LINE)
    assert override["value"] == 1.62 and override["model_version"] == "v2" and override["by"] == "qa"
    assert "false calls 3.8 % -> 1.0 %" in override["reason"] and len(override_history(store, LINE)) == 1


def test_suggest_version_target_and_rate_fallback(db_url: str, capsys: pytest.CaptureFixture) -> None:
    _standard(Line(ReviewDB(db_url)), record_rate=False)  # sampled parts kept before the rate was recorded
    rc, _, err = _redi(capsys, "review", "threshold", "--line", LINE, "--suggest", "--db", db_url)
    assert rc == 2 and "21 judged sampled parts" in err and "--normal-rate" in err
    rc, out, err = _redi(capsys, "review", "threshold", "--line", LINE, "--suggest", "--db", db_url, "--json",
                         "--normal-rate", str(RATE))
    assert rc == 0, err
    assert json.loads(out)["suggested"]["threshold"] == 1.62  # the same answer as with recorded rates
    # a looser target: 5 % of 208 allows every flagged false alarm but no sampled good part (each weighs 10):
    # the best recall is every flagged defect (6/16), and at that recall the fewest false calls lie just
    # below the lowest flagged defect (1.25), where 1.1 and 1.2 pass
    rc, out, err = _redi(capsys, "review", "threshold", "--line", LINE, "--suggest", "--db", db_url, "--json",
                         "--normal-rate", str(RATE), "--false-call-target", "0.05")
    loose = json.loads(out)["suggested"]
    assert rc == 0 and 1.2 < loose["threshold"] < 1.25
    assert loose["recall"] == pytest.approx(6 / 16) and loose["false_call_rate"] == pytest.approx(6 / 208)
    # --version picks the older model; it has no sampled part judged
    rc, _, err = _redi(capsys, "review", "threshold", "--line", LINE, "--suggest", "--db", db_url, "--version", "v1")
    assert rc == 2 and "none of the 1 judged good parts is a sampled" in err
    rc, _, err = _redi(capsys, "review", "threshold", "--line", LINE, "--suggest", "--db", db_url, "--version", "v9")
    assert rc == 2 and "versions with verdicts: ['v1', 'v2']" in err


def test_suggest_bad_input_says_what_is_missing(db_url: str, capsys: pytest.CaptureFixture) -> None:
    line = Line(ReviewDB(db_url))
    base = ["review", "threshold", "--suggest", "--db", db_url, "--line"]
    rc, _, err = _redi(capsys, *base, LINE)
    assert rc == 2 and "no kept parts" in err and "lines there: []" in err
    for score in (0.5, 1.5, 2.5):
        line.part(score, None)
    rc, _, err = _redi(capsys, *base, LINE)
    assert rc == 2 and "no verdict yet" in err and f"/review/line/{LINE}" in err
    rc, _, err = _redi(capsys, *base, "woven_fabric")
    assert rc == 2 and "no kept parts" in err and f"lines there: ['{LINE}']" in err
    line.part(3.0, "defect")
    line.part(3.5, "defect")
    rc, _, err = _redi(capsys, *base, LINE)
    assert rc == 2 and "2 judged defects and 0 judged good parts" in err and "no good part" in err
    rc, _, err = _redi(capsys, *base, LINE, "--false-call-target", "1.5")
    assert rc == 2 and "must lie in (0, 1)" in err
    rc, _, err = _redi(capsys, "review", "threshold", "--line", LINE, "--suggest", "--value", "2", "--db", db_url)
    assert rc == 2 and "without --value" in err
    # few verdicts: a proposal, with the warning
    line.part(0.4, "false_alarm")
    line.part(1.2, "false_alarm")
    rc, out, err = _redi(capsys, *base, LINE)
    assert rc == 0, err
    assert "WARNING: too few verdicts to trust these rates: 2 judged defects (want 5+) and 2 judged good parts" in out
    assert "no judged sampled (passed) part is a defect" in out
    assert "operators judged" not in out  # 3 of 5 flagged, 1 of 2 sampled: alike
    line.part(0.3, None)
    line.part(0.2, None)  # 1 of 4 sampled judged vs 3 of 5 flagged: the weights are off
    rc, out, _ = _redi(capsys, *base, LINE)
    assert rc == 0 and "operators judged 60 % of the kept flagged parts but 25 % of the kept sampled ones" in out


def test_weighted_stats_match_counting_each_part_by_its_weight() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(60) < 0.3
    scores = rng.random(60) * 3
    weights = np.where(rng.random(60) < 0.5, 1.0, 20.0)
    got = weighted_stats(labels, scores, weights, 1.5)
    flagged = scores > 1.5
    assert got["recall"] == pytest.approx(weights[flagged & labels].sum() / weights[labels].sum())
    assert got["false_call_rate"] == pytest.approx(weights[flagged & ~labels].sum() / weights[~labels].sum())
    assert got["flag_rate"] == pytest.approx(weights[flagged].sum() / weights.sum())
    assert got["counts"]["tp"] == int((flagged & labels).sum())


def test_summary_names_thresholds_per_version(db_url: str, capsys: pytest.CaptureFixture) -> None:
    _standard(Line(ReviewDB(db_url)))
    summary = ReviewDB(db_url).summary(LINE, day="2025-03-01")
    rows = {r["model_version"]: r for r in summary["by_model_version"]}
    assert (rows["v2"]["threshold_min"], rows["v2"]["threshold_max"]) == (1.0, 1.05)
    assert (rows["v1"]["threshold_min"], rows["v1"]["threshold_max"]) == (100.0, 100.0)
    assert rows["v2"]["flagged_threshold_max"] == 1.05 and "threshold_min" not in summary["totals"]
    rc, out, err = _redi(capsys, "review", "summary", "--line", LINE, "--db", db_url, "--day", "2025-03-01")
    assert rc == 0, err
    by_version = {r.split()[0]: r.split() for r in out.splitlines()[2:]}
    assert by_version["v2"][1] == "1..1.05" and by_version["v1"][1] == "100" and by_version["all"][1] == "-"
    assert by_version["v2"][2:] == ["14", "14", "14", "6", "8", "57", "%"]


def test_old_database_gains_the_sample_rate_column(db_url: str) -> None:
    line = Line(ReviewDB(db_url))
    line.part(0.5, None)
    with line.db.engine.begin() as connection:  # the table as an older redi created it
        connection.execute(text("ALTER TABLE retained DROP COLUMN sample_rate"))
    reopened = ReviewDB(db_url)
    assert [r["sample_rate"] for r in reopened.kept_with_verdicts(LINE)] == [None]
    line.db = reopened
    line.part(0.6, None)
    assert [r["sample_rate"] for r in reopened.kept_with_verdicts(LINE)] == [None, RATE]
