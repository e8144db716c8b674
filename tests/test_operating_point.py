"""Threshold policies and the decision at a threshold (redi.core.operating_point), on synthetic scores.

Image scores are maxima of anomaly maps, so held-out normal scores are drawn from a Gumbel law;
defects from a normal law above them, as on the strip line of issue 16 (normals near 1.0, the
F1-optimal threshold near 1.4). Every rate is measured on fresh draws, never on the scores that
set the threshold.
"""

from __future__ import annotations

import numpy as np
import pytest

from redi.core.errors import ConfigError, MetricsError
from redi.core.operating_point import (achievable, decision_stats, gumbel_predictive_factor, policy_names, set_threshold,
                                  tradeoff_curve)

TARGET = 0.01
LOC, SCALE = 1.0, 0.05  # good parts
DEFECT_MEAN, DEFECT_SD = 1.42, 0.08


def _served(policy: str, n_held: int, outliers: int = 0, repeats: int = 300, seed: int = 0) -> tuple[float, float]:
    """Mean (false-call rate on fresh good parts, recall on defects) of ``policy`` over ``repeats`` lines
    that each hold out ``n_held`` normals, ``outliers`` of them unusual (8-10 scales above the rest)."""
    rng = np.random.default_rng(seed)
    false_calls, recalls = [], []
    for _ in range(repeats):
        held = rng.gumbel(LOC, SCALE, size=n_held)
        held[:outliers] = LOC + SCALE * rng.uniform(8, 10, size=outliers)
        threshold = set_threshold(held, policy, TARGET)
        false_calls.append(float((rng.gumbel(LOC, SCALE, size=2000) > threshold).mean()))
        recalls.append(float((rng.normal(DEFECT_MEAN, DEFECT_SD, size=500) > threshold).mean()))
    return float(np.mean(false_calls)), float(np.mean(recalls))


@pytest.mark.parametrize("n_held", [10, 20, 30])
def test_max_misses_the_target_and_the_fitted_tails_hold_it(n_held: int) -> None:
    # the maximum of n normals flags about 1/(n+1) of new ones: 9 % at 10, far from a 1 % target
    max_rate, _ = _served("max", n_held)
    assert max_rate > 0.03
    for policy in ("gumbel", "gumbel_trimmed"):
        rate, recall = _served(policy, n_held)
        assert abs(rate - TARGET) <= 0.005, (policy, rate)
        assert recall > 0.8, (policy, recall)


def test_unusual_normals_among_the_held_out_ones_the_strip_line() -> None:
    # 2 of 20 held-out normals are unusual: the maximum sits on them, above nearly every defect
    max_rate, max_recall = _served("max", 20, outliers=2)
    assert max_recall < 0.35
    # the L-moment fit is dragged up too; the trimmed fit leaves the top 20 % out and holds
    _, lmoment_recall = _served("gumbel", 20, outliers=2)
    rate, recall = _served("gumbel_trimmed", 20, outliers=2)
    assert lmoment_recall < 0.3
    assert recall > 0.8 and rate <= TARGET + 0.01
    # without outliers it costs next to nothing against the L-moment fit
    assert _served("gumbel_trimmed", 20)[1] > _served("gumbel", 20)[1] - 0.02


@pytest.mark.parametrize("policy", [p for p in policy_names()])
def test_policies_follow_the_scores_shift_and_scale(policy: str) -> None:
    scores = np.random.default_rng(3).gumbel(0.4, 0.02, size=12)
    threshold = set_threshold(scores, policy, TARGET)
    assert set_threshold(3.0 * scores + 2.0, policy, TARGET) == pytest.approx(3.0 * threshold + 2.0, rel=1e-9)
    # a stricter target never lowers the threshold; the margin multiplies it
    assert set_threshold(scores, policy, 0.001) >= threshold - 1e-12
    assert set_threshold(scores, policy, TARGET, margin=1.1) == pytest.approx(1.1 * threshold)


def test_predictive_factor_is_fixed_per_size_and_shrinks_with_more_normals() -> None:
    assert gumbel_predictive_factor(20, TARGET, "trimmed") == gumbel_predictive_factor(20, TARGET, "trimmed")
    factors = [gumbel_predictive_factor(n, TARGET, "trimmed") for n in (4, 8, 20, 40)]
    assert factors == sorted(factors, reverse=True)
    # the plug-in 99th percentile of a standard Gumbel is 4.6: the prediction bound lies above it
    assert factors[-1] > 4.6


def test_bad_policy_inputs_say_what_to_change() -> None:
    scores = np.linspace(1.0, 1.2, 10)
    with pytest.raises(ConfigError, match="eval.threshold_policy='nope' is not one of"):
        set_threshold(scores, "nope", TARGET)
    with pytest.raises(ConfigError, match="eval.false_call_target=0.7"):
        set_threshold(scores, "gumbel_trimmed", 0.7)
    with pytest.raises(MetricsError, match="at least 2 held-out normal images"):
        set_threshold(scores[:1], "gumbel_trimmed", TARGET)
    with pytest.raises(MetricsError, match="NaN"):
        set_threshold(np.r_[scores, np.nan], "gumbel_trimmed", TARGET)


def test_decision_stats_curve_and_what_is_achievable() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.5, 0.8, 1.0])
    point = decision_stats(labels, scores, 0.4)  # flagged: 0.9 (good) and every defect
    assert (point["tp"], point["fn"], point["fp"], point["tn"]) == (3, 0, 1, 3)
    assert point["recall"] == 1.0 and point["false_call_rate"] == 0.25 and point["escape_rate"] == 0.0
    at_score = decision_stats(labels, scores, 0.5)  # a score equal to the threshold passes
    assert at_score["fn"] == 1
    assert decision_stats(np.zeros(3), np.ones(3), 0.5)["recall"] is None
    curve = tradeoff_curve(labels, scores)
    assert (curve["false_call_rate"][0], curve["escape_rate"][0]) == (1.0, 0.0)  # all flagged
    assert (curve["false_call_rate"][-1], curve["escape_rate"][-1]) == (0.0, 1.0)  # none flagged
    reach = achievable(labels, scores, min_recall=1.0, max_false_call_rate=0.0)
    assert not reach["met"]  # the good part at 0.9 outscores the defect at 0.5
    # no false call means a threshold at 0.9 or above: only the defect at 1.0 is caught
    assert reach["best_recall_within_false_calls"]["recall"] == pytest.approx(1 / 3)
    assert reach["lowest_false_calls_at_recall"]["false_call_rate"] == 0.25
    assert achievable(labels, scores, min_recall=0.3, max_false_call_rate=0.0)["met"]
    with pytest.raises(MetricsError, match="both normal and defective"):
        tradeoff_curve(np.ones(3), scores[:3])


def test_small_sample_note_says_when_few_normals_push_the_threshold_up() -> None:
    from redi.core.operating_point import small_sample_note

    note = small_sample_note(4, "gumbel_trimmed", 0.01)
    assert note is not None and "only 4 held-out normal images" in note and "data.min_val_images" in note
    assert small_sample_note(8, "gumbel", 0.01) is not None
    assert small_sample_note(40, "gumbel_trimmed", 0.01) is None  # the allowance is small by then
    assert small_sample_note(4, "max", 0.01) is None  # the max policy makes no allowance to speak of


def test_predictive_factor_for_a_large_line_nears_the_known_law() -> None:
    import math

    from redi.core.operating_point import gumbel_predictive_factor

    known = -math.log(-math.log1p(-0.01))
    large = gumbel_predictive_factor(3000, 0.01, "trimmed")  # simulated with fewer draws (memory bound)
    assert known < large < known + 0.1
    assert gumbel_predictive_factor(4, 0.01, "trimmed") > 2.5 * known  # few normals: a wide allowance
