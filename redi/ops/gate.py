"""The evaluation gate: promote a candidate model only when it is good enough AND not a regression.

A plant acts on the decision at the served threshold, not on AUROC, so the gate judges both the
ranking metrics and that decision. A candidate is promoted when both hold:

1. **Minimums**: each gated metric (``image_auroc``, ``pixel_auroc``, ``aupro``) is at least the
   line's minimum, and at the candidate's served threshold, on the line's labelled test data, its
   recall (defects caught) is at least ``min_recall`` and its false-call rate (good parts flagged)
   at most ``max_false_call_rate``. A bound on a number that could not be measured (pixel metrics
   on a test set without masks, recall on a test set without defects) fails the check unless it is
   switched off (0 for a minimum, 1 for a maximum): a number nobody measured cannot pass a bar.
2. **Not worse than production**: the line's current production model is evaluated again on the
   *same* test data as the candidate (the candidate's dataset revision), and for each gated metric
   both models have, ``candidate >= production - tolerance``. The tolerance (default 0.01, i.e. one
   AUROC point) absorbs the run-to-run noise of retraining on the same data, so a retrain that is
   equal within noise still replaces the old model; a real drop is refused. The decisions are
   compared alike, each model at its own served threshold (production's audited override when one
   is set for its version): recall may drop and false calls rise by at most ``rate_tolerance``.
   Re-evaluating rather than reading the old model's stored metrics is what makes the comparison
   fair when the test set changed between revisions.

The decision and every check's reason are written as JSON (``decision.json``) and uploaded with
the version; :func:`gate_model` also moves the production pointer (last) when promoting. That move
is a compare-and-swap (:func:`redi.ops.model_registry.move_production`): when production changed
after the gate evaluated it (an operator's rollback, another run's promotion), the gate scores the
model now in production and decides again, so it never undoes a move it did not judge against.

**Shadow period** (``gate.shadow_min_requests`` / ``gate.shadow_min_hours``, default 0 = none): a
candidate that passes is not promoted at once; the gate records the requirement in the version's
index, puts the candidate in shadow (the service scores live traffic with it beside production)
and :func:`promote_after_shadow` (``redi model promote``) promotes it only once the shadow log
(:mod:`redi.ops.shadow`, in the service's log folder) holds enough of its decisions.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from redi.core.config import RediConfig
from redi.core.errors import ConfigError, RediError
from redi.core.utils import sha256_file
from redi.ops.object_store import ObjectStore
from redi.ops.model_registry import (check_promotable, fetch_pointer_detector, move_production, move_shadow,
    production_record, promote, publish_version, same_pointer, shadow_record, version_index, version_key)
from redi.ops.shadow import (SHADOW_FOLDER, SHADOW_SEGMENTS, shadow_period_problems, shadow_report, shadow_rows,
                             shadow_rows_from_store)

GATED_METRICS = ("image_auroc", "pixel_auroc", "aupro")
# the decision at the served threshold: name -> True when higher is better
GATED_RATES = {"recall": True, "false_call_rate": False}
SHADOW_FIELDS = ("shadow_min_requests", "shadow_min_hours")


@dataclass
class GatePolicy:
    """A line's minimums and the tolerance of the comparison with production."""

    min_image_auroc: float = 0.0
    min_pixel_auroc: float = 0.0
    min_aupro: float = 0.0
    tolerance: float = 0.01
    min_recall: float = 0.8
    max_false_call_rate: float = 0.1
    rate_tolerance: float = 0.05
    shadow_min_requests: int = 0  # live requests a candidate must be scored on in shadow before promotion
    shadow_min_hours: float = 0.0  # hours of logged shadow traffic (first to last row) before promotion

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 <= float(value) <= 1.0 and name not in ("tolerance", *SHADOW_FIELDS):
                raise ConfigError(f"gate bound {name}={value} must lie in [0, 1]")
        if not 0.0 <= float(self.tolerance) < 1.0:
            raise ConfigError(f"gate tolerance {self.tolerance} must lie in [0, 1)")
        if int(self.shadow_min_requests) < 0 or float(self.shadow_min_hours) < 0:
            raise ConfigError(f"gate.shadow_min_requests ({self.shadow_min_requests}) and gate.shadow_min_hours "
                              f"({self.shadow_min_hours}) must be >= 0 (0: no shadow period required)")

    def shadow_required(self) -> dict[str, Any] | None:
        """The shadow period a passed candidate needs before promotion, or None when none is required."""
        if int(self.shadow_min_requests) <= 0 and float(self.shadow_min_hours) <= 0:
            return None
        return {"min_requests": int(self.shadow_min_requests), "min_hours": float(self.shadow_min_hours)}

    def minimums(self) -> dict[str, float]:
        """Gated metric -> its minimum."""
        return {"image_auroc": float(self.min_image_auroc), "pixel_auroc": float(self.min_pixel_auroc),
                "aupro": float(self.min_aupro)}


def _value(metrics: Mapping[str, Any] | None, name: str) -> float | None:
    value = (metrics or {}).get(name)
    return None if value is None else float(value)


def _rate(metrics: Mapping[str, Any] | None, name: str) -> float | None:
    """A rate at the served threshold (``metrics.json``'s ``operating_point``), or None."""
    return _value((metrics or {}).get("operating_point"), name)


def _served(metrics: Mapping[str, Any] | None) -> str:
    threshold = _value((metrics or {}).get("operating_point"), "threshold")
    return "?" if threshold is None else f"{threshold:.4g}"


def _pct(rate: float) -> str:
    return f"{100 * rate:.1f} %"


def _rate_minimums(candidate: Mapping[str, Any], policy: GatePolicy) -> list[dict[str, Any]]:
    """The decision at the candidate's served threshold against the line's bounds."""
    at = f"at the served threshold {_served(candidate)}"
    point = candidate.get("operating_point") or {}
    checks = []
    for name, bound, higher in (("recall", float(policy.min_recall), True),
                                ("false_call_rate", float(policy.max_false_call_rate), False)):
        value = _rate(candidate, name)
        off = bound <= 0.0 if higher else bound >= 1.0
        what = "defects caught" if higher else "good parts flagged"
        if value is None:
            passed = off
            reason = (f"{name} not measured, no bound set" if passed else
                      f"{name} ({what}) not measured on the test data (no "
                      f"{'defective' if higher else 'good'} test images) but the line requires "
                      f"{'>=' if higher else '<='} {_pct(bound)}: add labelled test images or set gate."
                      f"{'min_recall=0' if higher else 'max_false_call_rate=1'}")
        else:
            passed = value >= bound if higher else value <= bound
            counts = (f"{point.get('tp')} of {point.get('tp', 0) + point.get('fn', 0)}" if higher
                      else f"{point.get('fp')} of {point.get('fp', 0) + point.get('tn', 0)}")
            reason = (f"{name} {_pct(value)} ({counts} {what}) {at} "
                      + (f"{'>=' if higher else '<='} {_pct(bound)}" if passed else
                         f"is {'below the line minimum' if higher else 'above the line maximum'} {_pct(bound)}"))
        checks.append({"metric": name, "kind": "minimum" if higher else "maximum", "value": value, "bound": bound,
                       "threshold": _value(point, "threshold"), "passed": passed, "reason": reason})
    return checks


def _rates_vs_production(candidate: Mapping[str, Any], production: Mapping[str, Any],
                         policy: GatePolicy) -> list[dict[str, Any]]:
    """Candidate and production decisions, each at its own served threshold."""
    checks = []
    for name, higher in GATED_RATES.items():
        value, old = _rate(candidate, name), _rate(production, name)
        if value is None or old is None:
            continue
        bound = old - policy.rate_tolerance if higher else old + policy.rate_tolerance
        passed = value >= bound - 1e-12 if higher else value <= bound + 1e-12
        both = (f"{name} {_pct(value)} at the candidate's threshold {_served(candidate)} vs production's "
                f"{_pct(old)} at its threshold {_served(production)}")
        checks.append({"metric": name, "kind": "vs_production", "value": value, "bound": bound, "production": old,
                       "threshold": _value(candidate.get("operating_point"), "threshold"),
                       "production_threshold": _value(production.get("operating_point"), "threshold"),
                       "passed": passed,
                       "reason": (f"{both} (tolerance {policy.rate_tolerance})" if passed else
                                  f"{both}: {'fewer defects caught' if higher else 'more good parts flagged'} than "
                                  f"production on the same test data (allowed {policy.rate_tolerance})")})
    return checks


def decide(candidate: Mapping[str, Any], policy: GatePolicy,
           production: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The gate's decision from metrics alone (pure: no files, no storage).

    Args:
        candidate: the candidate's ``metrics.json`` content (its ``operating_point``: the decision
            at its served threshold).
        production: the production model's metrics on the same test data at its own served
            threshold, or None when the line has no production model yet.

    Returns:
        ``{"promote": bool, "reasons": [str], "checks": [{metric, kind, value, bound, passed}]}``;
        ``reasons`` names every failed check, or says why the model passed.
    """
    checks: list[dict[str, Any]] = []
    for name, minimum in policy.minimums().items():
        value = _value(candidate, name)
        passed = (value is not None and value >= minimum) or (value is None and minimum <= 0.0)
        checks.append({"metric": name, "kind": "minimum", "value": value, "bound": minimum, "passed": passed,
                       "reason": (f"{name} {value:.4f} >= minimum {minimum:.4f}" if passed and value is not None
                                  else f"{name} not measured, no minimum set" if passed
                                  else f"{name} not measured but the line requires >= {minimum:.4f}"
                                  if value is None else f"{name} {value:.4f} is below the minimum {minimum:.4f}")})
    checks += _rate_minimums(candidate, policy)
    if production is not None:
        for name in GATED_METRICS:
            value, old = _value(candidate, name), _value(production, name)
            if value is None or old is None:
                continue
            bound = old - policy.tolerance
            passed = value >= bound
            checks.append({"metric": name, "kind": "vs_production", "value": value, "bound": bound,
                           "production": old, "passed": passed,
                           "reason": (f"{name} {value:.4f} vs production {old:.4f} (tolerance {policy.tolerance})"
                                      if passed else
                                      f"{name} {value:.4f} is worse than the production model's {old:.4f} "
                                      f"on the same test data (allowed drop {policy.tolerance})")})
        checks += _rates_vs_production(candidate, production, policy)
    failed = [c["reason"] for c in checks if not c["passed"]]
    promote_it = not failed
    if promote_it:
        reasons = ["meets the line's minimums" + (" and is not worse than the production model"
                                                   if production is not None else "; the line has no production model yet")]
    else:
        reasons = failed
    return {"promote": promote_it, "reasons": reasons, "checks": checks}


def model_version(detector_path: str | Path) -> str:
    """The version id of a detector: its training timestamp plus a content hash (unique per file)."""
    from redi.methods.base import read_artifact

    path = Path(detector_path)
    meta = read_artifact(path).get("metadata", {})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    return f"{meta.get('version', 'v')}-{digest}"


def _at_override(metrics: dict[str, Any], scores_path: Path, threshold: float) -> dict[str, Any]:
    """``metrics`` with its decision numbers recomputed at ``threshold`` (an audited override)."""
    from redi.core.operating_point import decision_stats

    rows = json.loads(scores_path.read_text())
    point = decision_stats([r["label"] for r in rows], [r["score"] for r in rows], threshold)
    return {**metrics, "threshold": threshold, "threshold_source": "override", "operating_point": point}


def evaluate_production(store: ObjectStore, line: str, data_root: str | Path, cfg: RediConfig,
                        workdir: str | Path | None = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(production pointer, its metrics on ``data_root``'s test set), or None when there is none.

    The decision numbers are those at the threshold production serves: its own, or the line's
    audited override when one is set for its version (``redi.ops.thresholds``).
    """
    pointer = production_record(store, line)
    return None if pointer is None else (pointer, evaluate_pointer(store, line, pointer, data_root, cfg, workdir))


def evaluate_pointer(store: ObjectStore, line: str, pointer: Mapping[str, Any], data_root: str | Path,
                     cfg: RediConfig, workdir: str | Path | None = None) -> dict[str, Any]:
    """The metrics on ``data_root``'s test set of the model a production pointer (as read) names, at
    the threshold it serves (see :func:`evaluate_production`)."""
    from redi.workflow.stages import evaluate
    from redi.ops.thresholds import effective_threshold, threshold_override

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = fetch_pointer_detector(store, line, pointer, Path(tmp) / "production.pt")
        metrics_path = evaluate(path, data_root, Path(tmp) / "eval", cfg, write_report=False)
        metrics = {**json.loads(Path(metrics_path).read_text()), "threshold_source": "model"}
        served = effective_threshold(metrics["threshold"], str(pointer.get("version")),
                                     threshold_override(store, line))
        if served != metrics["threshold"]:
            metrics = _at_override(metrics, Path(metrics_path).parent / "scores.json", served)
        return metrics


def decision_summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The gated numbers of a ``metrics.json``, each decision number beside its threshold."""
    point = metrics.get("operating_point") or {}
    return {**{k: metrics.get(k) for k in (*GATED_METRICS, "pixel_ap")},
            "threshold": metrics.get("threshold"), "threshold_policy": metrics.get("threshold_policy"),
            "threshold_source": metrics.get("threshold_source", "model"),
            **{f"{k}_at_threshold": point.get(k) for k in ("recall", "escape_rate", "false_call_rate")},
            **{k: point.get(k) for k in ("tp", "fn", "fp", "tn")}}


def gate_model(line: str, detector_path: str | Path, metrics_path: str | Path, data_root: str | Path,
               cfg: RediConfig, policy: GatePolicy, store: ObjectStore, out_path: str | Path,
               artifacts: Mapping[str, str | Path] | None = None,
               info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Decide on a candidate, upload its version (always), and promote it (pointer last) when it passes.

    Args:
        detector_path, metrics_path: the candidate's ``detector.pt`` and ``metrics.json``.
        data_root: the dataset the candidate was evaluated on (the production model is scored on it).
        artifacts: further files / folders uploaded with the version (report, manifest, ...).
        info: recorded in the decision (data revision, run id, ...).
        out_path: where ``decision.json`` is written.

    Returns:
        the decision: ``promote``, ``reasons``, ``checks``, ``version``, ``candidate_metrics``,
        ``production_metrics``, ``production_version``, ``store``, ``version_prefix`` and, when
        promoted, ``pointer``.
    """
    candidate = json.loads(Path(metrics_path).read_text())
    version = model_version(detector_path)
    production = evaluate_production(store, line, data_root, cfg, Path(out_path).parent)
    pointer, production_metrics = production if production else (None, None)
    decision = _decision(line, version, candidate, policy, pointer, production_metrics, store, info)
    # a shadow period needs a production model to answer beside the candidate: a line's first model is promoted
    shadow = (policy.shadow_required() if decision["promote"] and pointer is not None
              and pointer.get("version") != version else None)
    if shadow:  # passed, but promoted only after a shadow period on live traffic (redi model promote)
        decision.update(promote=False, passed=True, shadow_required=shadow, reasons=[
            *decision["reasons"], f"promotion waits for a shadow period ({_shadow_terms(shadow)}): the candidate "
            f"is put in shadow; `redi model promote` promotes it once the period is logged"])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(decision, indent=2, default=str))
    files = {"detector.pt": detector_path, "metrics.json": metrics_path, "decision.json": out_path,
             **dict(artifacts or {})}
    index = publish_version(store, line, version, files, _index_info(decision, info))
    decision["version_prefix"] = store.uri(version_key(line, version))
    decision["n_files_uploaded"] = len(index["files"])
    if shadow:
        decision["shadow_pointer"] = move_shadow(store, line, version, by="gate",
                                                 reason="passed the gate; shadow period before promotion")
    elif decision["promote"]:
        decision = _move_if_still_better(store, line, version, candidate, policy, decision, pointer, data_root,
                                         cfg, out_path, info)
    out_path.write_text(json.dumps(decision, indent=2, default=str))
    verdict = "PROMOTED" if decision["promote"] else "REFUSED"
    print(f"[gate] {line} {version}: {verdict}: " + "; ".join(decision["reasons"]) + f" (store: {store.describe()})",
          file=sys.stderr, flush=True)
    return decision


def _decision(line: str, version: str, candidate: Mapping[str, Any], policy: GatePolicy,
              pointer: Mapping[str, Any] | None, production_metrics: Mapping[str, Any] | None,
              store: ObjectStore, info: Mapping[str, Any] | None) -> dict[str, Any]:
    """:func:`decide` against a production pointer as read, with the fields ``decision.json`` records."""
    if pointer is not None and pointer.get("version") == version:
        production_metrics = None  # the candidate IS the production model (a rerun): nothing to compare
    decision = decide(candidate, policy, production_metrics)
    decision.update({"line": line, "version": version, "policy": asdict(policy),
                     "candidate_metrics": decision_summary(candidate),
                     "production_version": pointer.get("version") if pointer else None,
                     "production_metrics": decision_summary(production_metrics) if production_metrics else None,
                     "store": repr(store), "info": dict(info or {})})
    return decision


def _index_info(decision: Mapping[str, Any], info: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a version's index records of the gate's decision (``promote`` is what promotion checks)."""
    recorded = {"promote": bool(decision.get("passed", decision["promote"])), "reasons": decision["reasons"],
                "metrics": decision["candidate_metrics"], "info": dict(info or {})}
    if decision.get("shadow_required"):  # travels with the version: every later promotion checks it
        recorded["shadow_required"] = decision["shadow_required"]
    return recorded


def _shadow_terms(required: Mapping[str, Any]) -> str:
    terms = [f"{required['min_requests']} live requests" if required.get("min_requests") else "",
             f"{required['min_hours']:g} h" if required.get("min_hours") else ""]
    return " and ".join(t for t in terms if t)


class ShadowPeriodError(RediError):
    """A promotion was refused: the candidate has not run in shadow long enough."""


def promote_after_shadow(store: ObjectStore, line: str, version: str, log_dir: str | Path | None,
                         record: Mapping[str, Any] | None = None, *, by: str = "",
                         reason: str = "") -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Promote ``version`` (:func:`redi.ops.model_registry.promote`) once its shadow period is logged.

    The period required is the one the gate recorded in the version's index (``shadow_required``,
    from ``gate.shadow_min_requests`` / ``gate.shadow_min_hours`` when it judged the version); the
    traffic seen is read from the shadow log in ``log_dir`` (the service's ``REDI_LOG_DIR``,
    :mod:`redi.ops.shadow`), or with ``log_dir=None`` from every serving host's shadow log shipped to
    ``store``. A promoted candidate leaves shadow.

    Returns:
        (the production pointer, the shadow report it was judged on or None when none was required).

    Raises:
        ShadowPeriodError: not enough shadow traffic yet (the message says how much, and what to do).
    """
    index = version_index(store, line, version) or {}
    required = (index.get("info") or {}).get("shadow_required")
    report = None
    if required:
        rows = (shadow_rows_from_store(store, line, version) if log_dir is None
                else shadow_rows(log_dir, line, version))
        report = shadow_report(rows, line, version)
        problems = shadow_period_problems(report, int(required.get("min_requests", 0)),
                                          float(required.get("min_hours", 0.0)))
        if problems:
            raise ShadowPeriodError(f"line {line}: version {version} is not promoted: " + "; ".join(problems) +
                                    f" (shadow log: {_shadow_source(store, log_dir)})")
    summary = None if report is None else {k: report[k] for k in ("n", "hours", "agreement", "production_flag_rate",
                                                                   "shadow_flag_rate")}
    pointer = promote(store, line, version, {**dict(record or {}), "shadow": summary}, by=by, reason=reason)
    if (shadow_record(store, line) or {}).get("version") == version:
        move_shadow(store, line, None, by=by, reason=f"promoted to production: {reason}")
    return pointer, report


def _shadow_source(store: ObjectStore, log_dir: str | Path | None) -> str:
    """Where the shadow rows were read, for messages."""
    if log_dir is not None:
        return str(Path(log_dir) / SHADOW_FOLDER)
    return f"{SHADOW_SEGMENTS}/ of every host in {store.describe() if hasattr(store, 'describe') else store!r}"


def _move_if_still_better(store: ObjectStore, line: str, version: str, candidate: Mapping[str, Any],
                          policy: GatePolicy, decision: dict[str, Any], evaluated: Mapping[str, Any] | None,
                          data_root: str | Path, cfg: RediConfig, out_path: Path,
                          info: Mapping[str, Any] | None) -> dict[str, Any]:
    """Move the pointer to the candidate by compare-and-swap; when production changed since it was
    evaluated (a rollback, another promotion), compare the candidate again with the model now in
    production and move only if it still passes. Returns the final decision."""
    state = {"decision": decision, "seen": evaluated}
    check_promotable(store, line, version)  # the uploaded detector is the one judged (complete, same sha256)

    def propose(current: dict[str, Any] | None) -> dict[str, Any] | None:
        if current is not None and current.get("version") == version:
            return None  # a rerun of the gate on the production model: nothing moves
        if not same_pointer(current, state["seen"]):  # production moved while the gate worked
            metrics = None
            if current is not None:
                metrics = evaluate_pointer(store, line, current, data_root, cfg, out_path.parent)
            again = _decision(line, version, candidate, policy, current, metrics, store, info)
            again["redecided"] = [*state["decision"].get("redecided", []),
                                  {"was_production": (state["seen"] or {}).get("version"),
                                   "now_production": (current or {}).get("version"),
                                   "now_by": (current or {}).get("by"), "now_action": (current or {}).get("action"),
                                   "previous_decision": state["decision"]["promote"]}]
            again.update({k: state["decision"][k] for k in ("version_prefix", "n_files_uploaded")})
            state["decision"], state["seen"] = again, current
            if not again["promote"]:
                return None
        d = state["decision"]
        index = version_index(store, line, version) or {}
        names = {entry["name"]: entry["key"] for entry in index.get("files", [])}
        return {"metrics": d["candidate_metrics"], "reasons": d["reasons"], "line": line, "version": version,
                "index": version_key(line, version, "index.json"), "detector": names.get("detector.pt"),
                "sha256": next((e["sha256"] for e in index.get("files", []) if e["name"] == "detector.pt"), None),
                "files": names, "reason": "; ".join(d["reasons"])}

    moved = move_production(store, line, propose, action="promote", by="gate", version_hint=version,
                            based_on=evaluated)
    final = state["decision"]
    if moved is not None:
        final["pointer"] = moved
    elif final["promote"]:
        final["pointer"] = production_record(store, line)  # already there (a rerun, or another writer)
    if final.get("redecided"):
        _republish_decision(store, line, version, final, out_path, info)
    return final


def _republish_decision(store: ObjectStore, line: str, version: str, decision: Mapping[str, Any], out_path: Path,
                        info: Mapping[str, Any] | None) -> None:
    """After a re-decision, the version's ``decision.json`` and index say the final decision (a
    candidate refused against the model now in production cannot be promoted by hand either)."""
    out_path.write_text(json.dumps(decision, indent=2, default=str))
    key = version_key(line, version, "decision.json")
    store.put_file(key, out_path)
    index = dict(version_index(store, line, version) or {})
    index["files"] = [{**e, "size": out_path.stat().st_size, "sha256": sha256_file(out_path)} if e["key"] == key
                      else e for e in index.get("files", [])]
    index["info"] = {**_index_info(decision, info), "redecided": decision.get("redecided", [])}
    store.put_json(version_key(line, version, "index.json"), index)
