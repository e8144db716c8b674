"""The method-independent stages: check the data, fit the configured method, evaluate at the
served threshold. One function each, files in, files out.

The CLI (``redi ...``), the Kubeflow components (``components/``), the DVC stages (``dvc.yaml``)
and the tests call these (and the method's own fit stages, e.g. :mod:`redi.methods.redi.fit`)
through the stage table :mod:`redi.stages`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from redi.core.config import RediConfig, save_config
from redi.core.errors import DatasetError
from redi.core.images import crop_to_content, image_size_of
from redi.core.metrics import compute_all
from redi.core.operating_point import achievable, decision_stats
from redi.core.utils import pick_device, sha256_file
from redi.data.dataset import load_images, load_masks
from redi.data.mvtec import MVTecCategory, Sample
from redi.methods.base import AnomalyDetector, get_method, load_detector
from redi.methods.common import log_stage, open_line, score_images, write_json
from redi.workflow.champion import check_candidates, read_selection, train_candidates


# -- stage: validate / version the data ---------------------------------------------------------
def validate_data(data_root: str | Path, out_dir: str | Path, cfg: RediConfig) -> Path:
    """Check every image and mask; write ``manifest.json`` (files, hashes, counts) and ``rejected.json``."""
    out_dir = Path(out_dir)
    category = open_line(data_root, cfg)
    report = category.validate(check_pixels=True)
    files = [{"image_id": s.image_id, "path": str(s.path.relative_to(category.root)), "label": s.label,
              "defect_type": s.defect_type, "sha256": sha256_file(s.path),
              "mask": str(s.mask_path.relative_to(category.root)) if s.mask_path else None}
             for s in category.samples]
    manifest = {"line": category.name, "root": str(category.root), "counts": category.counts(),
                "n_files": len(files), "files": files, "report": report.to_dict()}
    write_json(out_dir / "rejected.json", [{"path": str(p), "reason": r} for p, r in category.skipped])
    log_stage("validate", f"{category.name}: {len(files)} files valid, {len(category.skipped)} rejected")
    return write_json(out_dir / "manifest.json", manifest)


# -- inference helpers and the evaluation stage -------------------------------------------------
def _image_pixels(samples: list[Sample], masks, maps, aspect: str):
    """Masks and maps restricted to the pixels that show the image: a letterbox's padding is not
    part of the part and would add easy normal pixels to the pixel metrics. Cropped when every
    test image has the same shape (one box); otherwise the whole canvas is scored, and logged."""
    if aspect != "letterbox":
        return masks, maps
    shapes = {image_size_of(s.path) for s in samples}
    if len(shapes) != 1:
        log_stage("evaluate", f"test images come in {len(shapes)} shapes: pixel metrics include the letterbox padding")
        return masks, maps
    image_hw = shapes.pop()
    crop = [(crop_to_content(m, image_hw, aspect), crop_to_content(a, image_hw, aspect))
            for m, a in zip(masks, maps)]
    return np.stack([m for m, _ in crop]), np.stack([a for _, a in crop])


def _served_threshold_info(detector: AnomalyDetector) -> dict[str, Any]:
    """How the detector's threshold was set: policy and target (``max`` for detectors calibrated
    before threshold policies, whose rule was a quantile of the held-out normals)."""
    calibration = dict(detector.metadata.get("calibration") or {})
    return {"threshold": float(detector.threshold), "threshold_policy": calibration.get("policy", "max"),
            "false_call_target": calibration.get("false_call_target"),
            "threshold_margin": calibration.get("margin", detector.cfg.eval.threshold_margin),
            "threshold_n_held_out": calibration.get("n_val"), "threshold_note": calibration.get("note")}


def operating_point_metrics(labels: np.ndarray, scores: np.ndarray, defect_types: list[str], threshold: float,
                            cfg: RediConfig) -> dict[str, Any]:
    """The decision at the served threshold: confusion matrix, recall per defect type, and the best
    recall / false-call pairs any threshold would give on these labelled scores."""
    point = decision_stats(labels, scores, threshold)
    kinds = sorted({t for t, y in zip(defect_types, labels) if y == 1})
    per_type = {}
    for kind in kinds:
        chosen = np.array([t == kind and y == 1 for t, y in zip(defect_types, labels)])
        per_type[kind] = {"n": int(chosen.sum()), "caught": int((scores[chosen] > threshold).sum()),
                          "recall": float((scores[chosen] > threshold).mean())}
    both = bool(labels.any() and not labels.all())
    reach = (achievable(labels, scores, cfg.eval.goal_recall, cfg.eval.goal_false_call_rate) if both else None)
    return {"operating_point": point, "recall_per_type": per_type, "achievable": reach}


def validation_scores(detector: AnomalyDetector, category: MVTecCategory, cfg: RediConfig) -> dict[str, Any] | None:
    """Scores of the synthetic validation set (held-out normals + synthetic defects), or None when
    this data folder cannot make it (e.g. the detector's bank images are not in it)."""
    from redi.workflow.validation import validation_set

    try:
        normals, synthetic = validation_set(detector, category, cfg)
    except DatasetError as exc:
        log_stage("evaluate", f"no validation curve: {exc}")
        return None
    images = torch.cat([normals.float(), synthetic.images])
    scores = score_images(detector, images, cfg.eval.batch_size)["scores"].numpy()
    labels = np.r_[np.zeros(normals.shape[0], dtype=np.int64), synthetic.labels.numpy()]
    return {"labels": labels, "scores": scores, "kinds": ["good"] * normals.shape[0] + list(synthetic.kinds)}


def _test_composite(row: dict[str, Any]) -> float:
    """The selection rule's formula on test numbers (to say how well validation ranked the candidates)."""
    parts = [row.get("image_auroc"), row.get("pixel_ap"), row.get("recall_at_threshold")]
    return float(np.mean([0.0 if p is None else float(p) for p in parts]))


def candidate_comparison(selection: dict[str, Any], test: list[Sample], images: torch.Tensor, masks: np.ndarray | None,
                         cfg: RediConfig, device: torch.device) -> dict[str, Any]:
    """Every candidate of a champion's selection scored on the test split beside its validation
    numbers, and how well validation ranked them (read after the choice; the choice never sees it)."""
    from scipy.stats import kendalltau

    labels = np.array([s.label for s in test])
    rows = []
    for candidate in selection["candidates"]:
        row = {k: candidate.get(k) for k in ("name", "method", "chosen", "selection_score", "threshold")}
        row["validation"] = candidate.get("validation")
        path = Path(candidate["path"])
        if not path.is_file():
            row["test"] = None
            row["note"] = f"candidate file {path} is gone; not scored on test"
            rows.append(row)
            continue
        detector = load_detector(path, device)
        started = time.perf_counter()
        result = score_images(detector, images, cfg.eval.batch_size, keep_maps=masks is not None)
        seconds = (time.perf_counter() - started) / max(len(test), 1)
        scores = result["scores"].numpy().astype(np.float64)
        pixel_masks, pixel_maps = (_image_pixels(test, masks, result["maps"].numpy(), detector.cfg.data.aspect)
                                   if masks is not None else (None, None))
        metrics = compute_all(labels, scores, pixel_masks, pixel_maps, max_fpr=cfg.eval.max_fpr)
        point = decision_stats(labels, scores, float(detector.threshold))
        row["test"] = {**{k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")},
                       "recall_at_threshold": point["recall"], "false_call_rate_at_threshold": point["false_call_rate"],
                       "seconds_per_image": seconds}
        rows.append(row)
    scored = [r for r in rows if r["test"] is not None]
    summary: dict[str, Any] = {"rule": selection.get("rule"), "champion": selection.get("champion"), "rows": rows}
    if len(scored) >= 2:
        composite = [_test_composite(r["test"]) for r in scored]
        best_test = scored[int(np.argmax(composite))]["name"]
        tau = kendalltau([r["selection_score"] for r in scored], composite).statistic
        chosen = next((r for r in scored if r["chosen"]), None)
        summary.update({"test_best": best_test, "validation_picked_test_best": best_test == selection.get("champion"),
                        "kendall_tau": None if tau != tau else float(tau)})
        if chosen is not None:
            for key in ("pixel_ap", "image_auroc"):
                values = [r["test"][key] for r in scored if r["test"][key] is not None]
                if values and chosen["test"][key] is not None:
                    summary[f"champion_gap_{key}"] = float(max(values) - chosen["test"][key])
    return summary


def evaluate(detector_path: str | Path, data_root: str | Path, out_dir: str | Path, cfg: RediConfig,
             write_report: bool = True) -> Path:
    """Score the test split; write ``metrics.json`` (every decision number names its threshold),
    ``scores.json``, the curves as CSV files in ``plots/`` and, with ``write_report``, the HTML
    report folder and the validation operating point."""
    from redi.workflow.report import write_curve_data, write_report as render_report  # matplotlib only here

    out_dir = Path(out_dir)
    device = pick_device(cfg.train.device)
    detector = load_detector(detector_path, device)
    category = open_line(data_root, cfg)
    category.require_test()
    test = category.test
    size = detector.input_hw
    aspect = detector.cfg.data.aspect
    images = load_images(test, size, aspect)
    masks = load_masks(test, size, aspect)[:, 0].bool()
    started = time.perf_counter()
    result = score_images(detector, images, cfg.eval.batch_size, keep_maps=True, keep_pictures=write_report,
                          show_progress=True)
    seconds = time.perf_counter() - started
    labels = torch.tensor([s.label for s in test])
    has_masks = any(s.mask_path is not None for s in test)
    pixel_masks, pixel_maps = (_image_pixels(test, masks.numpy(), result["maps"].numpy(), aspect)
                               if has_masks else (None, None))
    metrics = compute_all(labels.numpy(), result["scores"].numpy(), pixel_masks, pixel_maps,
                          max_fpr=cfg.eval.max_fpr)
    decisions = detector.is_anomalous(result["scores"])
    served = _served_threshold_info(detector)
    decided = operating_point_metrics(labels.numpy(), result["scores"].numpy().astype(np.float64),
                                      [s.defect_type for s in test], served["threshold"], cfg)
    point = decided["operating_point"]
    metrics.update({
        **served,
        # the flat names older readers know, from the one operating point
        "accuracy_at_threshold": point["accuracy"], "recall_at_threshold": point["recall"],
        "false_alarm_rate_at_threshold": point["false_call_rate"],
        **decided,
        "profile": detector.metadata.get("profile"), "backbone": detector.metadata.get("backbone"),
        "model_version": detector.metadata.get("version"), "line": detector.metadata.get("line"),
        "data_root": str(category.root), "seconds_per_image": seconds / max(len(test), 1), "device": str(device),
    })
    selection = read_selection(detector_path)
    if selection is not None:
        metrics["candidates"] = candidate_comparison(selection, test, images, masks.numpy() if has_masks else None,
                                                     cfg, device)
        _log_candidates(metrics["candidates"])
    validation = validation_scores(detector, category, cfg) if write_report else None
    if validation is not None:
        val_point = decision_stats(validation["labels"], validation["scores"], served["threshold"])
        metrics["validation"] = {"threshold": served["threshold"], "recall_at_threshold": val_point["recall"],
                                 "false_call_rate_at_threshold": val_point["false_call_rate"],
                                 "n_normal": val_point["fp"] + val_point["tn"],
                                 "n_synthetic": val_point["tp"] + val_point["fn"]}
    out_dir.mkdir(parents=True, exist_ok=True)
    per_image = [{"image_id": s.image_id, "defect_type": s.defect_type, "label": s.label,
                  "score": float(score), "anomalous": bool(d), "threshold": served["threshold"]}
                 for s, score, d in zip(test, result["scores"], decisions)]
    write_json(out_dir / "scores.json", per_image)
    write_curve_data(out_dir / "plots", labels.numpy(), result["scores"].numpy(), pixel_masks, pixel_maps,
                     cfg.eval.max_fpr, validation)  # the curves as data, for `dvc plots show/diff`
    if write_report:
        render_report(out_dir / "report", detector, test, images, masks, result, metrics, validation=validation)
    log_stage("evaluate", " ".join(f"{k} {metrics[k]:.4f}" for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")
                              if metrics.get(k) is not None))
    log_stage("evaluate", f"at the served threshold {served['threshold']:.4f}: caught {point['tp']} of "
                     f"{point['tp'] + point['fn']} defects, flagged {point['fp']} of {point['fp'] + point['tn']} "
                     f"good parts")
    return write_json(out_dir / "metrics.json", metrics)


def _log_candidates(summary: dict[str, Any]) -> None:
    for row in summary["rows"]:
        test = row["test"] or {}
        mark = " (champion)" if row["chosen"] else ""
        log_stage("evaluate", f"candidate {row['name']}{mark}: selection score {row['selection_score']:.4f}; test "
                              f"image AUROC {_num(test.get('image_auroc'))}, pixel AP {_num(test.get('pixel_ap'))}, "
                              f"recall at its threshold {_num(test.get('recall_at_threshold'))}")
    if "test_best" in summary:
        log_stage("evaluate", f"validation chose {summary['champion']}; on test the best is {summary['test_best']} "
                              f"(Kendall tau of the rankings {_num(summary.get('kendall_tau'))})")


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# -- everything at once -------------------------------------------------------------------------
def train_all(data_root: str | Path, out_dir: str | Path, cfg: RediConfig, line: str = "") -> dict[str, Path]:
    """Check the data, then fit the line into one folder: what ``redi train`` does. With
    ``model.candidates`` every candidate is fitted and the champion chosen on validation
    (:mod:`redi.workflow.champion`); without, ``model.method`` alone. Returns every file written,
    ``detector`` (what the line would serve) among them."""
    out_dir = Path(out_dir)
    check_candidates(cfg)  # an unknown method name fails before any training
    save_config(cfg, out_dir / "config.yaml")
    paths: dict[str, Path] = {"manifest": validate_data(data_root, out_dir, cfg)}
    if cfg.model.candidates:
        paths.update(train_candidates(data_root, out_dir, cfg, line))
    else:
        paths.update(get_method(cfg.model.method).fit(data_root, out_dir, cfg, line))
    return paths
