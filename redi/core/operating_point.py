"""The operating point: the threshold a line serves, and what it does to the parts at that threshold.

A plant acts on one decision per part (reject or pass) at the served threshold, so this module
holds both halves of that decision:

- **Threshold policies** (a name registry, :func:`register_policy`): how the threshold is set
  from the scores of held-out *normal* images only, for the share of good parts the line accepts
  to re-inspect (``eval.false_call_target``). A line has 4-35 held-out normals, so the empirical
  99th percentile is simply their maximum, and one unusual normal puts it above nearly every
  defect. The policies therefore fit a law to the held-out scores and read the threshold off the
  fit where a new normal's expected false-call rate is the target; the default, ``gumbel_trimmed``,
  fits the lowest 80 % only, so a few unusual normals at the top cannot drag it up. ``max`` is the
  rule before policies existed (``eval.threshold_quantile`` of the scores, default their
  maximum), kept for old lines and for comparison. Which policy holds its target was measured on
  held-out normals (``docs/threshold_policy.md``).
- **Decision statistics** (:func:`decision_stats`, :func:`tradeoff_curve`, :func:`achievable`):
  the confusion matrix, recall (caught defects), escapes and false calls at a threshold, the
  false-call vs escape curve over every threshold, and the best pair a detector's scores allow.

Convention (the detector's): a part is flagged when ``score > threshold``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import numpy as np
from scipy import stats

from redi.core.errors import ConfigError, MetricsError

EULER_GAMMA = 0.5772156649015329
MAD_TO_SIGMA = 1.4826  # MAD x this = the standard deviation of a normal distribution

ThresholdPolicy = Callable[[np.ndarray, float, float], float]
_POLICIES: dict[str, ThresholdPolicy] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_policy(name: str, description: str) -> Callable[[ThresholdPolicy], ThresholdPolicy]:
    """Register ``fn(scores, target, quantile) -> threshold`` under ``name`` (``eval.threshold_policy``)."""
    def wrap(fn: ThresholdPolicy) -> ThresholdPolicy:
        if name in _POLICIES:
            raise ValueError(f"threshold policy {name!r} is registered twice")
        _POLICIES[name] = fn
        _DESCRIPTIONS[name] = description
        return fn
    return wrap


def policy_names() -> tuple[str, ...]:
    """Every registered threshold policy."""
    return tuple(_POLICIES)


def describe_policy(name: str) -> str:
    """One line saying how the policy sets the threshold."""
    return _DESCRIPTIONS[name]


def _normal_scores(scores: Any) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64).ravel()
    if arr.size < 2:
        raise MetricsError(f"a threshold needs the scores of at least 2 held-out normal images, got {arr.size}; "
                           f"raise data.val_fraction or add images to train/good")
    if not np.isfinite(arr).all():
        raise MetricsError("held-out normal scores contain NaN or infinite values; the detector's output is broken")
    return arr


@register_policy("max", "eval.threshold_quantile of the held-out normal scores (default 1.0: their maximum)")
def _max_policy(scores: np.ndarray, target: float, quantile: float) -> float:
    return float(np.quantile(scores, quantile))  # linear interpolation, as torch.quantile


@register_policy("gaussian", "mean + z * standard deviation of the held-out normal scores, z for the target")
def _gaussian_policy(scores: np.ndarray, target: float, quantile: float) -> float:
    return float(scores.mean() + stats.norm.isf(target) * scores.std(ddof=1))


@register_policy("robust_gaussian", "median + z * 1.4826 * MAD of the held-out normal scores, z for the target")
def _robust_gaussian_policy(scores: np.ndarray, target: float, quantile: float) -> float:
    median = float(np.median(scores))
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(scores - median)))
    return median + float(stats.norm.isf(target)) * sigma


def gumbel_fit(scores: np.ndarray) -> tuple[float, float]:
    """(location, scale) of a Gumbel law fitted to the last axis of ``scores`` by L-moments.

    An image score is the maximum of its anomaly map, and maxima of many light-tailed values
    follow a Gumbel law. L-moments are linear in the sorted scores (no squares), so one unusual
    normal moves the fit far less than it moves the standard deviation or the maximum.
    """
    x = np.sort(np.asarray(scores, dtype=np.float64), axis=-1)
    n = x.shape[-1]
    l1 = x.mean(axis=-1)
    b1 = (x * (np.arange(n) / (n - 1))).mean(axis=-1)
    scale = np.maximum(2.0 * b1 - l1, 0.0) / math.log(2.0)
    return l1 - EULER_GAMMA * scale, scale


KEEP_SHARE = 0.8  # gumbel_trimmed fits the lowest 80 % of the scores: the top 20 % may be unusual normals


def gumbel_trimmed_fit(scores: np.ndarray, keep: float = KEEP_SHARE) -> tuple[float, float]:
    """(location, scale) of a Gumbel law fitted to the lowest ``keep`` share of the last axis of
    ``scores``: a least-squares line through their Gumbel probability plot (Gringorten positions).

    The highest scores are left out of the fit, not out of the sample: they keep their plotting
    positions, so the fit still knows how many scores lie above. One or a few unusual normals
    among the held-out images (a scratch on the fixture, a mis-sorted part) therefore cannot drag
    the threshold above the defects, as they drag the maximum and the L-moment fit.
    """
    x = np.sort(np.asarray(scores, dtype=np.float64), axis=-1)
    n = x.shape[-1]
    m = max(2, int(math.floor(keep * n)))
    reduced = -np.log(-np.log((np.arange(1, n + 1) - 0.44) / (n + 0.12)))[:m]
    kept = x[..., :m]
    centred = reduced - reduced.mean()
    scale = (kept * centred).sum(axis=-1) / (centred ** 2).sum()
    return kept.mean(axis=-1) - scale * reduced.mean(), np.maximum(scale, 0.0)


_FITS = {"lmoments": gumbel_fit, "trimmed": gumbel_trimmed_fit}


SIMULATED_SCORES = 4_000_000


@functools.lru_cache(maxsize=256)
def gumbel_predictive_factor(n: int, target: float, fit: str = "lmoments", draws: int = 20000) -> float:
    """c such that a new normal's expected false-call rate is ``target`` at ``location + c * scale``.

    The plug-in quantile of a fit to n scores is itself uncertain, and its misses dominate: with
    10 scores the plug-in 99th percentile flags about 2 % of new normals, the maximum about 9 %.
    Both fits (``fit``: ``lmoments`` or ``trimmed``) are equivariant (shift and scale the scores and
    they shift and scale alike), so c depends on n, the target and the fit only: found once by
    simulating standard Gumbel samples of size n (a fixed seed, so every process finds the same c)
    and bisecting on the mean tail probability.
    """
    rng = np.random.default_rng(12345)
    # at most SIMULATED_SCORES values at once (32 MB): a line holding out thousands of normals needs
    # fewer draws, its factor being close to the known law's
    draws = max(2000, min(draws, SIMULATED_SCORES // n))
    location, scale = _FITS[fit](rng.gumbel(size=(draws, n)))

    def mean_false_calls(c: float) -> float:
        z = location + c * scale
        return float(np.mean(-np.expm1(-np.exp(-z))))  # Gumbel survival function

    low, high = 0.0, 500.0
    for _ in range(60):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if mean_false_calls(mid) > target else (low, mid)
    return high


@register_policy("gumbel_trimmed", "a Gumbel law fitted to the lowest 80 % of the held-out normal scores (unusual "
                                   "normals at the top cannot drag it up), read where a new normal's expected "
                                   "false-call rate is the target")
def _gumbel_trimmed_policy(scores: np.ndarray, target: float, quantile: float) -> float:
    location, scale = gumbel_trimmed_fit(scores)
    return float(location + gumbel_predictive_factor(scores.size, round(target, 12), "trimmed") * scale)


@register_policy("gumbel", "a Gumbel law fitted to all held-out normal scores by L-moments, read where a new "
                           "normal's expected false-call rate is the target")
def _gumbel_policy(scores: np.ndarray, target: float, quantile: float) -> float:
    location, scale = gumbel_fit(scores)
    return float(location + gumbel_predictive_factor(scores.size, round(target, 12)) * scale)


@register_policy("gumbel_plugin", "the target quantile of a Gumbel law fitted to the held-out normal scores "
                                  "(no allowance for the fit's own uncertainty)")
def _gumbel_plugin_policy(scores: np.ndarray, target: float, quantile: float) -> float:
    location, scale = gumbel_fit(scores)
    return float(location - scale * math.log(-math.log1p(-target)))


@register_policy("gaussian_predictive", "mean + t * sd * sqrt(1 + 1/n) of the held-out normal scores: the "
                                        "normal-law prediction bound whose expected false-call rate is the target")
def _gaussian_predictive_policy(scores: np.ndarray, target: float, quantile: float) -> float:
    n = scores.size
    return float(scores.mean() + stats.t.isf(target, n - 1) * scores.std(ddof=1) * math.sqrt(1.0 + 1.0 / n))


SMALL_SAMPLE_RATIO = 1.25  # the fit's allowance for its own uncertainty beyond this: say so


def small_sample_note(n: int, policy: str, target: float) -> str | None:
    """A sentence for the line's engineer when ``n`` held-out normals are too few for ``policy`` to
    place a ``target`` threshold near the fitted law's own quantile (None when they are enough).

    With few normals the fitted Gumbel policies add a wide allowance for the fit's uncertainty
    (at 1 %: 13.6 scale units above the location from 4 normals, 6.8 from 8, 5.2 from 20, against
    4.6 for a known law), so the threshold sits high and defects pass. The cure is more held-out
    normals, not another policy.
    """
    fit = {"gumbel_trimmed": "trimmed", "gumbel": "lmoments"}.get(policy)
    if fit is None or n < 2:
        return None
    factor = gumbel_predictive_factor(n, round(target, 12), fit)
    known = -math.log(-math.log1p(-target))
    if factor / known <= SMALL_SAMPLE_RATIO:
        return None
    return (f"only {n} held-out normal images: to hold a {target:.1%} false-call target the threshold sits "
            f"{factor / known:.1f}x as far above the fitted location as the law's own quantile would, so some "
            f"defects will pass; hold out more normals (data.val_fraction, data.min_val_images) or add images "
            f"to train/good")


def set_threshold(scores: Any, policy: str, target: float, quantile: float = 1.0, margin: float = 1.0) -> float:
    """The decision threshold from held-out normal scores: ``policy``'s estimate times ``margin``.

    Args:
        scores: image scores of held-out normal images (never of labelled defects).
        policy: a registered policy name (:func:`policy_names`).
        target: the false-call rate the line accepts, in (0, 0.5).
        quantile: the ``max`` policy's quantile (``eval.threshold_quantile``).
        margin: multiplies the estimate (``eval.threshold_margin``; 1 = none).

    Raises:
        ConfigError: an unknown policy or a target outside (0, 0.5).
        MetricsError: fewer than 2 scores, or NaN / infinite ones.
    """
    if policy not in _POLICIES:
        raise ConfigError(f"eval.threshold_policy={policy!r} is not one of {policy_names()}")
    if not 0.0 < target < 0.5:
        raise ConfigError(f"eval.false_call_target={target} must lie in (0, 0.5): it is the share of good parts "
                          f"the line accepts to re-inspect, e.g. 0.01")
    return float(_POLICIES[policy](_normal_scores(scores), float(target), float(quantile))) * float(margin)


# ----------------------------------------------------------------------------- decisions at a threshold
def _labelled(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise MetricsError(f"{s.size} scores for {y.size} labels: give one score per labelled image")
    return y, s


def _rate(count: int, total: int) -> float | None:
    return count / total if total else None


def decision_stats(labels: Any, scores: Any, threshold: float) -> dict[str, Any]:
    """The confusion matrix and rates at ``threshold`` (flagged = ``score > threshold``).

    Returns ``threshold``, ``tp`` (defects caught), ``fn`` (escapes), ``fp`` (false calls),
    ``tn``, ``recall``, ``escape_rate``, ``false_call_rate``, ``precision`` and ``accuracy``;
    a rate is None when its denominator is empty.
    """
    y, s = _labelled(labels, scores)
    flagged = s > threshold
    tp, fn = int((flagged & y).sum()), int((~flagged & y).sum())
    fp, tn = int((flagged & ~y).sum()), int((~flagged & ~y).sum())
    return {"threshold": float(threshold), "tp": tp, "fn": fn, "fp": fp, "tn": tn,
            "recall": _rate(tp, tp + fn), "escape_rate": _rate(fn, tp + fn),
            "false_call_rate": _rate(fp, fp + tn), "precision": _rate(tp, tp + fp),
            "accuracy": _rate(tp + tn, y.size)}


def tradeoff_curve(labels: Any, scores: Any) -> dict[str, np.ndarray]:
    """False-call rate and escape rate at every threshold that changes a decision.

    Thresholds run from below the lowest score (everything flagged) to the highest score
    (nothing flagged). Needs both normal and defective images.
    """
    y, s = _labelled(labels, scores)
    if y.all() or not y.any():
        raise MetricsError("a false-call vs escape curve needs both normal and defective images")
    levels = np.unique(s)
    thresholds = np.r_[levels[0] - max(1e-6, abs(levels[0]) * 1e-6), levels]
    neg, pos = np.sort(s[~y]), np.sort(s[y])
    false_calls = 1.0 - np.searchsorted(neg, thresholds, side="right") / neg.size
    escapes = np.searchsorted(pos, thresholds, side="right") / pos.size
    return {"threshold": thresholds, "false_call_rate": false_calls, "escape_rate": escapes}


def achievable(labels: Any, scores: Any, min_recall: float = 0.95, max_false_call_rate: float = 0.02
               ) -> dict[str, Any]:
    """What a detector's scores allow, whatever threshold is served.

    Returns ``target`` (the pair asked for), ``met`` (some threshold gives recall >= min_recall
    with false calls <= max_false_call_rate), ``best_recall_within_false_calls`` (the highest
    recall at false calls <= the maximum, with its threshold) and
    ``lowest_false_calls_at_recall`` (the lowest false-call rate at recall >= the minimum).
    """
    curve = tradeoff_curve(labels, scores)
    recall = 1.0 - curve["escape_rate"]
    fcr = curve["false_call_rate"]
    within = fcr <= max_false_call_rate + 1e-12
    i = int(np.flatnonzero(within)[np.argmax(recall[within])])
    reaching = recall >= min_recall - 1e-12
    j = int(np.flatnonzero(reaching)[np.argmin(fcr[reaching])])
    return {"target": {"min_recall": min_recall, "max_false_call_rate": max_false_call_rate},
            "met": bool((within & reaching).any()),
            "best_recall_within_false_calls": {"recall": float(recall[i]), "false_call_rate": float(fcr[i]),
                                               "threshold": float(curve["threshold"][i])},
            "lowest_false_calls_at_recall": {"recall": float(recall[j]), "false_call_rate": float(fcr[j]),
                                             "threshold": float(curve["threshold"][j])}}
