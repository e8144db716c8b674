"""Validation without test labels: held-out normal training images plus synthetic defects.

The validation set is made from a line's ``train/good`` images only (docs/validation.md):

- the **held-out normals**, the training images the detector was not fitted on (ReDi: not in its prompt bank)
  (``detector.fit_image_ids``): the images its threshold was calibrated on, never trained on;
- **synthetic defects** (:mod:`redi.data.synthetic`) drawn or pasted on copies of them, with
  exact masks; cut-and-paste patches come from the bank images (the donors).

On it, :func:`validate_detector` measures image AUROC, pixel AUROC, pixel AP and AUPRO, the
recall per defect kind at the detector's threshold, and a table of threshold margins with the
recommended one. :func:`validate` is the stage: detector file and data folder in,
``val_metrics.json`` and ``val_examples.png`` out. No test image is read anywhere here.

This module does not import :mod:`redi.workflow.stages` (it scores with the detector protocol's ``predict`` itself), so
the training stages may use it to choose epochs or options without an import cycle.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from redi.core.config import RediConfig
from redi.data.dataset import load_images
from redi.data.mvtec import MVTecCategory, Sample
from redi.data.synthetic import SYNTHETIC_KINDS, SyntheticSet, synthesize_defects
from redi.core.errors import DatasetError
from redi.core.metrics import compute_all, image_auroc
from redi.methods.base import load_detector
from redi.methods.base import AnomalyDetector
from redi.core.operating_point import set_threshold
from redi.core.utils import atomic_write_text, pick_device

STAGE = "validate-detector"
MARGINS = tuple(float(m) for m in np.round(np.arange(0.8, 1.5 + 1e-9, 0.05), 2))  # 0.80, 0.85, ..., 1.50
MAX_DONORS = 64  # bank images loaded as cut-and-paste donors (a 600-image bank would take 470 MB at 256 px)
N_EXAMPLES = 7  # synthetic images drawn in val_examples.png (one of each kind)
METRIC_KEYS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")


def _log(message: str) -> None:
    print(f"[{STAGE}] {message}", file=sys.stderr, flush=True)


# ----- the validation set ----------------------------------------------------------------------------------
def held_out_split(detector: AnomalyDetector, category: MVTecCategory) -> tuple[list[Sample], list[Sample]]:
    """(held-out normals, bank images) of a line for a trained detector.

    The held-out normals are the line's ``train/good`` images the detector was not fitted on
    (not in ``detector.fit_image_ids``, e.g. ReDi's prompt bank); the fitted images are the others.

    Raises:
        DatasetError: the detector has no bank, none of its bank images is in this folder, or
            fewer than 2 held-out normals remain.
    """
    bank = set(detector.fit_image_ids)
    if not bank:
        raise DatasetError("the detector names no images it was fitted on (fit_image_ids is empty), so which training "
                           "images it never saw is unknown; retrain it with `redi train`")
    held = [s for s in category.train if s.image_id not in bank]
    in_bank = [s for s in category.train if s.image_id in bank]
    if not in_bank:
        raise DatasetError(f"none of the {len(bank)} images the detector was fitted on (e.g. {sorted(bank)[0]!r}) is in "
                           f"{category.root}/train/good; validate with the data folder the detector was trained on")
    if len(held) < 2:
        raise DatasetError(f"only {len(held)} held-out normal image(s) in {category.root}/train/good (training images "
                           f"the detector was not fitted on); validation needs at least 2: raise "
                           f"data.val_fraction or data.min_val_images and retrain, or add normal images to train/good")
    return held, in_bank


def _donor_samples(bank: list[Sample], seed: int) -> list[Sample]:
    """At most MAX_DONORS bank images, a fixed choice for the seed, in the bank's order."""
    if len(bank) <= MAX_DONORS:
        return bank
    keep = set(np.random.default_rng(seed).choice(len(bank), MAX_DONORS, replace=False).tolist())
    return [s for i, s in enumerate(bank) if i in keep]


def validation_set(detector: AnomalyDetector, category: MVTecCategory, cfg: RediConfig) -> tuple[torch.Tensor, SyntheticSet]:
    """The held-out normals and synthetic defects drawn on them, from the training data only.

    Images are loaded at the detector's size exactly as calibration loaded them
    (:func:`redi.data.dataset.load_images`); ``cfg.eval.synthetic_per_image`` defects are drawn
    on each held-out normal, cycling through every kind, seeded by ``cfg.train.seed``; cutpaste
    patches come from (up to MAX_DONORS) bank images.

    Returns:
        (normals float ``(N, 3, H, W)``, :class:`redi.data.synthetic.SyntheticSet` of
        ``N * synthetic_per_image`` images whose ``sources`` index ``normals``).

    Raises:
        DatasetError: see :func:`held_out_split`.
    """
    held, bank = held_out_split(detector, category)
    size = detector.input_hw
    normals = load_images(held, size, detector.cfg.data.aspect)
    donors = load_images(_donor_samples(bank, cfg.train.seed), size, detector.cfg.data.aspect)
    synthetic = synthesize_defects(normals, donors, cfg.eval.synthetic_per_image, cfg.train.seed)
    return normals, synthetic


# ----- scoring and metrics -----------------------------------------------------------------------------------
def _score(detector: AnomalyDetector, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (N,), anomaly maps (N, H, W)) on the CPU, in batches."""
    scores, maps = [], []
    for begin in range(0, images.shape[0], batch_size):
        out = detector.predict(images[begin:begin + batch_size])
        scores.append(out.score.float().cpu())
        maps.append(out.anomaly_map.float().cpu())
    return (torch.cat(scores) if scores else torch.zeros(0),
            torch.cat(maps) if maps else torch.zeros(0, *detector.input_hw))


def margin_table(normal_scores: np.ndarray | torch.Tensor, defect_scores: np.ndarray | torch.Tensor,
                 quantile: float, margins: Sequence[float] = MARGINS, policy: str = "max",
                 target: float = 0.01) -> tuple[list[dict[str, float]], float]:
    """Threshold margins on the validation set, and the recommended one.

    For each margin m the threshold is the line's threshold policy on the normal scores times m
    (``redi.core.operating_point.set_threshold``, the rule of ``redi.workflow.stages.calibrate_threshold``;
    ``quantile`` is the ``max`` policy's). Recall is measured on the defect scores. The false-alarm
    rate is measured leave-one-out (``false_alarm_rate``): normal i is compared with the threshold
    made from the other normals, as a new normal image meets a threshold made without it; the
    in-sample rate (``false_alarm_rate_in_sample``, 0 for any m >= 1 under the ``max`` policy at
    quantile 1) is listed too but would always favour the smallest such margin. The recommended
    margin has the best balanced accuracy ``(recall + 1 - false_alarm_rate) / 2``; ties go to the
    larger margin (fewer false alarms).

    Returns:
        (rows ``margin, threshold, recall, false_alarm_rate, false_alarm_rate_in_sample,
        balanced_accuracy``, recommended margin).

    Raises:
        DatasetError: fewer than 3 normal scores (2 left out of each leave-one-out fit) or no
            defect score.
    """
    normal = np.asarray(normal_scores, dtype=np.float64).ravel()
    defect = np.asarray(defect_scores, dtype=np.float64).ravel()
    if normal.size < 3 or defect.size < 1:
        raise DatasetError(f"a margin table needs at least 3 normal and 1 defect score, got {normal.size} and "
                           f"{defect.size}; add held-out normal images (data.val_fraction, data.min_val_images)")
    base = set_threshold(normal, policy, target, quantile)
    loo_base = np.array([set_threshold(np.delete(normal, i), policy, target, quantile) for i in range(normal.size)])
    rows = []
    for margin in margins:
        recall = float((defect > base * margin).mean())
        false_alarms = float((normal > loo_base * margin).mean())
        rows.append({"margin": float(margin), "threshold": base * margin, "recall": recall,
                     "false_alarm_rate": false_alarms,
                     "false_alarm_rate_in_sample": float((normal > base * margin).mean()),
                     "balanced_accuracy": round((recall + 1.0 - false_alarms) / 2.0, 12)})
    best = max(rows, key=lambda r: (r["balanced_accuracy"], r["margin"]))
    return rows, best["margin"]


def served_policy(detector: AnomalyDetector) -> tuple[str, float]:
    """(policy, false-call target) the detector's threshold was calibrated with; ``max`` for
    detectors calibrated before threshold policies."""
    calibration = detector.metadata.get("calibration") or {}
    return (str(calibration.get("policy", "max")),
            float(calibration.get("false_call_target") or detector.cfg.eval.false_call_target))


def _validate(detector: AnomalyDetector, normals: torch.Tensor, synthetic: SyntheticSet, cfg: RediConfig,
              margins: bool = True) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """:func:`validate_detector`'s result plus the scores and maps (normals first, then synthetic);
    without ``margins`` no margin table (which needs 3 normals) is made."""
    if normals.shape[0] < 2 or len(synthetic) == 0:
        raise DatasetError(f"validation needs at least 2 held-out normals and 1 synthetic defect, got "
                           f"{normals.shape[0]} and {len(synthetic)}; raise data.val_fraction or "
                           f"eval.synthetic_per_image")
    images = torch.cat([normals.float().cpu(), synthetic.images])
    scores, maps = _score(detector, images, cfg.eval.batch_size)
    n = normals.shape[0]
    labels = np.r_[np.zeros(n, dtype=np.int64), synthetic.labels.numpy()]
    masks = torch.cat([torch.zeros(n, *synthetic.masks.shape[1:], dtype=torch.bool), synthetic.masks]).numpy()
    metrics = compute_all(labels, scores.numpy(), masks, maps.numpy(), max_fpr=cfg.eval.max_fpr)
    normal_scores, defect_scores = scores[:n], scores[n:]
    threshold = float(detector.threshold)
    calibrated = math.isfinite(threshold)
    kinds = np.array(synthetic.kinds)
    per_kind = {}
    for kind in [k for k in SYNTHETIC_KINDS if k in synthetic.kinds]:
        chosen = torch.from_numpy(kinds == kind)
        kind_scores = defect_scores[chosen]
        per_kind[kind] = {
            "n": int(chosen.sum()),
            "recall_at_threshold": float((kind_scores > threshold).float().mean()) if calibrated else None,
            "image_auroc": image_auroc(np.r_[np.zeros(n), np.ones(kind_scores.numel())],
                                       np.r_[normal_scores.numpy(), kind_scores.numpy()]),
            "mean_defect_area": float(synthetic.masks[chosen].float().mean()),  # share of the image
        }
    policy, target = served_policy(detector)
    rows, recommended = (margin_table(normal_scores, defect_scores, cfg.eval.threshold_quantile, policy=policy,
                                      target=target) if margins else ([], None))
    base = set_threshold(normal_scores.numpy(), policy, target, cfg.eval.threshold_quantile)
    result = {
        "metrics": {k: metrics[k] for k in (*METRIC_KEYS, "f1", "f1_threshold")},
        "counts": {"normal": n, "synthetic": len(synthetic),
                   "per_kind": {k: v["n"] for k, v in per_kind.items()}},
        "threshold": threshold if calibrated else None,
        # the margin the detector's own threshold amounts to on these scores
        "detector_margin": threshold / base if calibrated and base > 0 else None,
        "recall_at_threshold": float((defect_scores > threshold).float().mean()) if calibrated else None,
        "false_alarm_rate_at_threshold": float((normal_scores > threshold).float().mean()) if calibrated else None,
        "per_kind": per_kind,
        "threshold_policy": policy, "false_call_target": target,
        "threshold_quantile": cfg.eval.threshold_quantile,
        "margin_table": rows,
        "recommended_margin": recommended,
        "recommended_threshold": None if recommended is None else base * recommended,
    }
    return result, scores, maps


def validate_detector(detector: AnomalyDetector, normals: torch.Tensor, synthetic: SyntheticSet,
                      cfg: RediConfig, margins: bool = True) -> dict[str, Any]:
    """Score the validation set and measure the detector on it (no test image involved).

    Args:
        detector: a trained detector (its threshold is used for the recall figures when set).
        normals: held-out normal images ``(N, 3, H, W)``, label 0, empty masks.
        synthetic: synthetic defects (label 1) with their masks, e.g. from :func:`validation_set`.
        cfg: ``eval.batch_size``, ``eval.max_fpr`` (AUPRO) and ``eval.threshold_quantile`` (margins,
            under the threshold policy the detector was calibrated with: :func:`served_policy`).

    Returns:
        JSON-ready dict: ``metrics`` (image_auroc, pixel_auroc, pixel_ap, aupro, f1, f1_threshold),
        ``counts``, ``threshold``, ``detector_margin``, ``recall_at_threshold``,
        ``false_alarm_rate_at_threshold`` (in sample: these normals set the threshold),
        ``per_kind`` (n, recall_at_threshold, image_auroc, mean_defect_area), ``threshold_policy``,
        ``false_call_target``, ``threshold_quantile``,
        ``margin_table``, ``recommended_margin`` and ``recommended_threshold`` (see :func:`margin_table`;
        empty and None without ``margins``).

    Raises:
        DatasetError: fewer than 2 normals or no synthetic image.
    """
    return _validate(detector, normals, synthetic, cfg, margins)[0]


# ----- the stage ----------------------------------------------------------------------------------------------
def _example_picture(normals: torch.Tensor, synthetic: SyntheticSet, scores: torch.Tensor, maps: torch.Tensor,
                     threshold: float | None, names: Sequence[str]) -> np.ndarray:
    """Rows of (clean source, synthetic image with its mask outline, anomaly map overlay) for a few defects."""
    from redi.core.images import to_uint8_rgb
    from redi.core.visualize import display_range, mask_contour, overlay, strip  # matplotlib only when drawing

    n = normals.shape[0]
    firsts = [synthetic.kinds.index(k) for k in SYNTHETIC_KINDS if k in synthetic.kinds]  # one of each kind first
    chosen = (firsts + [i for i in range(len(synthetic)) if i not in firsts])[:N_EXAMPLES]
    vmin, vmax = display_range(threshold, maps.numpy())
    rows = []
    for i in chosen:
        image, mask = to_uint8_rgb(synthetic.images[i]), synthetic.masks[i].numpy()
        heat = overlay(image, maps[n + i].numpy(), vmin, vmax)
        score = float(scores[n + i])
        verdict = "" if threshold is None else (" > thr" if score > threshold else " <= thr")
        rows.append(strip([(to_uint8_rgb(normals[synthetic.sources[i]]), f"normal {names[synthetic.sources[i]]}"),
                           (mask_contour(image, mask), f"{synthetic.kinds[i]} (mask)"),
                           (mask_contour(heat, mask), f"score {score:.3f}{verdict}")]))
    gap = np.full((4, rows[0].shape[1], 3), 255, dtype=np.uint8)
    return np.concatenate([part for row in rows for part in (row, gap)][:-1])


def validate(detector_path: str | Path, data_root: str | Path, out_dir: str | Path, cfg: RediConfig) -> Path:
    """Stage: validate a trained detector on synthetic defects made from its line's training data.

    Writes into ``out_dir``: ``val_metrics.json`` (what :func:`validate_detector` returns, plus the
    held-out image ids, the detector, data folder and seed) and ``val_examples.png`` (a few
    synthetic images with their mask outlines and anomaly maps). Returns the JSON's path.

    Raises:
        WeightsError: the detector file is missing or not a detector.
        DatasetError: the data folder does not fit the detector (see :func:`held_out_split`).
    """
    from redi.core.visualize import save_png

    out_dir = Path(out_dir)
    device = pick_device(cfg.train.device)
    detector = load_detector(detector_path, device)
    category = MVTecCategory(data_root, skip_bad_files=cfg.data.skip_bad_files)
    held, bank = held_out_split(detector, category)
    _log(f"{category.name}: {len(held)} held-out normals, {cfg.eval.synthetic_per_image} synthetic defects on each, "
         f"cut-and-paste donors from {min(len(bank), MAX_DONORS)} bank images, seed {cfg.train.seed}")
    normals, synthetic = validation_set(detector, category, cfg)
    started = time.perf_counter()
    result, scores, maps = _validate(detector, normals, synthetic, cfg)
    seconds = time.perf_counter() - started
    metrics = result["metrics"]
    _log(" ".join(f"{k} {metrics[k]:.4f}" for k in METRIC_KEYS if metrics.get(k) is not None)
         + f" on {len(held)} normals + {len(synthetic)} synthetic defects ({seconds:.1f} s)")
    if result["threshold"] is not None:
        _log(f"at the served threshold {result['threshold']:.4f} ({result['threshold_policy']} policy, false-call "
             f"target {result['false_call_target']:.1%}): {result['recall_at_threshold']:.1%} of the synthetic "
             f"defects caught, {result['false_alarm_rate_at_threshold']:.1%} of the held-out normals flagged")
    _log(f"recommended threshold margin {result['recommended_margin']:.2f} "
         f"({result['threshold_policy']} policy's threshold on the held-out normal scores x margin)")
    result.update({
        "held_out_ids": [s.image_id for s in held],
        "seed": cfg.train.seed, "synthetic_per_image": cfg.eval.synthetic_per_image,
        "detector": str(detector_path), "data_root": str(category.root),
        "line": detector.metadata.get("line"), "profile": detector.metadata.get("profile"),
        "model_version": detector.metadata.get("version"), "device": str(device),
        "seconds_per_image": seconds / max(len(held) + len(synthetic), 1),
    })
    out_dir.mkdir(parents=True, exist_ok=True)
    threshold = result["threshold"]
    names = [Path(s.image_id).name for s in held]
    picture = save_png(out_dir / "val_examples.png",
                       _example_picture(normals, synthetic, scores, maps, threshold, names))
    _log(f"examples -> {picture}")
    return atomic_write_text(out_dir / "val_metrics.json", json.dumps(result, indent=2, default=str))
