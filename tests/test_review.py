"""The review database, threshold overrides and ``redi review export`` into a real git + DVC repository.

No server here (tests/test_review_station.py runs the service, the page in Chromium and S3): kept
images go through the real Retainer into a local store, verdicts into SQLite and into a real PostgreSQL
(``review_db_url``: every test that takes it runs on both), the export into a
DVC repository, and the exported revision is fetched with ``dvc get`` and checked by the
pipeline's own data stage (``redi.workflow.stages.validate_data``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from redi.core.config import profile_config
from redi.core.images import load_rgb
from redi.ops.retention import RetainedItem, Retainer, RetentionPolicy
from redi.ops.review import ImageExpired, InvalidVerdict, ReviewDB, UnknownRequest
from redi.ops.review_export import ExportError, export_reviews
from redi.ops.object_store import LocalStore, StorageError
from redi.ops.model_registry import promote, publish_version
from redi.ops.thresholds import effective_threshold, override_history, set_threshold_override, threshold_override

LINE = "bottle_caps"
BIN = Path(sys.executable).parent
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"}


def _sh(cwd: Path, *args: str) -> str:
    done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env={**os.environ, **GIT_ENV})
    assert done.returncode == 0, done.stderr
    return done.stdout


def make_data_repo(root: Path, source: Path) -> Path:
    """A git + DVC repository with the line's data at data/lines/<line>, committed."""
    repo = root / "data-repo"
    shutil.copytree(source, repo / "data" / "lines" / LINE)
    _sh(repo, "git", "init", "-q")
    _sh(repo, str(BIN / "dvc"), "init", "-q")
    _sh(repo, str(BIN / "dvc"), "config", "core.analytics", "false")
    _sh(repo, str(BIN / "dvc"), "add", "-q", f"data/lines/{LINE}")
    _sh(repo, "git", "add", "-A")
    _sh(repo, "git", "commit", "-q", "-m", "the line's data")
    return repo


def keep(store: LocalStore, db: ReviewDB, images: dict[str, Path], score: float = 3.0) -> None:
    """Keep each image as a flagged one (a map with one hot square above the threshold 1.0)."""
    retainer = Retainer(store, RetentionPolicy(max_days=0, max_per_line=0), index=db)
    now = _dt.datetime.now(_dt.timezone.utc)
    for i, (request_id, path) in enumerate(images.items()):
        amap = np.zeros((32, 32), np.float32)
        amap[4:12, 20:28] = 2.5
        retainer.offer(RetainedItem(request_id, LINE, now + _dt.timedelta(seconds=i), "flagged", load_rgb(path), amap,
                                    {"score": score, "threshold": 1.0, "anomalous": True, "decision": "anomalous",
                                     "model_version": "v1", "model_tag": "t", "latency_ms": 1.0}))
    assert retainer.join(60) and retainer.stored == len(images)


@pytest.fixture()
def kept(tmp_path: Path, demo_line_root: Path, review_db_url: str):
    """Three kept images, indexed in a review database on SQLite and on PostgreSQL (``review_db_url``)."""
    store, db = LocalStore(tmp_path / "store"), ReviewDB(review_db_url)
    images = {"fa1": demo_line_root / "test" / "good" / "000.png",
              "dm1": demo_line_root / "test" / "scratch" / "000.png",
              "dn1": demo_line_root / "test" / "hole" / "000.png"}
    keep(store, db, images)
    return store, db, images


def test_verdicts_history_latest_wins_and_errors(kept) -> None:
    store, db, _ = kept
    with pytest.raises(UnknownRequest, match="no kept image"):
        db.add_verdict("nope", "false_alarm", by="ann")
    with pytest.raises(InvalidVerdict, match="not one of"):
        db.add_verdict("fa1", "maybe", by="ann")
    with pytest.raises(InvalidVerdict, match="operator"):
        db.add_verdict("fa1", "false_alarm", by=" ")
    with pytest.raises(InvalidVerdict, match="folder name"):
        db.add_verdict("fa1", "defect", by="ann", defect_type="../x")
    db.add_verdict("fa1", "defect", by="ann", defect_type="scratch", note="looks scratched")
    db.add_verdict("fa1", "false_alarm", by="bob", note="rare pose, not a scratch")
    item = db.get("fa1")
    assert [v["verdict"] for v in item["history"]] == ["defect", "false_alarm"]
    assert item["verdict"]["by"] == "bob" and item["verdict"]["note"] == "rare pose, not a scratch"
    assert [i["request_id"] for i in db.queue(LINE, status="judged")] == ["fa1"]
    assert [i["request_id"] for i in db.queue(LINE, status="pending")] == ["dn1", "dm1"]  # newest first
    assert db.queue(LINE, min_score=5.0) == [] and len(db.queue(LINE, model_version="v1")) == 3
    summary = db.summary(LINE)
    assert summary["totals"] == {"flagged_today": 3, "flagged": 3, "judged": 1, "confirmed": 0, "false_alarms": 1,
                                 "bad_images": 0, "false_alarm_rate": 1.0}
    (version,) = summary["by_model_version"]  # the rate names the threshold its judged part was decided at
    assert (version["threshold_min"], version["threshold_max"]) == (1.0, 1.0)
    assert db.get("fa1")["sample_rate"] == 1.0  # flagged: always kept
    # a verdict on an image the store lost (expired) is refused and marks it
    image_key = db.get("dm1")["image_key"]
    (store.root / image_key).unlink()
    with pytest.raises(ImageExpired):
        db.add_verdict("dm1", "defect", by="ann", image_exists=store.exists(image_key))
    assert db.get("dm1")["history"] == [] and db.get("dm1")["expired_at"]


def test_bad_image_verdict_and_undo(kept) -> None:
    """A third verdict for what is no part: counted apart, never a false alarm, never pinned or exported;
    the operator's undo withdraws the verdict that counts (history keeps it)."""
    _, db, _ = kept
    db.add_verdict("fa1", "false_alarm", by="ann")
    db.add_verdict("dm1", "bad_image", by="ann", defect_type="scratch", accept_mask=True, note="lens covered")
    stored = db.get("dm1")["verdict"]
    assert (stored["verdict"], stored["defect_type"], stored["accept_mask"]) == ("bad_image", "", False)
    totals = db.summary(LINE)["totals"]
    assert (totals["judged"], totals["false_alarms"], totals["bad_images"], totals["false_alarm_rate"]) == (2, 1, 1, 1.0)
    assert [i["request_id"] for i in db.to_export(LINE)] == ["fa1"]  # never training data
    assert db.pinned_ids(LINE) == {"fa1"}  # retention may delete a bad image like any unjudged one
    assert "dm1" not in {r["request_id"] for r in db.kept_with_verdicts(LINE)}  # no evidence for a threshold
    # undo: back to pending, then to the earlier verdict when there was one
    assert db.withdraw_verdict("dm1", by="ann") is None
    assert db.get("dm1")["verdict"] is None and db.get("dm1")["history"][0]["withdrawn_by"] == "ann"
    assert "dm1" in {i["request_id"] for i in db.queue(LINE, status="pending")}
    with pytest.raises(InvalidVerdict, match="no verdict to undo"):
        db.withdraw_verdict("dm1", by="ann")
    db.add_verdict("fa1", "defect", by="bob", defect_type="scratch")
    assert db.withdraw_verdict("fa1", by="bob")["verdict"] == "false_alarm"
    assert db.get("fa1")["verdict"]["by"] == "ann" and len(db.get("fa1")["history"]) == 2


def test_camera_named_by_the_request_is_indexed(tmp_path: Path, demo_line_root: Path, review_db_url: str) -> None:
    store, db = LocalStore(tmp_path / "store"), ReviewDB(review_db_url)
    retainer = Retainer(store, RetentionPolicy(max_days=0, max_per_line=0), index=db)
    now = _dt.datetime.now(_dt.timezone.utc)
    for request_id, camera in (("c1", "cam-2"), ("c2", None)):
        info = {"score": 3.0, "threshold": 1.0, "anomalous": True, "decision": "anomalous", "model_version": "v1",
                "model_tag": "t", "latency_ms": 1.0, **({"camera": camera} if camera else {})}
        retainer.offer(RetainedItem(request_id, LINE, now, "flagged", load_rgb(demo_line_root / "test/good/000.png"),
                                    np.zeros((8, 8), np.float32), info))
    assert retainer.join(60)
    assert (db.get("c1")["camera"], db.get("c2")["camera"]) == ("cam-2", None)


def test_threshold_override_audited_and_version_bound(tmp_path: Path, trained_line: dict) -> None:
    store = LocalStore(tmp_path / "store")
    with pytest.raises(StorageError, match="no production model"):
        set_threshold_override(store, LINE, 1.5, "too many false alarms")
    publish_version(store, LINE, "v1", {"detector.pt": trained_line["detector"]}, {"promote": True})
    promote(store, LINE, "v1", by="t", reason="t")
    with pytest.raises(StorageError, match="reason"):
        set_threshold_override(store, LINE, 1.5, " ")
    with pytest.raises(StorageError, match="positive"):
        set_threshold_override(store, LINE, -1.0, "x")
    record = set_threshold_override(store, LINE, 1.5, "rare poses flagged", by="qa")
    assert record["model_version"] == "v1" and threshold_override(store, LINE)["value"] == 1.5
    assert effective_threshold(1.0, "v1", record) == 1.5 and effective_threshold(1.0, "v2", record) == 1.0
    set_threshold_override(store, LINE, None, "back to the model's", by="qa")
    assert threshold_override(store, LINE) is None
    assert [(r["value"], r["previous_value"]) for r in override_history(store, LINE)] == [(1.5, None), (None, 1.5)]


@pytest.mark.slow
def test_export_into_dvc_repo_then_pipeline_data_stage(tmp_path: Path, kept, demo_line_root: Path) -> None:
    from redi.workflow.stages import validate_data

    store, db, images = kept
    missing = tmp_path / "no-such-repo"
    with pytest.raises(ExportError, match="does not exist"):
        export_reviews(db, store, LINE, missing)
    repo = make_data_repo(tmp_path, demo_line_root)
    db.add_verdict("fa1", "false_alarm", by="ann", note="rare pose")
    db.add_verdict("dm1", "defect", by="ann", defect_type="scratch", accept_mask=True)
    db.add_verdict("dn1", "defect", by="ann", defect_type="hole")  # mask not accepted
    base = _sh(repo, "git", "rev-parse", "HEAD").strip()

    # dirty repository: a clear error, nothing written, nothing recorded
    (repo / "notes.txt").write_text("uncommitted")
    with pytest.raises(ExportError, match="uncommitted changes"):
        export_reviews(db, store, LINE, repo)
    assert db.exports(LINE) == [] and not list((repo / "data/lines" / LINE / "train" / "good").glob("review_*"))
    (repo / "notes.txt").unlink()
    # DVC-tracked data changed but not added: also dirty
    extra = repo / "data/lines" / LINE / "train" / "good" / "stray.png"
    shutil.copy(images["fa1"], extra)
    with pytest.raises(ExportError, match="differs from"):
        export_reviews(db, store, LINE, repo)
    extra.unlink()

    result = export_reviews(db, store, LINE, repo, by="ann")
    assert result.committed and result.revision != base
    assert _sh(repo, "git", "rev-parse", "HEAD").strip() == result.revision
    assert _sh(repo, "git", "status", "--porcelain").strip() == ""
    day = db.get("fa1")["date"]
    line_dir = repo / "data/lines" / LINE
    assert (line_dir / f"train/good/review_{day}_fa1.png").read_bytes() == store.get_bytes(db.get("fa1")["image_key"])
    mask = load_rgb(line_dir / f"ground_truth/scratch/review_{day}_dm1_mask.png")
    assert mask.shape[:2] == load_rgb(images["dm1"]).shape[:2] and mask.max() == 255 and mask.min() == 0
    assert [e["target"] for e in result.needs_mask] == [f"needs_mask/hole/review_{day}_dn1.png"]
    assert {e["request_id"]: e["revision"] for e in db.exports(LINE)} == {
        "fa1": result.revision, "dm1": result.revision, "dn1": result.revision}
    assert db.pinned_ids(LINE) == set()  # exported: retention may delete them now

    # repeated: nothing written twice, no new revision
    again = export_reviews(db, store, LINE, repo)
    assert not again.committed and again.revision == result.revision and len(db.exports(LINE)) == 3

    # the pipeline's data stage on that revision counts the false alarm as a normal training image
    fetched = tmp_path / "fetched"
    _sh(tmp_path, str(BIN / "dvc"), "get", str(repo), f"data/lines/{LINE}", "--rev", result.revision, "-o", str(fetched))
    manifest = json.loads(validate_data(fetched, tmp_path / "validated", profile_config("tiny")).read_text())
    ids = {f["image_id"] for f in manifest["files"]}
    assert f"train/good/review_{day}_fa1" in ids and f"test/scratch/review_{day}_dm1" in ids
    assert manifest["counts"]["train"]["good"] == len(list((demo_line_root / "train" / "good").glob("*.png"))) + 1
    assert not any("needs_mask" in i for i in ids)  # outside the folders the pipeline reads


@pytest.mark.slow
def test_bad_image_never_exported(tmp_path: Path, kept, demo_line_root: Path) -> None:
    store, db, _ = kept
    repo = make_data_repo(tmp_path, demo_line_root)
    db.add_verdict("fa1", "false_alarm", by="ann")
    db.add_verdict("dm1", "bad_image", by="ann", note="two caps in view")
    db.add_verdict("dn1", "false_alarm", by="ann")
    db.add_verdict("dn1", "bad_image", by="bob")  # the latest counts: no longer a training image
    result = export_reviews(db, store, LINE, repo, by="ann")
    assert [w["request_id"] for w in result.written] == ["fa1"] and result.needs_mask == []
    line_dir = repo / "data/lines" / LINE
    written = {p.name for p in line_dir.rglob("review_*")}
    assert written == {f"review_{db.get('fa1')['date']}_fa1.png"}
    assert {e["request_id"] for e in db.exports(LINE)} == {"fa1"}
    assert not export_reviews(db, store, LINE, repo).committed  # nothing left to export


def test_drawn_mask_checked_and_made_binary() -> None:
    import base64
    import io

    from PIL import Image

    from serving.review_pictures import drawn_mask_png

    def url(rgba: np.ndarray) -> str:
        buffer = io.BytesIO()
        Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    canvas = np.zeros((20, 30, 4), np.uint8)
    with pytest.raises(ValueError, match="empty"):
        drawn_mask_png(url(canvas), 30, 20)
    canvas[5:8, 10:15] = (255, 40, 40, 255)  # a brush stroke
    canvas[12:14, 2:4] = (255, 40, 40, 60)  # faint: an anti-aliased edge, not painted
    mask = np.asarray(Image.open(io.BytesIO(drawn_mask_png(url(canvas), 30, 20))))
    assert mask.shape == (20, 30) and set(np.unique(mask)) == {0, 255}
    assert np.array_equal(np.argwhere(mask), np.argwhere(canvas[..., 3] == 255))
    with pytest.raises(ValueError, match="30x20 px, the image 31x20"):
        drawn_mask_png(url(canvas), 31, 20)
    with pytest.raises(ValueError, match="not a PNG data URL"):
        drawn_mask_png("data:image/jpeg;base64,AAAA", 30, 20)
    with pytest.raises(ValueError, match="not a readable PNG"):
        drawn_mask_png("data:image/png;base64,AAAA", 30, 20)
