"""The fused method registered as ``fused``: built from its parts' fitted detectors."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from redi.core.config import RediConfig
from redi.core.utils import pick_device
from redi.data.dataset import load_images
from redi.methods.base import Method, get_method, load_detector, register_method, save_detector
from redi.methods.common import calibrate_threshold, line_config, log_stage, open_line, score_images
from redi.methods.fused.detector import FusedDetector

STAGE = "fused"


def fuse_detectors(part_paths: dict[str, Path], data_root: str | Path, out_dir: str | Path, cfg: RediConfig,
                   line: str = "") -> Path:
    """Combine fitted detectors of one line: standardise each part's maps on the held-out normals,
    calibrate the fused score's threshold on them, write ``out_dir/detector.pt``."""
    device = pick_device(cfg.train.device)
    parts = [load_detector(part_paths[name], device) for name in cfg.model.fused.parts]
    category = open_line(data_root, cfg)
    cfg = line_config(category, cfg)
    detector = FusedDetector(cfg, parts).to(device)
    fitted = set(detector.fit_image_ids)
    held_out = [s for s in category.train if s.image_id not in fitted]
    images = load_images(held_out, detector.input_hw, cfg.data.aspect)
    detector.set_standardisation([score_images(p, images, cfg.eval.batch_size, keep_maps=True)["maps"] for p in parts])
    calibration = calibrate_threshold(detector, images, cfg, normals=[s for s in category.train if s.label == 0])
    log_stage(STAGE, f"{' + '.join(detector.part_names)}: map mean {detector.map_mean.tolist()}, std "
                     f"{detector.map_std.tolist()} on {len(held_out)} held-out normals; threshold "
                     f"{calibration['threshold']:.4f}")
    meta = {"line": line or category.name, "calibration": calibration, "parts": detector.part_names,
            "part_versions": [p.metadata.get("version") for p in parts], "version": time.strftime("%Y%m%d-%H%M%S")}
    return save_detector(detector.cpu(), Path(out_dir) / "detector.pt", meta)


@register_method("fused")
class Fused(Method):
    """Average of the parts' standardised anomaly maps (``model.fused.parts``)."""

    detector_class = FusedDetector

    def parts(self, cfg: RediConfig) -> list[str]:
        return list(cfg.model.fused.parts)

    def fit(self, data_root: str | Path, out_dir: str | Path, cfg: RediConfig, line: str = "") -> dict[str, Path]:
        """Fit each part into ``out_dir/<part>/``, then combine them."""
        out_dir = Path(out_dir)
        paths = {}
        for name in self.parts(cfg):
            paths[name] = get_method(name).fit(data_root, out_dir / name, _as_method(cfg, name), line)["detector"]
        return self.combine(paths, data_root, out_dir, cfg, line)

    def combine(self, parts: dict[str, Path], data_root: str | Path, out_dir: str | Path, cfg: RediConfig,
                line: str = "") -> dict[str, Path]:
        return {"detector": fuse_detectors(parts, data_root, out_dir, cfg, line)}


def _as_method(cfg: RediConfig, name: str) -> RediConfig:
    """The config with ``model.method`` set to ``name`` (what a part's artifact records)."""
    import copy

    part = copy.deepcopy(cfg)
    part.model.method = name
    return part
