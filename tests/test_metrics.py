"""Tests of redi.core.metrics against sklearn and against brute-force reference computations."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
from sklearn.metrics import (average_precision_score, precision_recall_curve, roc_auc_score,
                             roc_curve)

from redi.core import metrics
from redi.core.errors import MetricsError, RediError


# ----------------------------------------------------------------------------- fixtures
def _blob_masks(rng: np.random.Generator, n: int, size: int, n_blobs: int) -> np.ndarray:
    """Bool masks with a few random rectangles in about half of the images."""
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(0, n, 2):
        for _ in range(n_blobs):
            h, w = rng.integers(1, max(2, size // 4), size=2)
            y, x = rng.integers(0, size - h), rng.integers(0, size - w)
            masks[i, y:y + h, x:x + w] = True
    return masks


def _noisy_maps(rng: np.random.Generator, masks: np.ndarray, decimals: int | None,
                dtype=np.float64) -> np.ndarray:
    """Scores = noise + a bump on defects; rounding creates many ties (also across classes)."""
    maps = rng.random(masks.shape) + 0.6 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)
    return maps.astype(dtype)


# ----------------------------------------------------------------------------- sklearn equality
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [None, 1])
def test_image_auroc_equals_sklearn(seed: int, decimals: int | None) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.3
    scores = rng.random(300) + 0.5 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    expected = roc_auc_score(labels, scores)
    assert metrics.image_auroc(labels, scores) == pytest.approx(expected, abs=1e-6)
    # int labels and float32 scores give the same answer
    assert metrics.image_auroc(labels.astype(int), scores.astype(np.float32)) == pytest.approx(
        roc_auc_score(labels, scores.astype(np.float32)), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("decimals", [None, 2, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_auroc_and_ap_equal_sklearn(seed: int, decimals: int | None, dtype) -> None:
    rng = np.random.default_rng(seed)
    masks = _blob_masks(rng, 6, 24, 2)
    maps = _noisy_maps(rng, masks, decimals, dtype)
    y, s = masks.ravel(), maps.ravel()
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert metrics.pixel_ap(masks, maps) == pytest.approx(
        average_precision_score(y, s), abs=1e-6)


def test_pixel_ap_heavy_ties_equals_sklearn() -> None:
    """Only three distinct scores: every threshold mixes defect and normal pixels."""
    rng = np.random.default_rng(5)
    masks = rng.random((3, 10, 10)) < 0.2
    maps = rng.integers(0, 3, size=masks.shape).astype(np.float32)
    y, s = masks.ravel(), maps.ravel()
    assert metrics.pixel_ap(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-6)
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-6)


def test_curve_points_equal_sklearn() -> None:
    rng = np.random.default_rng(3)
    labels = rng.random(80) < 0.4
    scores = np.round(rng.random(80) + 0.3 * labels, 1)
    fpr, tpr = metrics.roc_curve_points(labels, scores)
    ref_fpr, ref_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    recall, precision = metrics.pr_curve_points(labels, scores)
    ref_p, ref_r, _ = precision_recall_curve(labels, scores)
    np.testing.assert_allclose(recall, ref_r[::-1], atol=1e-12)
    np.testing.assert_allclose(precision, ref_p[::-1], atol=1e-12)


# ----------------------------------------------------------------------------- F1 threshold
def test_f1_optimal_threshold_is_brute_force_maximum() -> None:
    rng = np.random.default_rng(4)
    labels = rng.random(60) < 0.5
    scores = np.round(rng.random(60) + 0.4 * labels, 2)
    threshold, f1 = metrics.f1_optimal_threshold(labels, scores)
    best = max(_f1(labels, scores >= t) for t in np.unique(scores))
    assert f1 == pytest.approx(best, abs=1e-12)
    assert f1 == pytest.approx(_f1(labels, scores >= threshold), abs=1e-12)
    assert threshold in scores


def test_f1_optimal_threshold_separable() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert metrics.f1_optimal_threshold(labels, scores) == (0.8, 1.0)


def _f1(labels: np.ndarray, predicted: np.ndarray) -> float:
    tp = np.sum(labels & predicted)
    fp = np.sum(~labels & predicted)
    fn = np.sum(labels & ~predicted)
    return 2 * tp / (2 * tp + fp + fn)


# ----------------------------------------------------------------------------- AUPRO reference
def _regions_bruteforce(mask: np.ndarray, eight: bool) -> list[list[tuple[int, int]]]:
    """Connected components by explicit flood fill (no scipy), 8- or 4-connectivity."""
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if eight:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    seen = np.zeros_like(mask)
    regions = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, region = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for dy, dx in steps:
                ny, nx = y + dy, x + dx
                inside = 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]
                if inside and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        regions.append(region)
    return regions


def _aupro_bruteforce(masks: np.ndarray, maps: np.ndarray, max_fpr: float,
                      eight: bool = True) -> float:
    """Loop over every distinct score; PRO and FPR computed directly; trapezoid to max_fpr."""
    regions = [(i, r) for i in range(len(masks)) for r in _regions_bruteforce(masks[i], eight)]
    normal = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(float(np.mean(normal >= t)))
        overlaps = [np.mean([maps[i, y, x] >= t for y, x in r]) for i, r in regions]
        pros.append(float(np.mean(overlaps)))
    area, k = 0.0, 1
    while k < len(fprs) and fprs[k] <= max_fpr:
        area += (fprs[k] - fprs[k - 1]) * (pros[k] + pros[k - 1]) / 2
        k += 1
    if fprs[k - 1] < max_fpr:  # interpolate the point at exactly max_fpr
        slope = (pros[k] - pros[k - 1]) / (fprs[k] - fprs[k - 1])
        y_at = pros[k - 1] + slope * (max_fpr - fprs[k - 1])
        area += (max_fpr - fprs[k - 1]) * (pros[k - 1] + y_at) / 2
    return area / max_fpr


def _aupro_fixture(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """4 images of 16x16: 2-3 regions (one pair touching only at a corner), tied scores."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 16, 16), dtype=bool)
    masks[0, 2:6, 2:6] = True
    masks[0, 6:9, 6:10] = True  # touches the first square at one corner: one 8-region
    masks[1, 10:14, 1:4] = True
    masks[2, 0:2, 12:16] = True
    masks[2, 8, 8] = True  # a one-pixel region
    # image 3 is entirely normal
    maps = rng.random(masks.shape) + rng.uniform(0.2, 0.7) * masks
    maps[1] += 0.3 * masks[1] * rng.random((16, 16))  # regions differ in how well they are found
    return masks, np.round(maps, 2)  # rounding creates ties within and across classes


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
def test_aupro_equals_bruteforce(seed: int, max_fpr: float) -> None:
    masks, maps = _aupro_fixture(seed)
    expected = _aupro_bruteforce(masks, maps, max_fpr)
    assert metrics.aupro(masks, maps, max_fpr=max_fpr) == pytest.approx(expected, abs=1e-3)
    assert metrics.aupro(masks, maps.astype(np.float32), max_fpr=max_fpr) == pytest.approx(
        expected, abs=1e-3)


def test_aupro_uses_eight_connectivity() -> None:
    masks, maps = _aupro_fixture(0)
    eight = _aupro_bruteforce(masks, maps, 0.3, eight=True)
    four = _aupro_bruteforce(masks, maps, 0.3, eight=False)
    assert abs(eight - four) > 1e-3  # the fixture distinguishes the two
    assert metrics.aupro(masks, maps) == pytest.approx(eight, abs=1e-9)


def test_aupro_hand_computed() -> None:
    # normal scores 0.9, 0.1, 0.2 ; the one defect pixel 0.5. Curve: (0,0) (1/3,0) (1/3,1)
    # (2/3,1) (1,1): area to 0.5 is 1 * (0.5 - 1/3) = 1/6, normalised by 0.5 -> 1/3.
    masks = np.array([[[True, False, False, False]]])
    maps = np.array([[[0.5, 0.9, 0.1, 0.2]]])
    assert metrics.aupro(masks, maps, max_fpr=0.5) == pytest.approx(1 / 3, abs=1e-12)
    fpr, pro = metrics.pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(pro, [0, 0, 1, 1, 1])


def test_pro_curve_truncated_is_prefix_of_full_curve() -> None:
    masks, maps = _aupro_fixture(1)
    fpr, pro = metrics.pro_curve(masks, maps)
    cut_fpr, cut_pro = metrics.pro_curve(masks, maps, max_fpr=0.2)
    assert fpr[-1] == 1.0 and pro[-1] == pytest.approx(1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)
    assert len(cut_fpr) < len(fpr) and cut_fpr[-1] > 0.2
    assert np.sum(cut_fpr > 0.2) <= 2  # stops just past max_fpr
    np.testing.assert_array_equal(cut_fpr, fpr[:len(cut_fpr)])
    np.testing.assert_array_equal(cut_pro, pro[:len(cut_pro)])


def test_aupro_num_thresholds_approximates_exact() -> None:
    rng = np.random.default_rng(7)
    masks = _blob_masks(rng, 6, 32, 2)
    maps = rng.random(masks.shape) + 0.5 * masks
    exact = metrics.aupro(masks, maps)
    coarse = metrics.aupro(masks, maps, num_thresholds=2000)
    assert coarse == pytest.approx(exact, abs=0.01)
    assert coarse != exact  # really a different (binned) computation
    with pytest.raises(MetricsError, match="num_thresholds"):
        metrics.aupro(masks, maps, num_thresholds=1)


# ----------------------------------------------------------------------------- extremes
def test_perfect_and_inverted_predictors() -> None:
    rng = np.random.default_rng(8)
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.where(labels == 1, 0.9, 0.1) + 0.01 * rng.random(6)
    assert metrics.image_auroc(labels, scores) == 1.0
    assert metrics.image_auroc(labels, -scores) == 0.0
    masks = _blob_masks(rng, 4, 16, 2)
    perfect = masks + 0.1 * rng.random(masks.shape)
    assert metrics.pixel_auroc(masks, perfect) == 1.0
    assert metrics.pixel_ap(masks, perfect) == pytest.approx(1.0)
    assert metrics.aupro(masks, perfect) == pytest.approx(1.0)
    assert metrics.pixel_auroc(masks, -perfect) == 0.0
    assert metrics.pixel_ap(masks, -perfect) < 0.5
    assert metrics.aupro(masks, -perfect) == 0.0
    # a constant map cannot rank anything: AUROC one half
    assert metrics.pixel_auroc(masks, np.zeros(masks.shape)) == 0.5


# ----------------------------------------------------------------------------- compute_all
def test_compute_all_matches_the_single_metrics() -> None:
    rng = np.random.default_rng(9)
    masks = _blob_masks(rng, 8, 20, 2)
    maps = _noisy_maps(rng, masks, 2, np.float32)
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = maps.max(axis=(1, 2))
    result = metrics.compute_all(labels, scores, masks, maps, max_fpr=0.3)
    threshold, f1 = metrics.f1_optimal_threshold(labels, scores)
    assert result == {
        "image_auroc": metrics.image_auroc(labels, scores),
        "pixel_auroc": metrics.pixel_auroc(masks, maps),
        "pixel_ap": metrics.pixel_ap(masks, maps),
        "aupro": metrics.aupro(masks, maps, max_fpr=0.3),
        "f1_threshold": threshold,
        "f1": f1,
        "n_images": 8,
        "n_anomalous": 4,
        "n_normal": 4,
    }
    assert all(isinstance(result[k], float) for k in ("image_auroc", "pixel_auroc", "aupro"))


def test_compute_all_without_masks() -> None:
    result = metrics.compute_all([0, 1, 0, 1], [0.1, 0.7, 0.4, 0.3])
    assert result["pixel_auroc"] is None and result["pixel_ap"] is None
    assert result["aupro"] is None
    assert result["image_auroc"] == 0.75
    assert (result["n_images"], result["n_anomalous"], result["n_normal"]) == (4, 2, 2)


# ----------------------------------------------------------------------------- errors
def test_no_anomalous_images_is_a_clear_error() -> None:
    with pytest.raises(MetricsError, match="no anomalous images: image AUROC needs both"):
        metrics.image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(MetricsError, match="no anomalous images"):
        metrics.f1_optimal_threshold([0, 0], [0.1, 0.2])
    with pytest.raises(MetricsError, match="no normal images"):
        metrics.image_auroc([1, 1], [0.1, 0.2])
    with pytest.raises(MetricsError, match="no normal images"):
        metrics.compute_all([1, 1], [0.1, 0.2])


def test_pixel_errors() -> None:
    masks = np.zeros((2, 4, 4), dtype=bool)
    maps = np.random.default_rng(0).random((2, 4, 4))
    for fn in (metrics.pixel_auroc, metrics.pixel_ap, metrics.aupro, metrics.pro_curve):
        with pytest.raises(MetricsError, match="no anomalous pixels"):
            fn(masks, maps)
        with pytest.raises(MetricsError, match="no normal pixels"):
            fn(~masks, maps)
        with pytest.raises(MetricsError, match=r"masks have shape \(2, 4, 4\).*\(2, 4, 5\)"):
            fn(masks, np.zeros((2, 4, 5)))
    masks[0, 1, 1] = True
    bad = maps.copy()
    bad[1, 2, 2] = np.nan
    with pytest.raises(MetricsError, match="anomaly maps contains 1 NaN"):
        metrics.pixel_auroc(masks, bad)
    bad[1, 2, 2] = np.inf
    with pytest.raises(MetricsError, match="infinite"):
        metrics.aupro(masks, bad)
    with pytest.raises(MetricsError, match="max_fpr"):
        metrics.aupro(masks, maps, max_fpr=0.0)
    with pytest.raises(MetricsError, match=r"shape \(N, H, W\)"):
        metrics.pixel_auroc(masks[:, None], maps[:, None])
    with pytest.raises(MetricsError, match="binarise"):
        metrics.pixel_auroc(masks * 0.5, maps)


def test_image_input_errors() -> None:
    with pytest.raises(MetricsError, match="image scores contains 1 NaN"):
        metrics.image_auroc([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(MetricsError, match="one score per image"):
        metrics.image_auroc([0, 1, 1], [0.1, 0.3])
    with pytest.raises(MetricsError, match="0 \\(normal\\) or 1"):
        metrics.image_auroc([0, 2, 1], [0.1, 0.2, 0.3])
    masks = np.zeros((3, 4, 4), dtype=bool)
    masks[1, 0, 0] = True
    with pytest.raises(MetricsError, match="3 masks/maps for 2 image labels"):
        metrics.compute_all([0, 1], [0.1, 0.2], masks, np.zeros((3, 4, 4)))
    with pytest.raises(MetricsError, match="both masks and anomaly maps"):
        metrics.compute_all([0, 1], [0.1, 0.2], masks=masks[:2])
    assert issubclass(MetricsError, RediError)


# ----------------------------------------------------------------------------- scale
def test_scale_200_maps_of_256_memory_and_time() -> None:
    """200 float32 maps of 256x256 (13M pixels): bounded memory, a few seconds."""
    rng = np.random.default_rng(10)
    n, size = 200, 256
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(0, n, 2):  # two blobs in every other image
        masks[i, 40:90, 60:100] = True
        masks[i, 150 + i % 50:170 + i % 50, 150:200] = True
    maps = rng.random((n, size, size), dtype=np.float32)
    maps += 0.5 * masks
    labels = masks.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    input_bytes = maps.nbytes  # 52 MB

    tracemalloc.start()
    start = time.perf_counter()
    result = metrics.compute_all(labels, scores, masks, maps)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    # a float64/int64 full-size pipeline (sklearn-style) would need well over 8x the float32 input
    assert peak < 6 * input_bytes, f"peak {peak / 2**20:.0f} MiB for {input_bytes / 2**20:.0f} MiB"
    assert elapsed < 20.0
    # Defect scores ~ U(0.5, 1.5), normal ~ U(0, 1): AUROC = 1 - 0.5**3 = 0.875 and, on
    # FPR in [0, 0.3], PRO = 0.5 + FPR, so AUPRO = (0.15 + 0.045) / 0.3 = 0.65.
    assert result["pixel_auroc"] == pytest.approx(0.875, abs=0.003)
    assert result["aupro"] == pytest.approx(0.65, abs=0.003)
    assert 0.0 < result["pixel_ap"] < 1.0
