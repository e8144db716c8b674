"""Evaluation metrics for anomaly detection: numpy arrays in, Python floats out.

Image level: AUROC and the F1-optimal decision threshold. Pixel level: AUROC, average precision
(AP) and AUPRO (area under the per-region-overlap curve, Bergmann et al.), all computed exactly.

Why not scikit-learn for the pixel metrics: a test split of a few hundred 256x256 maps holds tens
of millions of pixels, and sklearn turns them into several float64/int64 arrays of the full size.
Here the normal pixels' scores are copied once and sorted once (in the maps' own float dtype, so
float32 maps cost 4 bytes a pixel), and every curve point is found by binary search
(``np.searchsorted``). Ties are handled as sklearn does (a tie between a defect and a normal pixel
counts one half in AUROC; tied scores form one threshold), so the results equal
``roc_auc_score`` / ``average_precision_score`` to floating-point rounding.

Conventions:
- A score is "anomalous at threshold t" when ``score >= t``.
- Masks: ``True`` (or non-zero) marks a defect pixel; everything else is a normal pixel.
- AUPRO regions are connected components of each image's mask with 8-connectivity (a 3x3
  structuring element, as the MVTec AD evaluation code does); regions never span two images.
- Scores must be finite: NaN or infinite scores raise ``MetricsError``. Float scores are compared
  in their own precision (never down-cast, which would create ties); other dtypes become float64.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from redi.core.errors import MetricsError

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# ----------------------------------------------------------------------------- validation
def _as_scores(scores: np.ndarray, name: str) -> np.ndarray:
    """Return ``scores`` as a float array (no copy when already float32/float64), finite."""
    arr = np.asarray(scores)
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    n_nan = int(np.count_nonzero(np.isnan(arr)))
    if n_nan:
        raise MetricsError(
            f"{name} contains {n_nan} NaN value(s) out of {arr.size}: the model produced "
            "undefined scores; check the detector's output (e.g. a division by zero or a "
            "diverged training run) before evaluating."
        )
    if not np.isfinite(arr).all():
        raise MetricsError(
            f"{name} contains infinite values: scores must be finite; clip or fix the scores "
            "before evaluating."
        )
    return arr


def _as_labels(labels: np.ndarray) -> np.ndarray:
    """Return image labels as a 1-D bool array (``True`` = anomalous); values must be 0/1."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise MetricsError(f"labels must be 1-D (one per image), got shape {arr.shape}.")
    if arr.dtype != bool:
        values = np.unique(arr)
        if not np.isin(values, (0, 1)).all():
            raise MetricsError(
                f"labels must be 0 (normal) or 1 (anomalous), got values {values[:10].tolist()}; "
                "map your labels to 0/1 first."
            )
        arr = arr == 1
    return arr


def _image_inputs(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate image-level labels and scores (same length, 1-D)."""
    y = _as_labels(labels)
    s = _as_scores(scores, "image scores")
    if s.ndim != 1 or s.shape[0] != y.shape[0]:
        raise MetricsError(
            f"image scores have shape {s.shape} but labels have shape {y.shape}: give one score "
            "per image, in the same order as the labels."
        )
    return y, s


def _require_both_classes(n_pos: int, n_neg: int, what: str) -> None:
    """Raise ``MetricsError`` when a ranking metric lacks positives or negatives."""
    if n_pos == 0:
        raise MetricsError(
            f"the test set has no anomalous {what}: {_METRIC_NAME[what]} needs both anomalous "
            f"and normal {what}. Add defective samples (with their masks) to the test split, "
            "or evaluate on another category."
        )
    if n_neg == 0:
        raise MetricsError(
            f"the test set has no normal {what}: {_METRIC_NAME[what]} needs both anomalous and "
            f"normal {what}. Add good samples to the test split."
        )


_METRIC_NAME = {"images": "image AUROC", "pixels": "a pixel metric (AUROC, AP, AUPRO)"}


def _pixel_inputs(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate masks/maps: same shape, (N, H, W) or (H, W); masks become bool."""
    m = np.asarray(masks)
    a = _as_scores(maps, "anomaly maps")
    if m.shape != a.shape:
        raise MetricsError(
            f"masks have shape {m.shape} but anomaly maps have shape {a.shape}: resize the maps "
            "to the mask size (or the masks to the map size) so that pixels correspond."
        )
    if m.ndim == 2:
        m, a = m[None], a[None]
    if m.ndim != 3:
        raise MetricsError(
            f"masks and maps must have shape (N, H, W), got {m.shape}; squeeze any channel axis."
        )
    if m.dtype != bool:
        if m.dtype.kind == "f" and not np.isin(np.unique(m), (0.0, 1.0)).all():
            raise MetricsError(
                "float masks must hold only 0 and 1; binarise interpolated masks "
                "(e.g. mask > 0.5) before evaluating."
            )
        m = m != 0
    return m, a


# ----------------------------------------------------------------------------- exact kernels
def _auroc_sorted(pos: np.ndarray, neg_sorted: np.ndarray) -> float:
    """AUROC = P(pos > neg) + 0.5 P(pos == neg), by binary search in the sorted negatives."""
    below = np.searchsorted(neg_sorted, pos, side="left")  # negatives strictly below each pos
    upto = np.searchsorted(neg_sorted, pos, side="right")  # ... below or tied
    # Integer sums are exact; 2*wins + ties avoids the half-count until the one division.
    twice = 2 * int(below.sum(dtype=np.int64)) + int((upto - below).sum(dtype=np.int64))
    return twice / (2.0 * pos.size * neg_sorted.size)


def _ap_sorted(pos_sorted: np.ndarray, neg_sorted: np.ndarray) -> float:
    """Step-wise average precision (sklearn's definition) from sorted positives and negatives.

    Recall only grows at thresholds equal to a positive score, so AP is the sum over the
    distinct positive scores v of (number of positives == v) / P * precision(score >= v).
    """
    n_pos = pos_sorted.size
    first = np.flatnonzero(np.r_[True, pos_sorted[1:] != pos_sorted[:-1]])
    counts = np.diff(np.r_[first, n_pos])
    tp = n_pos - first  # positives >= each distinct value
    fp = neg_sorted.size - np.searchsorted(neg_sorted, pos_sorted[first], side="left")
    return float(np.sum(counts * (tp / (tp + fp))) / n_pos)


def _split_pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (sorted defect-pixel scores, sorted normal-pixel scores) after checking both exist."""
    pos = maps[masks]
    neg = maps[~masks]
    _require_both_classes(pos.size, neg.size, "pixels")
    pos.sort()
    neg.sort()  # in place: the boolean-index copy is the only full-size array we allocate
    return pos, neg


# ----------------------------------------------------------------------------- image level
def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of image scores; ``labels`` are 0/1 (1 = anomalous).

    Equals ``sklearn.metrics.roc_auc_score(labels, scores)``. Raises ``MetricsError`` when the
    labels lack anomalous or normal images, on shape mismatch, or on NaN/infinite scores.
    """
    y, s = _image_inputs(labels, scores)
    pos, neg = s[y], np.sort(s[~y])
    _require_both_classes(pos.size, neg.size, "images")
    return _auroc_sorted(pos, neg)


def _clf_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds descending, true positives, false positives) at every distinct score."""
    order = np.argsort(s, kind="stable")[::-1]
    s_desc = s[order]
    last = np.r_[np.flatnonzero(s_desc[1:] != s_desc[:-1]), s_desc.size - 1]
    tps = np.cumsum(y[order], dtype=np.int64)[last]
    fps = (last + 1) - tps
    return s_desc[last], tps, fps


def roc_curve_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve for plotting: ``(fpr, tpr)``, starting at (0, 0) and ending at (1, 1).

    One point per distinct score (no points dropped), i.e. sklearn's
    ``roc_curve(..., drop_intermediate=False)``.
    """
    y, s = _image_inputs(labels, scores)
    _require_both_classes(int(y.sum()), int((~y).sum()), "images")
    _, tps, fps = _clf_curve(y, s)
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def pr_curve_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision-recall curve for plotting: ``(recall, precision)`` with recall ascending.

    Starts at (recall 0, precision 1) like sklearn's ``precision_recall_curve`` (whose arrays
    are these, reversed).
    """
    y, s = _image_inputs(labels, scores)
    _require_both_classes(int(y.sum()), int((~y).sum()), "images")
    _, tps, fps = _clf_curve(y, s)
    return np.r_[0.0, tps / tps[-1]], np.r_[1.0, tps / (tps + fps)]


def f1_optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The threshold that maximises image-level F1 (``score >= threshold`` is anomalous).

    Candidate thresholds are the distinct scores. When several give the same best F1, the
    highest is returned (fewest alarms). Returns ``(threshold, f1)``. Needs at least one
    anomalous image.
    """
    y, s = _image_inputs(labels, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        _require_both_classes(0, y.size, "images")
    thresholds, tps, fps = _clf_curve(y, s)
    f1 = 2.0 * tps / (tps + fps + n_pos)  # 2TP / (2TP + FP + FN), with FN = P - TP
    best = int(np.argmax(f1))  # first maximum = highest threshold, thresholds are descending
    return float(thresholds[best]), float(f1[best])


# ----------------------------------------------------------------------------- pixel level
def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """AUROC over all pixels of all images (equals sklearn's ``roc_auc_score`` on the flat arrays).

    ``masks`` bool (N, H, W), ``maps`` float (N, H, W). Raises ``MetricsError`` when no pixel
    (or every pixel) is a defect, on shape mismatch, or on NaN/infinite scores.
    """
    m, a = _pixel_inputs(masks, maps)
    pos, neg = _split_pixels(m, a)
    return _auroc_sorted(pos, neg)


def pixel_ap(masks: np.ndarray, maps: np.ndarray) -> float:
    """Average precision over all pixels: step-wise, no interpolation, as sklearn's
    ``average_precision_score`` on the flat arrays."""
    m, a = _pixel_inputs(masks, maps)
    pos, neg = _split_pixels(m, a)
    return _ap_sorted(pos, neg)


def _region_weights(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores of defect pixels and their PRO weights ``1 / (n_regions * region_size)``.

    Regions are 8-connected components of each image's mask. Summing the weights of the defect
    pixels at or above a threshold gives the mean per-region overlap at that threshold.
    """
    scores, sizes = [], []
    n_regions = 0
    for mask, amap in zip(masks, maps):
        if not mask.any():
            continue
        regions, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        area = np.bincount(regions.ravel(), minlength=n + 1)
        scores.append(amap[mask])
        sizes.append(area[regions[mask]])
        n_regions += n
    if not scores:
        _require_both_classes(0, masks.size, "pixels")
    size = np.concatenate(sizes).astype(np.float64)
    return np.concatenate(scores), 1.0 / (size * n_regions)


def _pro_points(pos: np.ndarray, weights: np.ndarray, neg_sorted: np.ndarray,
                max_fpr: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Exact (fpr, pro) at every distinct score, descending thresholds, with (0, 0) prepended.

    With ``max_fpr`` only thresholds up to the first one whose FPR exceeds it are kept: enough
    to integrate to ``max_fpr`` without materialising the whole curve.
    """
    order = np.argsort(pos, kind="stable")
    pos_asc = pos[order]
    # suffix[i] = sum of weights of positives at sorted index >= i (PRO at threshold pos_asc[i])
    suffix = np.r_[np.cumsum(weights[order][::-1])[::-1], 0.0]
    n_neg = neg_sorted.size
    neg_part = neg_sorted
    if max_fpr is not None:
        # At the m-th largest normal score FPR >= m / n_neg > max_fpr, so the thresholds at or
        # above it include the first point beyond max_fpr (needed to interpolate there); lower
        # thresholds only add later points. The "+ 2" (not + 1) absorbs rounding of the product.
        m = min(n_neg, int(np.floor(max_fpr * n_neg)) + 2)
        cut = neg_sorted[n_neg - m]
        neg_part = neg_sorted[n_neg - m:]
        pos_asc_part = pos_asc[pos_asc >= cut]
    else:
        pos_asc_part = pos_asc
    thresholds = np.unique(np.concatenate((neg_part, pos_asc_part)))[::-1]
    fp = n_neg - np.searchsorted(neg_sorted, thresholds, side="left")
    pro = suffix[np.searchsorted(pos_asc, thresholds, side="left")]
    fpr = np.r_[0.0, fp / n_neg]
    pro = np.r_[0.0, np.minimum(pro, 1.0)]  # summed weights can exceed 1 by rounding
    return fpr, pro


def pro_curve(masks: np.ndarray, maps: np.ndarray,
              max_fpr: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve ``(fpr, pro)``: one point per distinct score.

    Starts at (0, 0); thresholds descend so FPR is non-decreasing, and the full curve ends at
    FPR 1. With ``max_fpr`` the curve stops just past ``max_fpr`` (within two normal-pixel steps),
    a prefix of the full curve that is much smaller to hold or plot.
    """
    if max_fpr is not None:
        _check_max_fpr(max_fpr)
    m, a = _pixel_inputs(masks, maps)
    pos, weights = _region_weights(m, a)
    neg = a[~m]
    _require_both_classes(pos.size, neg.size, "pixels")
    neg.sort()
    return _pro_points(pos, weights, neg, max_fpr)


def _area_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) on [0, x_max], interpolating y linearly at ``x_max``.

    ``x`` must be non-decreasing and reach past (or to) ``x_max``.
    """
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))
    if xs[-1] < x_max:  # add the piece from the last point inside up to x_max
        j = xs.size  # first point beyond x_max
        y_at = ys[-1] + (y[j] - ys[-1]) * (x_max - xs[-1]) / (x[j] - xs[-1])
        area += (x_max - xs[-1]) * (ys[-1] + y_at) / 2.0
    return area


def _check_max_fpr(max_fpr: float) -> None:
    """``max_fpr`` must lie in (0, 1]."""
    if not 0.0 < max_fpr <= 1.0:
        raise MetricsError(f"max_fpr must be in (0, 1], got {max_fpr}; the usual value is 0.3.")


def _quantise(maps: np.ndarray, num_thresholds: int) -> np.ndarray:
    """Snap each score down to a grid of ``num_thresholds`` equally spaced thresholds."""
    if num_thresholds < 2:
        raise MetricsError(f"num_thresholds must be at least 2, got {num_thresholds}.")
    grid = np.linspace(maps.min(), maps.max(), num_thresholds).astype(maps.dtype)
    # score >= grid[k] exactly when its snapped value >= grid[k], so the exact curve of the
    # snapped scores is the curve evaluated at the grid thresholds.
    return grid[np.searchsorted(grid, maps, side="right") - 1]


def _aupro_from(pos: np.ndarray, weights: np.ndarray, neg_sorted: np.ndarray,
                max_fpr: float) -> float:
    """Normalised area under the PRO curve up to ``max_fpr``."""
    fpr, pro = _pro_points(pos, weights, neg_sorted, max_fpr)
    return float(_area_to(fpr, pro, max_fpr) / max_fpr)


def aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3,
          num_thresholds: int | None = None) -> float:
    """Area under the PRO curve for FPR in [0, max_fpr], divided by max_fpr (Bergmann et al.).

    PRO(t) is the mean over all connected defect regions (8-connectivity, per image) of the
    fraction of the region's pixels with score >= t; FPR(t) is the fraction of all normal pixels
    (mask == 0, across all images) with score >= t. The curve is integrated with trapezoids,
    interpolating the point at exactly ``max_fpr``.

    ``num_thresholds=None`` (default) uses every distinct score as a threshold (exact);
    an integer uses that many equally spaced thresholds between the lowest and highest score
    (a coarser, approximate curve; rarely needed, since the exact curve costs one sort).
    """
    _check_max_fpr(max_fpr)
    m, a = _pixel_inputs(masks, maps)
    if num_thresholds is not None:
        a = _quantise(a, num_thresholds)
    pos, weights = _region_weights(m, a)
    neg = a[~m]
    _require_both_classes(pos.size, neg.size, "pixels")
    neg.sort()
    return _aupro_from(pos, weights, neg, max_fpr)


# ----------------------------------------------------------------------------- all at once
def compute_all(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray | None = None,
                maps: np.ndarray | None = None, max_fpr: float = 0.3) -> dict:
    """Every metric of one evaluation, sorting the normal pixels only once.

    Returns a dict with ``image_auroc``, ``pixel_auroc``, ``pixel_ap``, ``aupro``,
    ``f1_threshold``, ``f1``, ``n_images``, ``n_anomalous``, ``n_normal``. The pixel metrics are
    ``None`` when ``masks`` is None. ``masks``/``maps`` must hold one (H, W) map per image.
    """
    y, s = _image_inputs(labels, scores)
    threshold, f1 = f1_optimal_threshold(y, s)
    result = {
        "image_auroc": image_auroc(y, s),
        "pixel_auroc": None,
        "pixel_ap": None,
        "aupro": None,
        "f1_threshold": threshold,
        "f1": f1,
        "n_images": int(y.size),
        "n_anomalous": int(y.sum()),
        "n_normal": int((~y).sum()),
    }
    if masks is None and maps is None:
        return result
    if masks is None or maps is None:
        raise MetricsError("give both masks and anomaly maps for the pixel metrics, or neither.")
    _check_max_fpr(max_fpr)
    m, a = _pixel_inputs(masks, maps)
    if m.shape[0] != y.size:
        raise MetricsError(
            f"{m.shape[0]} masks/maps for {y.size} image labels: give one mask and one map "
            "per test image, in the same order."
        )
    pos, neg = _split_pixels(m, a)  # neg is sorted and shared by all three pixel metrics
    result["pixel_auroc"] = _auroc_sorted(pos, neg)
    result["pixel_ap"] = _ap_sorted(pos, neg)
    del pos
    region_scores, weights = _region_weights(m, a)
    result["aupro"] = _aupro_from(region_scores, weights, neg, max_fpr)
    return result
