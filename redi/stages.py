"""The pipeline stages of redi: one function each, files in, files out.

The CLI (``redi ...``), the Kubeflow components (``components/``), the DVC stages (``dvc.yaml``)
and the tests all call these functions, so a stage behaves the same wherever it runs. See
docs/architecture.md for the table of inputs and outputs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from redi.backbones import build_backbone
from redi.config import RediConfig, save_config, to_dict
from redi.data.dataset import load_images, load_masks
from redi.data.mvtec import MVTecCategory, Sample, split_train_val
from redi.errors import DatasetError, WeightsError
from redi.losses import discriminate_loss, recover_loss
from redi.metrics import compute_all
from redi.models.detector import Detector, load_detector, load_module_weights, save_detector
from redi.models.recover import RecoverNet
from redi.prompt import PromptBank, PromptImages
from redi.selfmaps import build_selfmap
from redi.training import fingerprint, run_training
from redi.utils import (atomic_torch_save, atomic_write_text, bf16_autocast, load_torch_file, pick_device,
                        progress, seed_everything, sha256_file, use_bf16)

LOG = sys.stderr


def _log(stage: str, message: str) -> None:
    print(f"[{stage}] {message}", file=LOG, flush=True)


def _write_json(path: Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON, atomically (a killed stage leaves no half file)."""
    return atomic_write_text(path, json.dumps(payload, indent=2, default=str))


def open_line(data_root: str | Path, cfg: RediConfig) -> MVTecCategory:
    """Open a product line's dataset with the configured bad-file policy."""
    return MVTecCategory(data_root, skip_bad_files=cfg.data.skip_bad_files)


def training_split(category: MVTecCategory, cfg: RediConfig) -> tuple[list[Sample], list[Sample]]:
    """(bank/training images, held-out normals for the threshold): deterministic in the seed."""
    return split_train_val(category.train, cfg.data.val_fraction, cfg.data.min_val_images, cfg.train.seed)


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
    _write_json(out_dir / "rejected.json", [{"path": str(p), "reason": r} for p, r in category.skipped])
    _log("validate", f"{category.name}: {len(files)} files valid, {len(category.skipped)} rejected")
    return _write_json(out_dir / "manifest.json", manifest)


# -- stage: self-generated maps -----------------------------------------------------------------
@torch.inference_mode()
def compute_selfmaps(images: torch.Tensor, cfg: RediConfig, device: torch.device,
                     batch_size: int = 16) -> torch.Tensor:
    """Self-maps (N, 1, S, S) of a stack of images, batched on the device."""
    selfmap = build_selfmap(cfg.model.selfmap).to(device)
    chunks = [selfmap(images[i:i + batch_size].to(device)).cpu() for i in range(0, images.shape[0], batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, 1, *images.shape[-2:])


def precompute_selfmaps(data_root: str | Path, out_dir: str | Path, cfg: RediConfig) -> Path:
    """Cache the training images' self-maps in ``selfmaps.pt`` (keyed by image id and config)."""
    device = pick_device(cfg.train.device)
    category = open_line(data_root, cfg)
    train, _ = training_split(category, cfg)
    started = time.perf_counter()
    maps = compute_selfmaps(load_images(train, cfg.data.image_size), cfg, device)
    path = Path(out_dir) / "selfmaps.pt"
    atomic_torch_save({"image_ids": [s.image_id for s in train], "maps": maps.half(), "key": _selfmap_key(cfg)}, path)
    _log("selfmaps", f"{len(train)} {cfg.model.selfmap.kind} maps in {time.perf_counter() - started:.1f} s -> {path}")
    return path


def _selfmap_key(cfg: RediConfig) -> str:
    return fingerprint({"selfmap": to_dict(cfg.model.selfmap), "size": cfg.data.image_size})


def _load_or_compute_selfmaps(path: str | Path | None, train: list[Sample], images: torch.Tensor,
                              cfg: RediConfig, device: torch.device) -> torch.Tensor:
    if path and Path(path).is_file():
        try:
            cached = load_torch_file(path, "self-map cache", "it is recomputed")
        except WeightsError as exc:  # a damaged cache is recomputed, never fatal
            _log("recover", f"{exc}")
            cached = {}
        if isinstance(cached, dict) and cached.get("key") == _selfmap_key(cfg) and cached.get("image_ids") == [s.image_id for s in train]:
            return cached["maps"].float()
        _log("recover", f"self-map cache {path} is for other settings or images; recomputing")
    return compute_selfmaps(images, cfg, device)


# -- stage: prompt bank -------------------------------------------------------------------------
@torch.inference_mode()
def embed_images(backbone: torch.nn.Module, images: torch.Tensor, device: torch.device,
                 batch_size: int = 8) -> torch.Tensor:
    """Pooled backbone embeddings (N, D) of a stack of images."""
    backbone = backbone.to(device)
    out = [backbone(images[i:i + batch_size].to(device)).embedding.float().cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


def build_prompt_bank(data_root: str | Path, out_path: str | Path, cfg: RediConfig) -> Path:
    """Embed every normal training image (held-out normals excluded) into ``prompt_bank.pt``."""
    device = pick_device(cfg.train.device)
    category = open_line(data_root, cfg)
    train, _ = training_split(category, cfg)
    backbone = build_backbone(cfg.model.backbone, cfg.model.backbone_weights or None)
    embeddings = embed_images(backbone, load_images(train, cfg.data.image_size), device, cfg.eval.batch_size)
    bank = PromptBank(embeddings, [s.image_id for s in train], cfg.model.backbone)
    _log("prompt-bank", f"{len(bank)} images, {embeddings.shape[1]}-d {cfg.model.backbone} embeddings -> {out_path}")
    return bank.save(out_path)


def _bank_images(bank: PromptBank, category: MVTecCategory, cfg: RediConfig) -> tuple[list[Sample], torch.Tensor]:
    by_id = {s.image_id: s for s in category.train}
    missing = [i for i in bank.image_ids if i not in by_id]
    if missing:
        raise DatasetError(f"the prompt bank names images that are not in {category.root}: {missing[:3]}; "
                           f"rebuild the prompt bank for this dataset revision")
    samples = [by_id[i] for i in bank.image_ids]
    return samples, load_images(samples, cfg.data.image_size)


def leave_one_out_prompts(bank: PromptBank) -> torch.Tensor:
    """Each bank image's prompt at training time: its nearest other bank image."""
    own = torch.arange(len(bank))
    return bank.nearest(bank.embeddings, exclude=own)[0]


# -- stage: recover net -------------------------------------------------------------------------
def _bank_fingerprint(bank: PromptBank) -> str:
    """Changes when any bank image's pixels change (its embedding does), not only its id."""
    return hashlib.sha256(bank.embeddings.numpy().tobytes()).hexdigest()[:16] + str(bank.image_ids)


def _recover_run_id(cfg: RediConfig, bank: PromptBank) -> str:
    """What defines a recover run; nothing the recover net does not depend on (a map setting must
    not throw away a finished 500-epoch run)."""
    model = cfg.model
    return fingerprint({"backbone": [model.backbone, model.backbone_weights], "selfmap": to_dict(model.selfmap),
                        "prompt": model.prompt, "recover": to_dict(model.recover),
                        "train": to_dict(cfg.train.recover), "lambda_m": cfg.train.lambda_m,
                        "scales": cfg.train.msgms_scales, "flip": cfg.train.augment_flip, "amp": cfg.train.amp,
                        "seed": cfg.train.seed, "size": cfg.data.image_size, "bank": _bank_fingerprint(bank),
                        "prompt_codec": [model.prompt_codec, model.prompt_quality]})


def train_recover(data_root: str | Path, bank_path: str | Path, out_dir: str | Path, cfg: RediConfig,
                  selfmaps_path: str | Path | None = None) -> Path:
    """Train HIP to recover each training image from its self-map and prompt; write ``recover.pt``."""
    out_dir = Path(out_dir)
    path = out_dir / "recover.pt"
    model_cfg = cfg.model
    if not model_cfg.recover.enabled:
        atomic_torch_save({"enabled": False}, path)
        _log("recover", "recover net disabled (model.recover.enabled=false): Y = X")
        return path
    seed_everything(cfg.train.seed)
    device = pick_device(cfg.train.device)
    category = open_line(data_root, cfg)
    bank = PromptBank.load(bank_path, backbone=model_cfg.backbone)
    samples, images = _bank_images(bank, category, cfg)
    maps = _load_or_compute_selfmaps(selfmaps_path, samples, images, cfg, device)
    # The bank is encoded once; the net trains on the decoded prompts, and recover.pt hands the
    # same bytes to the detector, so it serves exactly the prompts it was trained on.
    encoded = (PromptImages.encode(images, model_cfg.prompt_codec, model_cfg.prompt_quality)
               if model_cfg.prompt == "nearest" else None)
    prompts = (encoded.decode_float()[leave_one_out_prompts(bank)] if encoded is not None
               else torch.zeros_like(images))
    net = RecoverNet(1, model_cfg.recover.base_width, model_cfg.recover.depth, model_cfg.recover.input_size,
                     model_cfg.recover.fused_skips).to(device)
    flip = cfg.train.augment_flip
    bf16 = use_bf16(model_cfg.recover.precision, device)

    def step(indices: torch.Tensor):
        x, h, p = images[indices].to(device), maps[indices].to(device), prompts[indices].to(device)
        if flip and torch.rand(()) < 0.5:
            x, h, p = x.flip(-1), h.flip(-1), p.flip(-1)
        with bf16_autocast(bf16, device):  # the net in bf16 where fast; the loss always in fp32
            y = net(h, p)
        loss = recover_loss(x, y.float(), cfg.train.lambda_m, cfg.train.msgms_scales)
        return loss, {}

    _log("recover", f"{len(samples)} images, {cfg.train.recover.epochs} epochs, device {device}, "
                    f"{'bf16' if bf16 else 'fp32'}, profile {cfg.profile}")
    run_id = _recover_run_id(cfg, bank)
    # amp=False: the net has its own precision switch, and the loss must stay in fp32
    result = run_training("recover", net, cfg.train.recover, len(samples), step,
                          out_dir / "checkpoints" / "recover_last.pt", run_id, cfg.train.seed, device, amp=False)
    atomic_torch_save({"enabled": True, "state": net.cpu().state_dict(), "history": result.history,
                       "run_id": run_id, "config": to_dict(cfg), "prompt_ids": list(bank.image_ids),
                       "prompts": encoded.to_payload() if encoded is not None else None}, path)
    _write_json(out_dir / "recover_history.json", result.history)
    return path


# -- stage: discriminate net --------------------------------------------------------------------
@torch.inference_mode()
def _features_for_training(detector: Detector, images: torch.Tensor, prompt_index: torch.Tensor,
                           device: torch.device, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """F_X and R_Y of every training image, computed once: the backbone and recover net are frozen."""
    reference, recovered = [], []
    for begin in range(0, images.shape[0], batch_size):
        x = images[begin:begin + batch_size].to(device)
        index = prompt_index[begin:begin + batch_size].to(device)
        reference.append([f.cpu() for f in detector.backbone(x).features])
        y = detector.recover_image(x, index)
        recovered.append([f.cpu() for f in detector.backbone(y).features])
    levels = len(reference[0])
    return ([torch.cat([r[i] for r in reference]) for i in range(levels)],
            [torch.cat([r[i] for r in recovered]) for i in range(levels)])


def calibrate_threshold(detector: Detector, images: torch.Tensor, cfg: RediConfig) -> dict[str, float]:
    """Decision threshold from held-out normal images only (never from test labels)."""
    if images.shape[0] == 0:
        raise DatasetError("no held-out normal images to calibrate the threshold on; "
                           "raise data.val_fraction or add images to train/good")
    scores = score_images(detector, images, cfg.eval.batch_size)["scores"]
    quantile = float(torch.quantile(scores, cfg.eval.threshold_quantile))
    threshold = quantile * cfg.eval.threshold_margin
    detector.threshold.fill_(threshold)
    return {"threshold": threshold, "val_score_mean": float(scores.mean()), "val_score_max": float(scores.max()),
            "n_val": int(images.shape[0])}


def _recover_identity(recover_path: str | Path) -> str:
    """The recover run that made ``recover.pt`` (its run id and epochs), independent of file paths."""
    payload = load_torch_file(recover_path, "recover net file", "rerun the recover stage (redi train)")
    return f"{payload.get('run_id', '')}:{len(payload.get('history', []))}"


def served_prompts(recover_path: str | Path, bank: PromptBank, images: torch.Tensor) -> PromptImages:
    """The encoded prompt images the recover net in ``recover_path`` was trained on.

    A recover.pt from before compressed prompts has none: its net trained on the uint8-rounded
    images, which lossless PNG reproduces exactly.
    """
    payload = load_torch_file(recover_path, "recover net file", "rerun the recover stage (redi train)")
    if payload.get("prompts") is None:
        _log("discriminate", f"{recover_path} carries no encoded prompts (older recover stage); storing the "
                             f"bank losslessly (PNG), as that net was trained on")
        return PromptImages.encode(images, codec="png")
    if list(payload.get("prompt_ids", [])) != list(bank.image_ids):
        raise WeightsError(f"{recover_path} was trained with another prompt bank than the one given here "
                           f"({len(bank)} images); rerun the recover stage with this prompt bank")
    return PromptImages.from_payload(payload["prompts"])


def _with_resolved_precision(cfg: RediConfig, device: torch.device) -> RediConfig:
    """The config with ``model.recover.precision=auto`` resolved to what this machine measured.

    The detector is calibrated and saved with that explicit precision, so wherever it runs its
    scores are made the way its threshold was set (bf16 and fp32 scores differ by about 1e-2).
    """
    if cfg.model.recover.precision != "auto":
        return cfg
    resolved = copy.deepcopy(cfg)
    resolved.model.recover.precision = "bf16" if use_bf16("auto", device) else "fp32"
    _log("discriminate", f"recover net precision: {resolved.model.recover.precision} (measured on this machine)")
    return resolved


def train_discriminate(data_root: str | Path, bank_path: str | Path, recover_path: str | Path,
                       out_dir: str | Path, cfg: RediConfig, line: str = "") -> Path:
    """Train the FRB with the recover net frozen, calibrate the threshold, write ``detector.pt``."""
    out_dir = Path(out_dir)
    seed_everything(cfg.train.seed)
    device = pick_device(cfg.train.device)
    category = open_line(data_root, cfg)
    bank = PromptBank.load(bank_path, backbone=cfg.model.backbone)
    samples, images = _bank_images(bank, category, cfg)
    cfg = _with_resolved_precision(cfg, device)
    detector = Detector(cfg, num_prompts=len(bank))
    encoded = served_prompts(recover_path, bank, images) if detector.needs_prompt_images else None
    detector.set_prompts(bank.embeddings, images, bank.image_ids, encoded)
    if detector.use_recover:
        load_module_weights(detector.recover, recover_path, "recover")
    detector = detector.to(device)
    detector.eval()
    prompt_index = (leave_one_out_prompts(bank) if detector.use_prompt
                    else torch.full((len(bank),), -1, dtype=torch.long))
    started = time.perf_counter()
    reference, recovered = _features_for_training(detector, images, prompt_index, device, cfg.eval.batch_size)
    _log("discriminate", f"features of {len(samples)} images in {time.perf_counter() - started:.1f} s")
    history: list[dict[str, float]] = []
    if cfg.model.use_frb:
        head = detector.head

        def step(indices: torch.Tensor):
            fx = [f[indices].to(device) for f in reference]
            fy = head([f[indices].to(device) for f in recovered])
            return discriminate_loss(fx, fy, cfg.train.lambda_s, cfg.train.use_self_correlation)

        run_id = fingerprint({"recover": _recover_identity(recover_path) if detector.use_recover else "off",
                              "model": to_dict(cfg.model), "train": to_dict(cfg.train.discriminate),
                              "lambda_s": cfg.train.lambda_s, "ls": cfg.train.use_self_correlation,
                              "amp": cfg.train.amp, "seed": cfg.train.seed, "size": cfg.data.image_size,
                              "bank": _bank_fingerprint(bank)})
        result = run_training("discriminate", head, cfg.train.discriminate, len(samples), step,
                              out_dir / "checkpoints" / "discriminate_last.pt", run_id, cfg.train.seed, device,
                              cfg.train.amp)
        history = result.history
    detector.eval()
    # The held-out normals are exactly the training images that are not in the bank.
    in_bank = set(bank.image_ids)
    val = [s for s in category.train if s.image_id not in in_bank]
    calibration = calibrate_threshold(detector, load_images(val, cfg.data.image_size), cfg)
    _log("discriminate", f"threshold {calibration['threshold']:.4f} from {calibration['n_val']} held-out normals")
    _write_json(out_dir / "discriminate_history.json", history)
    meta = {"line": line or category.name, "calibration": calibration, "n_train": len(samples),
            "version": time.strftime("%Y%m%d-%H%M%S")}
    return save_detector(detector.cpu(), out_dir / "detector.pt", meta)


# -- inference helpers and the evaluation stage -------------------------------------------------
def score_images(detector: Detector, images: torch.Tensor, batch_size: int = 8, keep_maps: bool = False,
                 keep_recovered: bool = False, show_progress: bool = False) -> dict[str, Any]:
    """Run the detector over a stack of images in batches; scores always, maps on request."""
    scores, maps, recovered, prompts = [], [], [], []
    batches = range(0, images.shape[0], batch_size)
    if show_progress:
        batches = progress(batches, len(batches), "[predict] batch")
    for begin in batches:
        out = detector.predict(images[begin:begin + batch_size])
        scores.append(out.score.float().cpu())
        prompts.append(out.prompt_index.cpu())
        if keep_maps:
            maps.append(out.anomaly_map.float().cpu())
        if keep_recovered:
            recovered.append(out.recovered.float().cpu())
    result: dict[str, Any] = {"scores": torch.cat(scores), "prompt_index": torch.cat(prompts)}
    if keep_maps:
        result["maps"] = torch.cat(maps)
    if keep_recovered:
        result["recovered"] = torch.cat(recovered)
    return result


def _mean_or_none(flags: torch.Tensor) -> float | None:
    """Mean of boolean flags; None (JSON null, never NaN) for an empty set."""
    return float(flags.float().mean()) if flags.numel() else None


def evaluate(detector_path: str | Path, data_root: str | Path, out_dir: str | Path, cfg: RediConfig,
             write_report: bool = True) -> Path:
    """Score the test split; write ``metrics.json`` and the HTML report folder."""
    from redi.report import write_report as render_report  # matplotlib only when reporting

    out_dir = Path(out_dir)
    device = pick_device(cfg.train.device)
    detector = load_detector(detector_path, device)
    category = open_line(data_root, cfg)
    category.require_test()
    test = category.test
    size = detector.image_size
    images = load_images(test, size)
    masks = load_masks(test, size)[:, 0].bool()
    started = time.perf_counter()
    result = score_images(detector, images, cfg.eval.batch_size, keep_maps=True, keep_recovered=write_report,
                          show_progress=True)
    seconds = time.perf_counter() - started
    labels = torch.tensor([s.label for s in test])
    has_masks = any(s.mask_path is not None for s in test)
    metrics = compute_all(labels.numpy(), result["scores"].numpy(),
                          masks.numpy() if has_masks else None, result["maps"].numpy() if has_masks else None,
                          max_fpr=cfg.eval.max_fpr)
    decisions = detector.is_anomalous(result["scores"])
    metrics.update({
        "threshold": float(detector.threshold),
        "accuracy_at_threshold": float((decisions.long() == labels).float().mean()),
        "recall_at_threshold": _mean_or_none(decisions[labels == 1]),
        "false_alarm_rate_at_threshold": _mean_or_none(decisions[labels == 0]),
        "profile": detector.metadata.get("profile"), "backbone": detector.metadata.get("backbone"),
        "model_version": detector.metadata.get("version"), "line": detector.metadata.get("line"),
        "data_root": str(category.root), "seconds_per_image": seconds / max(len(test), 1), "device": str(device),
    })
    out_dir.mkdir(parents=True, exist_ok=True)
    per_image = [{"image_id": s.image_id, "defect_type": s.defect_type, "label": s.label,
                  "score": float(score), "anomalous": bool(d)}
                 for s, score, d in zip(test, result["scores"], decisions)]
    _write_json(out_dir / "scores.json", per_image)
    if write_report:
        render_report(out_dir / "report", detector, test, images, masks, result, metrics)
    _log("evaluate", " ".join(f"{k} {metrics[k]:.4f}" for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")
                              if metrics.get(k) is not None))
    return _write_json(out_dir / "metrics.json", metrics)


# -- everything at once -------------------------------------------------------------------------
def train_all(data_root: str | Path, out_dir: str | Path, cfg: RediConfig, line: str = "") -> dict[str, Path]:
    """Run every training stage in order into one folder (what ``redi train`` does)."""
    out_dir = Path(out_dir)
    save_config(cfg, out_dir / "config.yaml")
    paths: dict[str, Path] = {"manifest": validate_data(data_root, out_dir, cfg)}
    paths["selfmaps"] = precompute_selfmaps(data_root, out_dir, cfg)
    paths["prompt_bank"] = build_prompt_bank(data_root, out_dir / "prompt_bank.pt", cfg)
    paths["recover"] = train_recover(data_root, paths["prompt_bank"], out_dir, cfg, paths["selfmaps"])
    paths["detector"] = train_discriminate(data_root, paths["prompt_bank"], paths["recover"], out_dir, cfg, line)
    return paths


def require_file(path: str | Path, what: str, hint: str) -> Path:
    """A clear error for a missing input file of a stage."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} {path} does not exist; {hint}")
    return path
