"""A threshold proposed from the operators' verdicts (``redi review threshold --suggest``).

The review database holds, per kept part, its score, the threshold it was decided with and the
operators' latest verdict: ``defect`` (a real defect) or ``false_alarm`` (a good part). Those are
labelled scores from the line itself, so they say what any other threshold would do to it. Two
things keep that from being a plain count:

- **Scores of different model versions are not on one scale.** Only the parts of one version are
  used: the one the line serves now (the latest version with verdicts) unless asked for another.
- **The kept parts are a biased sample.** Every flagged part is kept (kind ``flagged``), but only
  a share ``r`` of the passed ones (kind ``sampled``, ``REDI_RETAIN_NORMAL_RATE``). A judged sampled
  part therefore stands for ``1/r`` passed parts, a flagged one for itself: rates are estimated
  with those weights (a Horvitz-Thompson estimate). Unweighted, the good parts would look mostly
  flagged and every false-call rate would be far too high.

The weights assume that the judged parts of each kind stand for all kept parts of that kind
(operators judge every kept part of the period, or the same random share of each kind): the
proposal warns when the judged shares of the two kinds differ by more than a factor of 2.

Convention (``redi.core.operating_point``): a part is flagged when ``score > threshold``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from redi.core.operating_point import decision_stats, tradeoff_curve
from redi.ops.review import ReviewDB, ReviewError

MIN_DEFECTS = 5  # fewer judged defects than this: recall moves by 20 points per part
MIN_GOOD = 20  # fewer judged good parts than this: the false-call rate cannot resolve a 5 % target
SHARE_RATIO_LIMIT = 2.0  # judged share of flagged vs sampled parts beyond this: the weights are off


def _pick_version(rows: list[dict[str, Any]], line: str, model_version: str) -> str:
    """The asked version, else the one whose latest judged part is the newest (the one served now)."""
    judged = [r for r in rows if r["verdict"] is not None]
    if not judged:
        raise ReviewError(f"line {line!r} has {len(rows)} kept parts but no verdict yet: judge flagged parts and "
                          f"sampled normal ones at /review/line/{line} (real defect / false alarm), then rerun")
    versions = sorted({r["model_version"] for r in judged})
    if not model_version:
        return max(judged, key=lambda r: r["time"])["model_version"]
    if model_version not in versions:
        raise ReviewError(f"model version {model_version!r} of line {line!r} has no judged part; versions with "
                          f"verdicts: {versions}")
    return model_version


def _weights(judged: list[dict[str, Any]], normal_rate: float | None, line: str, version: str) -> np.ndarray:
    """1 for a flagged part, 1/sample_rate for a sampled one (``normal_rate`` where none is recorded)."""
    if normal_rate is not None and not 0.0 < normal_rate <= 1.0:
        raise ReviewError(f"--normal-rate {normal_rate} must lie in (0, 1]: the share of passed parts the service kept")
    unknown = sum(r["kind"] != "flagged" and r["sample_rate"] is None for r in judged)
    if unknown and normal_rate is None:
        raise ReviewError(f"{unknown} judged sampled parts of line {line!r}, model {version}, were kept before redi "
                          f"recorded the sampling rate: pass --normal-rate R, the REDI_RETAIN_NORMAL_RATE the "
                          f"service ran with for this line (e.g. 0.01)")
    rates = [1.0 if r["kind"] == "flagged" else (r["sample_rate"] if r["sample_rate"] is not None else normal_rate)
             for r in judged]
    if any(not 0.0 < rate <= 1.0 for rate in rates):
        raise ReviewError(f"a judged part of line {line!r} has a sampling rate outside (0, 1]; the record is corrupt")
    return 1.0 / np.asarray(rates, dtype=np.float64)


def weighted_stats(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray, threshold: float) -> dict[str, Any]:
    """Estimated rates over all parts at ``threshold``: :func:`redi.core.operating_point.decision_stats` of each
    group of equal weight, its counts summed with the weights.

    Returns ``threshold``, ``recall``, ``escape_rate``, ``false_call_rate``, ``flag_rate`` (share of
    all parts flagged: what ``/metrics`` shows), the weighted ``tp/fn/fp/tn`` and the judged parts'
    own ``counts`` (unweighted).
    """
    weighted = dict.fromkeys(("tp", "fn", "fp", "tn"), 0.0)
    for weight in np.unique(weights):
        group = weights == weight
        stats = decision_stats(labels[group], scores[group], threshold)
        for key in weighted:
            weighted[key] += float(weight) * stats[key]
    tp, fn, fp, tn = (weighted[k] for k in ("tp", "fn", "fp", "tn"))
    plain = decision_stats(labels, scores, threshold)
    return {"threshold": float(threshold), "recall": tp / (tp + fn), "escape_rate": fn / (tp + fn),
            "false_call_rate": fp / (fp + tn), "flag_rate": (tp + fp) / (tp + fn + fp + tn),
            "weighted": weighted, "counts": {k: plain[k] for k in ("tp", "fn", "fp", "tn")}}


def _short(low: float, high: float) -> float:
    """The number with the fewest significant digits near the middle of ``(low, high)`` (``low`` when
    none is): every threshold in ``[low, high)`` makes the same decisions on the judged parts, and one
    off the judged scores themselves is less tuned to them (and shorter to type)."""
    for digits in range(2, 18):
        value = float(f"{(low + high) / 2:.{digits}g}")
        if low < value < high:
            return value
    return low


def _best(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray, target: float) -> dict[str, Any]:
    """Among thresholds with estimated false calls <= target: the highest recall, then fewest false calls."""
    candidates = tradeoff_curve(labels, scores)["threshold"]  # every threshold that changes a decision
    stats = [weighted_stats(labels, scores, weights, t) for t in candidates]
    feasible = [i for i, s in enumerate(stats) if s["false_call_rate"] <= target + 1e-12]  # the top one always is
    i = max(feasible, key=lambda k: (stats[k]["recall"], -stats[k]["false_call_rate"]))
    # the middle of the interval with the same decisions, not a judged part's own score
    upper = float(candidates[i + 1]) if i + 1 < len(candidates) else float(candidates[i])
    return weighted_stats(labels, scores, weights, _short(float(candidates[i]), upper))


def _counts(rows: list[dict[str, Any]], judged: list[dict[str, Any]]) -> dict[str, int]:
    def n(items: list[dict[str, Any]], **match: Any) -> int:
        return sum(all(r[k] == v for k, v in match.items()) for r in items)

    return {"judged_defects": n(judged, verdict="defect"), "judged_good": n(judged, verdict="false_alarm"),
            "judged_flagged": n(judged, kind="flagged"), "judged_sampled": n(judged, kind="sampled"),
            "judged_sampled_defects": n(judged, kind="sampled", verdict="defect"),
            "judged_sampled_good": n(judged, kind="sampled", verdict="false_alarm"),
            "kept_flagged": n(rows, kind="flagged"), "kept_sampled": n(rows, kind="sampled")}


def _check_classes(counts: dict[str, int], line: str, version: str) -> None:
    if not counts["judged_defects"] or not counts["judged_good"]:
        missing = "real defect" if not counts["judged_defects"] else "good part (false alarm)"
        raise ReviewError(f"line {line!r}, model {version}: {counts['judged_defects']} judged defects and "
                          f"{counts['judged_good']} judged good parts; a threshold needs both, and no {missing} is "
                          f"judged yet: judge more kept parts at /review/line/{line}")
    if not counts["judged_sampled_good"]:
        raise ReviewError(f"line {line!r}, model {version}: none of the {counts['judged_good']} judged good parts is "
                          f"a sampled (passed) one, so the false-call rate among all good parts cannot be estimated "
                          f"(flagged parts alone make every good part look flagged): judge parts of kind 'sampled "
                          f"normal' at /review/line/{line}; REDI_RETAIN_NORMAL_RATE > 0 keeps them")


def _warnings(counts: dict[str, int], suggested: dict[str, Any]) -> list[str]:
    warnings = []
    if counts["judged_defects"] < MIN_DEFECTS or counts["judged_good"] < MIN_GOOD:
        warnings.append(f"too few verdicts to trust these rates: {counts['judged_defects']} judged defects "
                        f"(want {MIN_DEFECTS}+) and {counts['judged_good']} judged good parts (want {MIN_GOOD}+); "
                        f"judge more parts before applying")
    if not counts["judged_sampled_defects"]:
        warnings.append("no judged sampled (passed) part is a defect: escapes at the served threshold are unseen, "
                        "so its recall reads 1 and lower thresholds gain nothing here; the true recall is lower")
    shares = [counts["judged_flagged"] / counts["kept_flagged"] if counts["kept_flagged"] else 0.0,
              counts["judged_sampled"] / counts["kept_sampled"] if counts["kept_sampled"] else 0.0]
    if min(shares) > 0 and max(shares) / min(shares) > SHARE_RATIO_LIMIT:
        warnings.append(f"operators judged {100 * shares[0]:.0f} % of the kept flagged parts but {100 * shares[1]:.0f} "
                        f"% of the kept sampled ones: the weights assume the judged parts of each kind stand for "
                        f"all of that kind; judge the same share of both")
    if suggested["recall"] == 0.0:
        warnings.append("no threshold keeps the false-call rate at the target and still catches a judged defect")
    return warnings


def suggest_threshold(db: ReviewDB, line: str, false_call_target: float = 0.01, model_version: str = "",
                      normal_rate: float | None = None) -> dict[str, Any]:
    """Propose a line's threshold from its operators' verdicts; nothing is applied.

    Uses the judged kept parts of one model version (``model_version``, default the latest one with
    verdicts), labels them by their latest verdict, weights each by 1/its sampling rate (module
    docstring) and picks, among the thresholds whose estimated false-call rate is at most
    ``false_call_target``, the one with the highest estimated recall (then the fewest false calls),
    placed midway between the judged scores around it.

    Args:
        normal_rate: the sampling rate of sampled parts kept before the rate was recorded.

    Returns:
        ``line``, ``model_version``, ``false_call_target``, ``suggested`` and ``served`` (each as
        :func:`weighted_stats`; ``served`` at the threshold of the version's latest kept part),
        ``served_thresholds`` (min / max the judged parts were decided with), ``counts`` (judged
        defects / good parts, flagged / sampled, kept per kind) and ``warnings``.

    Raises:
        ReviewError: an unknown line, no verdicts, only one class judged, no judged sampled good
            part, a target outside (0, 1) or an unknown sampling rate without ``normal_rate``.
    """
    if not 0.0 < false_call_target < 1.0:
        raise ReviewError(f"--false-call-target {false_call_target} must lie in (0, 1), e.g. 0.01 for 1 % of good parts")
    rows = db.kept_with_verdicts(line)
    if not rows:
        raise ReviewError(f"line {line!r} has no kept parts in {db!r} (lines there: {db.lines()}); check --line and "
                          f"--db / REDI_REVIEW_DB (the database the service writes)")
    version = _pick_version(rows, line, model_version)
    rows = [r for r in rows if r["model_version"] == version]
    judged = [r for r in rows if r["verdict"] is not None]
    counts = _counts(rows, judged)
    _check_classes(counts, line, version)
    labels = np.array([r["verdict"] == "defect" for r in judged])
    scores = np.array([r["score"] for r in judged], dtype=np.float64)
    weights = _weights(judged, normal_rate, line, version)
    suggested = _best(labels, scores, weights, false_call_target)
    served = weighted_stats(labels, scores, weights, float(rows[-1]["threshold"]))  # rows are oldest first
    thresholds = [float(r["threshold"]) for r in judged]
    return {"line": line, "model_version": version, "false_call_target": false_call_target,
            "suggested": suggested, "served": served,
            "served_thresholds": {"min": min(thresholds), "max": max(thresholds)},
            "counts": counts, "sample_weights": sorted({float(w) for w in weights}),
            "warnings": _warnings(counts, suggested)}


def apply_command(suggestion: dict[str, Any]) -> str:
    """The audited override that would apply the suggestion (``redi review threshold --value``)."""
    import shlex

    s, served = suggestion["suggested"], suggestion["served"]
    reason = (f"suggested from {suggestion['counts']['judged_defects'] + suggestion['counts']['judged_good']} verdicts:"
              f" est. false calls {_pct(served['false_call_rate'])} -> {_pct(s['false_call_rate'])}, recall "
              f"{_pct(served['recall'])} -> {_pct(s['recall'])}")
    return (f"redi review threshold --line {shlex.quote(suggestion['line'])} --version "
            f"{shlex.quote(suggestion['model_version'])} --value {s['threshold']!r} --reason {shlex.quote(reason)}")


def _pct(rate: float) -> str:
    return f"{100 * rate:.1f} %" if math.isfinite(rate) else "-"


__all__ = ["MIN_DEFECTS", "MIN_GOOD", "apply_command", "suggest_threshold", "weighted_stats"]
