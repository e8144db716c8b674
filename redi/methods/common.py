"""What every method's fitting shares: stage logs, the line's data and split, scoring a stack of
images through the detector protocol, and calibrating the served threshold on held-out normals."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from redi.core.config import RediConfig
from redi.core.errors import DatasetError, WeightsError
from redi.core.images import image_size_of, load_rgb, native_canvas
from redi.core.operating_point import set_threshold, small_sample_note
from redi.core.part_check import PartProfile, image_statistics
from redi.core.utils import atomic_write_text, progress
from redi.data.mvtec import MVTecCategory, Sample, split_train_val
from redi.methods.base import AnomalyDetector

LOG = sys.stderr


def log_stage(stage: str, message: str) -> None:
    """One progress line of a stage on stderr: ``[stage] message``."""
    print(f"[{stage}] {message}", file=LOG, flush=True)


def write_json(path: Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically (a killed stage leaves no half file)."""
    return atomic_write_text(path, json.dumps(payload, indent=2, default=str))


def open_line(data_root: str | Path, cfg: RediConfig) -> MVTecCategory:
    """Open a product line's dataset with the configured bad-file policy."""
    return MVTecCategory(data_root, skip_bad_files=cfg.data.skip_bad_files)


def line_config(category: MVTecCategory, cfg: RediConfig) -> RediConfig:
    """``cfg`` with the line's input canvas filled in: for ``data.aspect=native`` with no
    ``data.canvas``, the canvas is measured on all the line's training images (their headers,
    :func:`redi.core.images.native_canvas`), so every stage of a fit, and the fitted model's saved
    config, agree on it. Other settings, and ``cfg`` itself, are left as they are."""
    if cfg.data.aspect != "native" or cfg.data.canvas:
        return cfg
    if not category.train:
        raise DatasetError(f"{category.root} has no training images to measure the native canvas on")
    filled = copy.deepcopy(cfg)
    filled.data.canvas = list(native_canvas([image_size_of(s.path) for s in category.train], cfg.data.image_size))
    log_stage("data", f"native canvas {filled.data.canvas[0]} x {filled.data.canvas[1]} (height x width) from "
                      f"{len(category.train)} training images")
    return filled


def training_split(category: MVTecCategory, cfg: RediConfig) -> tuple[list[Sample], list[Sample]]:
    """(bank/training images, held-out normals for the threshold): deterministic in the seed."""
    return split_train_val(category.train, cfg.data.val_fraction, cfg.data.min_val_images, cfg.train.seed)


def score_images(detector: AnomalyDetector, images: torch.Tensor, batch_size: int = 8, keep_maps: bool = False,
                 keep_pictures: bool = False, show_progress: bool = False) -> dict[str, Any]:
    """Run any detector over a stack of images in batches: ``scores`` always, ``maps`` (N, H, W)
    and the method's ``pictures`` (name -> (N, 3, H, W), :meth:`AnomalyDetector.pictures`) on request."""
    scores, maps, pictures = [], [], {}
    batches = range(0, images.shape[0], batch_size)
    if show_progress:
        batches = progress(batches, len(batches), "[predict] batch")
    for begin in batches:
        out = detector.predict(images[begin:begin + batch_size])
        scores.append(out.score.float().cpu())
        if keep_maps:
            maps.append(out.anomaly_map.float().cpu())
        if keep_pictures:
            for name, picture in detector.pictures(out).items():
                pictures.setdefault(name, []).append(picture.float().cpu())
    result: dict[str, Any] = {"scores": torch.cat(scores)}
    if keep_maps:
        result["maps"] = torch.cat(maps)
    if keep_pictures:
        result["pictures"] = {name: torch.cat(parts) for name, parts in pictures.items()}
    return result


def part_profile(samples: Sequence[Sample]) -> dict[str, Any]:
    """The line's part profile (:mod:`redi.core.part_check`) over these normal images, as plain values."""
    return PartProfile.from_statistics(image_statistics(load_rgb(s.path)) for s in samples).to_dict()


def calibrate_threshold(detector: AnomalyDetector, images: torch.Tensor, cfg: RediConfig,
                        normals: Sequence[Sample] = ()) -> dict[str, Any]:
    """Decision threshold from held-out normal images only (never from test labels), set by the
    line's threshold policy for its false-call target (:func:`redi.core.operating_point.set_threshold`).

    ``normals``: the line's normal training images; when given, their part profile is kept as
    ``part_profile`` (the service marks kept images far off it as probably not a part)."""
    if images.shape[0] == 0:
        raise DatasetError("no held-out normal images to calibrate the threshold on; "
                           "raise data.val_fraction or add images to train/good")
    scores = score_images(detector, images, cfg.eval.batch_size)["scores"]
    threshold = set_threshold(scores.numpy(), cfg.eval.threshold_policy, cfg.eval.false_call_target,
                              cfg.eval.threshold_quantile, cfg.eval.threshold_margin)
    detector.threshold.fill_(threshold)
    note = small_sample_note(int(images.shape[0]), cfg.eval.threshold_policy, cfg.eval.false_call_target)
    if note:
        log_stage("calibrate", f"WARNING: {note}")
    return {"threshold": threshold, "policy": cfg.eval.threshold_policy,
            "false_call_target": cfg.eval.false_call_target, "margin": cfg.eval.threshold_margin,
            "val_score_mean": float(scores.mean()), "val_score_max": float(scores.max()),
            "val_false_call_rate": float((scores > threshold).float().mean()), "n_val": int(images.shape[0]),
            "note": note, **({"part_profile": part_profile(normals)} if normals else {})}


def require_file(path: str | Path, what: str, hint: str) -> Path:
    """A clear error for a missing input file of a stage."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} {path} does not exist; {hint}")
    return path
