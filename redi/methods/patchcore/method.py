"""PatchCore registered as the method ``patchcore``, and its one fit stage (files in, files out)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from redi.core.config import RediConfig
from redi.core.utils import pick_device, progress, seed_everything
from redi.data.dataset import load_images
from redi.methods.base import Method, register_method, save_detector
from redi.methods.common import calibrate_threshold, line_config, log_stage, open_line, training_split
from redi.methods.patchcore.detector import PatchCoreDetector
from redi.methods.patchcore.memory_bank import bank_neighbors, greedy_coreset

STAGE = "patchcore"


@torch.inference_mode()
def _training_patches(detector: PatchCoreDetector, images: torch.Tensor, batch_size: int, limit: int, seed: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(patches (P, D), source image index (P,)) of the training images, at most ``limit`` of them
    (a seeded random subsample of each batch's patches, in proportion, when there are more)."""
    device = detector.threshold.device
    count = images.shape[0]
    generator = torch.Generator().manual_seed(seed)
    patches, sources = [], []
    batches = range(0, count, batch_size)
    for begin in progress(batches, len(batches), f"[{STAGE}] patch features, batch", every=max(1, len(batches) // 10)):
        features, _ = detector.patch_features(images[begin:begin + batch_size].to(device))
        b, dim, h, w = features.shape
        flat = features.permute(0, 2, 3, 1).reshape(b * h * w, dim).cpu()
        owner = torch.arange(begin, begin + b).repeat_interleave(h * w)
        keep = max(1, round(flat.shape[0] * min(1.0, limit / (count * h * w))))
        if keep < flat.shape[0]:
            chosen = torch.randperm(flat.shape[0], generator=generator)[:keep]
            flat, owner = flat[chosen], owner[chosen]
        patches.append(flat)
        sources.append(owner)
    return torch.cat(patches), torch.cat(sources)


def train_patchcore(data_root: str | Path, out_dir: str | Path, cfg: RediConfig, line: str = "") -> Path:
    """Fit PatchCore on a line's normal training images (the held-out normals excluded), calibrate
    the threshold on those held-out normals, write ``out_dir/detector.pt``."""
    out_dir = Path(out_dir)
    seed_everything(cfg.train.seed)
    device = pick_device(cfg.train.device)
    settings = cfg.model.patchcore
    category = open_line(data_root, cfg)
    cfg = line_config(category, cfg)
    train, held_out = training_split(category, cfg)
    detector = PatchCoreDetector(cfg).to(device).eval()
    started = time.perf_counter()
    images = load_images(train, cfg.data.input_hw(), cfg.data.aspect)
    patches, sources = _training_patches(detector, images, cfg.eval.batch_size, settings.max_patches, cfg.train.seed)
    count = max(1, round(settings.coreset_ratio * patches.shape[0]))
    log_stage(STAGE, f"{patches.shape[0]} patches of {len(train)} images ({patches.shape[1]}-d); greedy coreset of "
                     f"{count} ({settings.coreset_ratio:.0%}) ...")
    coreset_started = time.perf_counter()

    def report(done: int, total: int) -> None:
        elapsed = time.perf_counter() - coreset_started
        log_stage(STAGE, f"coreset {done}/{total}  ETA {elapsed / done * (total - done):.0f} s")

    chosen = greedy_coreset(patches, count, settings.projection_dim, cfg.train.seed, report)
    bank = patches[chosen]
    support = bank_neighbors(bank, settings.num_neighbors)
    detector.set_bank(bank, sources[chosen], support, [s.image_id for s in train])
    log_stage(STAGE, f"memory bank {bank.shape[0]} x {bank.shape[1]} in {time.perf_counter() - started:.1f} s")
    calibration = calibrate_threshold(detector, load_images(held_out, cfg.data.input_hw(), cfg.data.aspect), cfg,
                                      normals=train + held_out)
    log_stage(STAGE, f"threshold {calibration['threshold']:.4f} ({cfg.eval.threshold_policy} policy, false-call target "
                     f"{cfg.eval.false_call_target:.1%}) from {calibration['n_val']} held-out normals")
    meta = {"line": line or category.name, "calibration": calibration, "n_train": len(train),
            "bank_size": int(bank.shape[0]), "fit_seconds": round(time.perf_counter() - started, 1),
            "version": time.strftime("%Y%m%d-%H%M%S")}
    return save_detector(detector.cpu(), out_dir / "detector.pt", meta)


@register_method("patchcore")
class PatchCore(Method):
    """PatchCore: a coreset of normal patch features; a patch is as anomalous as it is far from them."""

    detector_class = PatchCoreDetector

    def fit(self, data_root: str | Path, out_dir: str | Path, cfg: RediConfig, line: str = "") -> dict[str, Path]:
        return {"detector": train_patchcore(data_root, out_dir, cfg, line)}
