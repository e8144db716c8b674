"""ReDi's fitting, one function per pipeline stage (files in, files out): self-maps, prompt bank,
recover net, discriminate net (which also calibrates the threshold and writes ``detector.pt``).

The CLI, the Kubeflow components, the DVC stages and the tests call these through the stage
table (:mod:`redi.stages`); :func:`fit` runs them all in order (:meth:`ReDi.fit`).
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from redi.core.backbones import build_backbone
from redi.core.config import RediConfig, to_dict
from redi.core.errors import DatasetError, WeightsError
from redi.core.selfmaps import build_selfmap, fit_selfmap_scale
from redi.core.utils import atomic_torch_save, bf16_autocast, load_torch_file, pick_device, seed_everything, use_bf16
from redi.data.dataset import load_images
from redi.data.mvtec import MVTecCategory, Sample
from redi.methods.base import save_detector
from redi.methods.common import calibrate_threshold, line_config, log_stage, open_line, training_split, write_json
from redi.methods.redi.detector import Detector, load_module_weights
from redi.methods.redi.losses import discriminate_loss, recover_loss
from redi.methods.redi.prompt import PromptBank, PromptImages, bank_transforms, prompt_pixels, transform_images
from redi.methods.redi.recover import RecoverNet
from redi.methods.training import fingerprint, run_training


# -- stage: self-generated maps -----------------------------------------------------------------
def line_selfmap(images: torch.Tensor, cfg: RediConfig, device: torch.device,
                 scale: float | None = None) -> torch.nn.Module:
    """The configured self-map module on ``device``, its line scale fitted on ``images`` (the
    bank's) or set to ``scale`` when one was fitted before."""
    selfmap = build_selfmap(cfg.model.selfmap).to(device)
    if cfg.model.selfmap.scale == "line":
        if scale is None:
            fit_selfmap_scale(selfmap, images, cfg.model.selfmap.scale_percentile)
        else:
            selfmap.set_scale(scale)
    return selfmap


def selfmap_scale_of(selfmap: torch.nn.Module) -> float | None:
    """The fitted line scale of a self-map module (None when it scales per image or has none)."""
    if getattr(selfmap, "mode", None) != "line":
        return None
    return float(selfmap.scale)


@torch.inference_mode()
def compute_selfmaps(images: torch.Tensor, selfmap: torch.nn.Module, device: torch.device,
                     batch_size: int = 16) -> torch.Tensor:
    """Self-maps (N, 1, H, W) of a stack of images, batched on the device."""
    chunks = [selfmap(images[i:i + batch_size].to(device)).cpu() for i in range(0, images.shape[0], batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, 1, *images.shape[-2:])


def precompute_selfmaps(data_root: str | Path, out_dir: str | Path, cfg: RediConfig) -> Path:
    """Fit the line's self-map scale on the bank images and cache their maps in ``selfmaps.pt``
    (keyed by image id and config)."""
    device = pick_device(cfg.train.device)
    category = open_line(data_root, cfg)
    cfg = line_config(category, cfg)
    train, _ = training_split(category, cfg)
    started = time.perf_counter()
    images = load_images(train, cfg.data.input_hw(), cfg.data.aspect)
    selfmap = line_selfmap(images, cfg, device)
    maps = compute_selfmaps(images, selfmap, device)
    path = Path(out_dir) / "selfmaps.pt"
    atomic_torch_save({"image_ids": [s.image_id for s in train], "maps": maps.half(), "key": _selfmap_key(cfg),
                       "scale": selfmap_scale_of(selfmap)}, path)
    scale = selfmap_scale_of(selfmap)
    log_stage("selfmaps", f"{len(train)} {cfg.model.selfmap.kind} maps"
                     f"{f', line scale {scale:.4g}' if scale is not None else ''} in "
                     f"{time.perf_counter() - started:.1f} s -> {path}")
    return path


def _selfmap_key(cfg: RediConfig) -> str:
    return fingerprint({"selfmap": to_dict(cfg.model.selfmap), "size": [cfg.data.image_size, cfg.data.aspect, *cfg.data.canvas]})


def _load_or_compute_selfmaps(path: str | Path | None, train: list[Sample], images: torch.Tensor,
                              cfg: RediConfig, device: torch.device) -> tuple[torch.Tensor, torch.nn.Module]:
    """(maps of the bank images, the self-map module with the line's scale) from the cache or fresh."""
    if path and Path(path).is_file():
        try:
            cached = load_torch_file(path, "self-map cache", "it is recomputed")
        except WeightsError as exc:  # a damaged cache is recomputed, never fatal
            log_stage("recover", f"{exc}")
            cached = {}
        if (isinstance(cached, dict) and cached.get("key") == _selfmap_key(cfg)
                and cached.get("image_ids") == [s.image_id for s in train]
                and (cfg.model.selfmap.scale != "line" or cached.get("scale"))):
            return cached["maps"].float(), line_selfmap(images, cfg, device, cached.get("scale"))
        log_stage("recover", f"self-map cache {path} is for other settings or images; recomputing")
    selfmap = line_selfmap(images, cfg, device)
    return compute_selfmaps(images, selfmap, device), selfmap


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
    cfg = line_config(category, cfg)
    train, _ = training_split(category, cfg)
    backbone = build_backbone(cfg.model.backbone, cfg.model.backbone_weights or None)
    images = load_images(train, cfg.data.input_hw(), cfg.data.aspect)
    # transform-major: row t * N + i is image i under transform t (identity first)
    embeddings = torch.cat([embed_images(backbone, transform_images(images, name), device, cfg.eval.batch_size)
                            for name in bank_transforms(cfg.model.prompt_transforms)])
    bank = PromptBank(embeddings, [s.image_id for s in train], cfg.model.backbone, list(cfg.model.prompt_transforms))
    log_stage("prompt-bank", f"{len(bank)} images x {1 + len(bank.transforms)} transforms, {embeddings.shape[1]}-d "
                        f"{cfg.model.backbone} embeddings -> {out_path}")
    return bank.save(out_path)


def _bank_images(bank: PromptBank, category: MVTecCategory, cfg: RediConfig) -> tuple[list[Sample], torch.Tensor]:
    by_id = {s.image_id: s for s in category.train}
    missing = [i for i in bank.image_ids if i not in by_id]
    if missing:
        raise DatasetError(f"the prompt bank names images that are not in {category.root}: {missing[:3]}; "
                           f"rebuild the prompt bank for this dataset revision")
    samples = [by_id[i] for i in bank.image_ids]
    return samples, load_images(samples, cfg.data.input_hw(), cfg.data.aspect)


def leave_one_out_prompts(bank: PromptBank) -> torch.Tensor:
    """Each bank image's prompt at training time: its nearest other bank image (any transform of
    itself excluded), as an index into the (augmented) bank."""
    own = torch.arange(len(bank))
    return bank.nearest(bank.embeddings[:len(bank)], exclude=own)[0]


def load_bank(path: str | Path, cfg: RediConfig) -> PromptBank:
    """The prompt bank at ``path``, refused when it was built for another backbone or transforms."""
    bank = PromptBank.load(path, backbone=cfg.model.backbone)
    if bank.transforms != list(cfg.model.prompt_transforms):
        raise WeightsError(f"prompt bank {path} was built with transforms {bank.transforms}, but "
                           f"model.prompt_transforms is {cfg.model.prompt_transforms}; rebuild the bank")
    return bank


def bank_prompts(encoded: PromptImages, index: torch.Tensor, bank: PromptBank) -> torch.Tensor:
    """Float prompt images for (augmented) bank indices, decoded and transformed."""
    return prompt_pixels(encoded.decode_float, index, len(bank), bank_transforms(bank.transforms))


# -- stage: recover net -------------------------------------------------------------------------
def _bank_fingerprint(bank: PromptBank) -> str:
    """Changes when any bank image's pixels change (its embedding does), not only its id."""
    return hashlib.sha256(bank.embeddings.numpy().tobytes()).hexdigest()[:16] + str(bank.image_ids)


def _recover_run_id(cfg: RediConfig, bank: PromptBank, fold: int = -1) -> str:
    """What defines a recover run; nothing the recover net does not depend on (a map setting must
    not throw away a finished 500-epoch run). ``fold`` >= 0 names an out-of-fold net."""
    model, train = cfg.model, cfg.train
    return fingerprint({"backbone": [model.backbone, model.backbone_weights], "selfmap": to_dict(model.selfmap),
                        "prompt": model.prompt, "recover": to_dict(model.recover),
                        "train": to_dict(train.recover), "lambda_m": train.lambda_m,
                        "scales": train.msgms_scales, "flip": train.augment_flip, "rot90": train.augment_rot90,
                        "select": train.recover_select, "amp": train.amp,
                        "seed": train.seed, "size": [cfg.data.image_size, cfg.data.aspect, *cfg.data.canvas],
                        "bank": _bank_fingerprint(bank),
                        "prompt_codec": [model.prompt_codec, model.prompt_quality], "fold": fold,
                        "folds": train.recover_folds if fold >= 0 else 0})


def recover_folds(num_images: int, folds: int, seed: int) -> list[list[int]]:
    """Bank positions split into ``folds`` disjoint, near-equal folds (seeded, deterministic)."""
    if folds > num_images:
        raise DatasetError(f"train.recover_folds={folds} needs at least {folds} bank images; the bank has "
                           f"{num_images}. Lower train.recover_folds (or 0 for off)")
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    return [sorted(order[f::folds]) for f in range(folds)]


@dataclass
class _RecoverData:
    """What the recover net trains on: bank images, their self-maps and prompts (all aligned)."""

    images: torch.Tensor
    maps: torch.Tensor
    prompts: torch.Tensor


def _augment(x: torch.Tensor, h: torch.Tensor, p: torch.Tensor, flip: bool, rot90: bool):
    """The same random flip / quarter turn on an image, its map and its prompt."""
    if flip and torch.rand(()) < 0.5:
        x, h, p = x.flip(-1), h.flip(-1), p.flip(-1)
    if rot90 and x.shape[-1] == x.shape[-2]:
        turns = int(torch.randint(0, 4, ()))
        if turns:
            x, h, p = (t.rot90(turns, dims=(-2, -1)) for t in (x, h, p))
    return x, h, p


def _train_one_recover_net(name: str, cfg: RediConfig, data: _RecoverData, subset: torch.Tensor,
                           val: _RecoverData | None, checkpoint: Path, run_id: str,
                           device: torch.device) -> tuple[RecoverNet, list[dict[str, float]]]:
    """Train one HIP net on the bank positions in ``subset``; with ``val`` (held-out normals) its
    L_Rec is logged per pass and, with ``train.recover_select=best_val``, the best pass is kept."""
    model_cfg, train = cfg.model, cfg.train
    net = RecoverNet(1, model_cfg.recover.base_width, model_cfg.recover.depth, model_cfg.recover.input_size,
                     model_cfg.recover.fused_skips).to(device)
    bf16 = use_bf16(model_cfg.recover.precision, device)

    def step(indices: torch.Tensor):
        rows = subset[indices]
        x, h, p = (t[rows].to(device) for t in (data.images, data.maps, data.prompts))
        x, h, p = _augment(x, h, p, train.augment_flip, train.augment_rot90)
        with bf16_autocast(bf16, device):  # the net in bf16 where fast; the loss always in fp32
            y = net(h, p)
        return recover_loss(x, y.float(), train.lambda_m, train.msgms_scales), {}

    @torch.no_grad()
    def held_out_loss() -> float:
        total = 0.0
        for begin in range(0, val.images.shape[0], cfg.eval.batch_size):
            x, h, p = (t[begin:begin + cfg.eval.batch_size].to(device) for t in (val.images, val.maps, val.prompts))
            with bf16_autocast(bf16, device):
                y = net(h, p)
            total += float(recover_loss(x, y.float(), train.lambda_m, train.msgms_scales)) * x.shape[0]
        return total / val.images.shape[0]

    # amp=False: the net has its own precision switch, and the loss must stay in fp32
    result = run_training(name, net, train.recover, len(subset), step, checkpoint, run_id, train.seed, device,
                          amp=False, validate=held_out_loss if val is not None else None,
                          keep_best=train.recover_select == "best_val")
    return net.cpu(), result.history


def _held_out_recover_data(category: MVTecCategory, bank: PromptBank, encoded: PromptImages | None,
                           selfmap: torch.nn.Module, cfg: RediConfig, device: torch.device) -> _RecoverData | None:
    """The held-out normals (not in the bank) with their self-maps and nearest bank prompts, for
    the held-out L_Rec; None when there are none."""
    in_bank = set(bank.image_ids)
    held_out = [s for s in category.train if s.image_id not in in_bank]
    if not held_out:
        return None
    images = load_images(held_out, cfg.data.input_hw(), cfg.data.aspect)
    maps = compute_selfmaps(images, selfmap, device)
    if encoded is None:
        return _RecoverData(images, maps, torch.zeros_like(images))
    backbone = build_backbone(cfg.model.backbone, cfg.model.backbone_weights or None)
    nearest = bank.nearest(embed_images(backbone, images, device, cfg.eval.batch_size))[0]
    return _RecoverData(images, maps, bank_prompts(encoded, nearest.cpu(), bank))


def train_recover(data_root: str | Path, bank_path: str | Path, out_dir: str | Path, cfg: RediConfig,
                  selfmaps_path: str | Path | None = None) -> Path:
    """Train HIP to recover each training image from its self-map and prompt; write ``recover.pt``.

    With ``train.recover_folds`` = k >= 2 it also trains k out-of-fold nets, each without one fold
    of the bank, so the discriminate stage can learn from recoveries of images their net never saw
    (as test images are); ``recover.pt`` then carries the folds and the fold nets' weights.
    """
    out_dir = Path(out_dir)
    path = out_dir / "recover.pt"
    model_cfg, train = cfg.model, cfg.train
    if not model_cfg.recover.enabled:
        atomic_torch_save({"enabled": False}, path)
        log_stage("recover", "recover net disabled (model.recover.enabled=false): Y = X")
        return path
    seed_everything(train.seed)
    device = pick_device(train.device)
    category = open_line(data_root, cfg)
    cfg = line_config(category, cfg)
    bank = load_bank(bank_path, cfg)
    samples, images = _bank_images(bank, category, cfg)
    maps, selfmap = _load_or_compute_selfmaps(selfmaps_path, samples, images, cfg, device)
    # The bank is encoded once; the net trains on the decoded prompts, and recover.pt hands the
    # same bytes to the detector, so it serves exactly the prompts it was trained on.
    encoded = (PromptImages.encode(images, model_cfg.prompt_codec, model_cfg.prompt_quality)
               if model_cfg.prompt == "nearest" else None)
    prompts = (bank_prompts(encoded, leave_one_out_prompts(bank), bank) if encoded is not None
               else torch.zeros_like(images))
    data = _RecoverData(images, maps, prompts)
    val = (_held_out_recover_data(category, bank, encoded, selfmap, cfg, device)
           if train.recover_select == "best_val" else None)
    if train.recover_select == "best_val" and val is None:
        raise DatasetError("train.recover_select=best_val needs held-out normal images; raise data.val_fraction")
    bf16 = use_bf16(model_cfg.recover.precision, device)
    folds = recover_folds(len(samples), train.recover_folds, train.seed) if train.recover_folds else []
    log_stage("recover", f"{len(samples)} images, {_budget_text(train.recover)}, device {device}, "
                    f"{'bf16' if bf16 else 'fp32'}, profile {cfg.profile}"
                    f"{f', {len(folds)} out-of-fold nets + the served net' if folds else ''}")
    checkpoints = out_dir / "checkpoints"
    fold_states = []
    for number, fold in enumerate(folds):
        excluded = set(fold)
        keep = torch.tensor([i for i in range(len(samples)) if i not in excluded])
        net, _ = _train_one_recover_net(f"recover fold {number + 1}/{len(folds)}", cfg, data, keep, val,
                                        checkpoints / f"recover_fold{number}_last.pt",
                                        _recover_run_id(cfg, bank, number), device)
        fold_states.append(net.state_dict())
    run_id = _recover_run_id(cfg, bank)
    net, history = _train_one_recover_net("recover", cfg, data, torch.arange(len(samples)), val,
                                          checkpoints / "recover_last.pt", run_id, device)
    atomic_torch_save({"enabled": True, "state": net.state_dict(), "history": history,
                       "run_id": run_id, "config": to_dict(cfg), "prompt_ids": list(bank.image_ids),
                       "prompts": encoded.to_payload() if encoded is not None else None,
                       "selfmap_scale": selfmap_scale_of(selfmap),
                       "folds": folds, "fold_states": fold_states}, path)
    write_json(out_dir / "recover_history.json", history)
    return path


def _budget_text(stage) -> str:
    """'240 steps' or '40 epochs': how a stage's budget reads in logs."""
    return f"{stage.steps} steps" if stage.steps else f"{stage.epochs} epochs"


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


def _out_of_fold_features(detector: Detector, recover_path: str | Path, images: torch.Tensor,
                          prompt_index: torch.Tensor, device: torch.device,
                          batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """F_X and R_Y where each image's Y comes from the fold net that never trained on it.

    Without folds in ``recover_path`` (or with the recover net off) every Y comes from the served net.
    """
    payload = load_torch_file(recover_path, "recover net file", "rerun the recover stage") if detector.use_recover else {}
    folds = payload.get("folds") or []
    if not folds:
        return _features_for_training(detector, images, prompt_index, device, batch_size)
    served = {k: v.clone() for k, v in detector.recover.state_dict().items()}
    reference: list[torch.Tensor] = []
    recovered: list[torch.Tensor] = []
    order = torch.tensor([i for fold in folds for i in fold])
    for fold, state in zip(folds, payload["fold_states"]):
        detector.recover.load_state_dict(state)
        rows = torch.tensor(fold)
        fx, ry = _features_for_training(detector, images[rows], prompt_index[rows], device, batch_size)
        reference.append(fx)
        recovered.append(ry)
    detector.recover.load_state_dict(served)
    back = torch.argsort(order)  # from fold order back to bank order
    levels = len(reference[0])
    return ([torch.cat([r[i] for r in reference])[back] for i in range(levels)],
            [torch.cat([r[i] for r in recovered])[back] for i in range(levels)])


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
        log_stage("discriminate", f"{recover_path} carries no encoded prompts (older recover stage); storing the "
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
    log_stage("discriminate", f"recover net precision: {resolved.model.recover.precision} (measured on this machine)")
    return resolved


def _set_selfmap_scale(detector: Detector, recover_path: str | Path) -> None:
    """Give the detector's self-map the line scale its recover net was trained with."""
    if detector.cfg.model.selfmap.scale != "line":
        return
    payload = load_torch_file(recover_path, "recover net file", "rerun the recover stage (redi train)")
    scale = payload.get("selfmap_scale")
    if scale is None:
        raise WeightsError(f"{recover_path} carries no self-map scale but model.selfmap.scale=line; rerun the "
                           f"recover stage with this redi (or set model.selfmap.scale=image for that net)")
    detector.selfmap.set_scale(scale)


def train_discriminate(data_root: str | Path, bank_path: str | Path, recover_path: str | Path,
                       out_dir: str | Path, cfg: RediConfig, line: str = "") -> Path:
    """Train the FRB with the recover net frozen, calibrate the threshold, write ``detector.pt``."""
    out_dir = Path(out_dir)
    seed_everything(cfg.train.seed)
    device = pick_device(cfg.train.device)
    category = open_line(data_root, cfg)
    cfg = line_config(category, cfg)
    bank = load_bank(bank_path, cfg)
    samples, images = _bank_images(bank, category, cfg)
    cfg = _with_resolved_precision(cfg, device)
    detector = Detector(cfg, num_prompts=bank.embeddings.shape[0])
    encoded = served_prompts(recover_path, bank, images) if detector.needs_prompt_images else None
    detector.set_prompts(bank.embeddings, images, bank.image_ids, encoded)
    if detector.use_recover:
        load_module_weights(detector.recover, recover_path, "recover")
        _set_selfmap_scale(detector, recover_path)
    detector = detector.to(device)
    detector.eval()
    prompt_index = (leave_one_out_prompts(bank) if detector.use_prompt
                    else torch.full((len(bank),), -1, dtype=torch.long))
    started = time.perf_counter()
    reference, recovered = _out_of_fold_features(detector, recover_path, images, prompt_index, device,
                                                 cfg.eval.batch_size)
    log_stage("discriminate", f"features of {len(samples)} images in {time.perf_counter() - started:.1f} s")
    history: list[dict[str, float]] = []
    if cfg.model.use_frb:
        head = detector.head

        def step(indices: torch.Tensor):
            fx = [f[indices].to(device) for f in reference]
            fy = head([noisy_box(f[indices].to(device), cfg.train.feature_noise) for f in recovered])
            return discriminate_loss(fx, fy, cfg.train.lambda_s, cfg.train.use_self_correlation,
                                     cfg.train.ls_normalisation)

        run_id = fingerprint({"recover": _recover_identity(recover_path) if detector.use_recover else "off",
                              "model": to_dict(cfg.model), "train": to_dict(cfg.train.discriminate),
                              "lambda_s": cfg.train.lambda_s, "ls": cfg.train.use_self_correlation,
                              "ls_norm": cfg.train.ls_normalisation, "feature_noise": cfg.train.feature_noise,
                              "amp": cfg.train.amp, "seed": cfg.train.seed,
                              "size": [cfg.data.image_size, cfg.data.aspect, *cfg.data.canvas],
                              "bank": _bank_fingerprint(bank)})
        result = run_training("discriminate", head, cfg.train.discriminate, len(samples), step,
                              out_dir / "checkpoints" / "discriminate_last.pt", run_id, cfg.train.seed, device,
                              cfg.train.amp)
        history = result.history
    detector.eval()
    # The held-out normals are exactly the training images that are not in the bank.
    in_bank = set(bank.image_ids)
    val = [s for s in category.train if s.image_id not in in_bank]
    calibration = calibrate_threshold(detector, load_images(val, cfg.data.input_hw(), cfg.data.aspect), cfg,
                                      normals=[s for s in category.train if s.label == 0])
    log_stage("discriminate", f"threshold {calibration['threshold']:.4f} ({cfg.eval.threshold_policy} policy, false-call "
                         f"target {cfg.eval.false_call_target:.1%}) from {calibration['n_val']} held-out normals")
    write_json(out_dir / "discriminate_history.json", history)
    meta = {"line": line or category.name, "calibration": calibration, "n_train": len(samples),
            "version": time.strftime("%Y%m%d-%H%M%S")}
    return save_detector(detector.cpu(), out_dir / "detector.pt", meta)


def noisy_box(features: torch.Tensor, level: float) -> torch.Tensor:
    """Features (B, C, H, W) with Gaussian noise of ``level`` times their standard deviation inside
    one random box per image (each side 10-50 % of the map's); ``level`` 0 returns them as they are."""
    if level <= 0:
        return features
    batch, _, height, width = features.shape
    box = torch.zeros(batch, 1, height, width, device=features.device, dtype=features.dtype)
    for i in range(batch):
        h = max(1, int(height * float(torch.empty(()).uniform_(0.1, 0.5))))
        w = max(1, int(width * float(torch.empty(()).uniform_(0.1, 0.5))))
        top, left = int(torch.randint(0, height - h + 1, ())), int(torch.randint(0, width - w + 1, ()))
        box[i, :, top:top + h, left:left + w] = 1
    return features + box * torch.randn_like(features) * (level * features.detach().std())


def fit(data_root: str | Path, out_dir: str | Path, cfg: RediConfig, line: str = "") -> dict[str, Path]:
    """Every ReDi stage in order into one folder: self-maps, prompt bank, recover, discriminate."""
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {"selfmaps": precompute_selfmaps(data_root, out_dir, cfg)}
    paths["prompt_bank"] = build_prompt_bank(data_root, out_dir / "prompt_bank.pt", cfg)
    paths["recover"] = train_recover(data_root, paths["prompt_bank"], out_dir, cfg, paths["selfmaps"])
    paths["detector"] = train_discriminate(data_root, paths["prompt_bank"], paths["recover"], out_dir, cfg, line)
    return paths
