"""The evaluation gate: promote a candidate model only when it is good enough AND not a regression.

A candidate is promoted when both hold:

1. **Minimums**: each gated metric (``image_auroc``, ``pixel_auroc``, ``aupro``) is at least the
   line's minimum. A minimum above 0 on a metric that could not be measured (e.g. pixel metrics
   on a test set without masks) fails the check: a number nobody measured cannot pass a bar.
2. **Not worse than production**: the line's current production model is evaluated again on the
   *same* test data as the candidate (the candidate's dataset revision), and for each gated metric
   both models have, ``candidate >= production - tolerance``. The tolerance (default 0.01, i.e. one
   AUROC point) absorbs the run-to-run noise of retraining on the same data, so a retrain that is
   equal within noise still replaces the old model; a real drop is refused. Re-evaluating rather
   than reading the old model's stored metrics is what makes the comparison fair when the test set
   changed between revisions.

The decision and every check's reason are written as JSON (``decision.json``) and uploaded with
the version; :func:`gate_model` also moves the production pointer (last) when promoting.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from redi.config import RediConfig
from redi.errors import ConfigError
from redi.storage import ObjectStore, fetch_production_detector, promote, publish_version, version_key

GATED_METRICS = ("image_auroc", "pixel_auroc", "aupro")


@dataclass
class GatePolicy:
    """A line's minimums and the tolerance of the comparison with production."""

    min_image_auroc: float = 0.0
    min_pixel_auroc: float = 0.0
    min_aupro: float = 0.0
    tolerance: float = 0.01

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 <= float(value) <= 1.0 and name != "tolerance":
                raise ConfigError(f"gate minimum {name}={value} must lie in [0, 1]")
        if not 0.0 <= float(self.tolerance) < 1.0:
            raise ConfigError(f"gate tolerance {self.tolerance} must lie in [0, 1)")

    def minimums(self) -> dict[str, float]:
        """Gated metric -> its minimum."""
        return {"image_auroc": float(self.min_image_auroc), "pixel_auroc": float(self.min_pixel_auroc),
                "aupro": float(self.min_aupro)}


def _value(metrics: Mapping[str, Any] | None, name: str) -> float | None:
    value = (metrics or {}).get(name)
    return None if value is None else float(value)


def decide(candidate: Mapping[str, Any], policy: GatePolicy,
           production: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The gate's decision from metrics alone (pure: no files, no storage).

    Args:
        candidate: the candidate's ``metrics.json`` content.
        production: the production model's metrics on the same test data, or None when the line
            has no production model yet.

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
    from redi.models.detector import read_artifact

    path = Path(detector_path)
    meta = read_artifact(path).get("metadata", {})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    return f"{meta.get('version', 'v')}-{digest}"


def evaluate_production(store: ObjectStore, line: str, data_root: str | Path, cfg: RediConfig,
                        workdir: str | Path | None = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(production pointer, its metrics on ``data_root``'s test set), or None when there is none."""
    from redi.stages import evaluate

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        fetched = fetch_production_detector(store, line, Path(tmp) / "production.pt")
        if fetched is None:
            return None
        path, pointer = fetched
        metrics_path = evaluate(path, data_root, Path(tmp) / "eval", cfg, write_report=False)
        return pointer, json.loads(Path(metrics_path).read_text())


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
    if pointer is not None and pointer.get("version") == version:
        production_metrics = None  # the candidate IS the production model (a rerun): nothing to compare
    decision = decide(candidate, policy, production_metrics)
    decision.update({"line": line, "version": version, "policy": asdict(policy),
                     "candidate_metrics": {k: candidate.get(k) for k in (*GATED_METRICS, "pixel_ap", "threshold")},
                     "production_version": pointer.get("version") if pointer else None,
                     "production_metrics": ({k: production_metrics.get(k) for k in GATED_METRICS}
                                            if production_metrics else None),
                     "store": repr(store), "info": dict(info or {})})
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(decision, indent=2, default=str))
    files = {"detector.pt": detector_path, "metrics.json": metrics_path, "decision.json": out_path,
             **dict(artifacts or {})}
    index = publish_version(store, line, version, files,
                            {"promote": decision["promote"], "reasons": decision["reasons"],
                             "metrics": decision["candidate_metrics"], "info": dict(info or {})})
    decision["version_prefix"] = store.uri(version_key(line, version))
    decision["n_files_uploaded"] = len(index["files"])
    if decision["promote"]:
        decision["pointer"] = promote(store, line, version, {"metrics": decision["candidate_metrics"],
                                                             "reasons": decision["reasons"]},
                                      by="gate", reason="; ".join(decision["reasons"]))
    out_path.write_text(json.dumps(decision, indent=2, default=str))
    verdict = "PROMOTED" if decision["promote"] else "REFUSED"
    print(f"[gate] {line} {version}: {verdict}: " + "; ".join(decision["reasons"]), file=sys.stderr, flush=True)
    return decision
