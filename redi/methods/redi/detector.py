"""The ReDi detector: one ``nn.Module`` from an image batch to scores and anomaly maps.

X -> backbone(X) gives the reference features F_X and the embedding that picks the prompt X+
(one backbone pass serves both) -> self-map H(X) -> recover net Y = HIP(H, X+) -> backbone(Y) =
R_Y -> FRB -> F_Y -> D = sum_k (1 - cos(F_X^k, F_Y^k)) upsampled, Gaussian-smoothed; score =
max D (paper Sec. 3.3). The module carries its prompt bank (embeddings, and the images compressed
when the recover net uses them), decision threshold and config, so one artifact file is the whole
model.

It is ReDi's face to the rest of redi: it meets :class:`redi.methods.base.AnomalyDetector`, and
its part of the artifact file is :meth:`Detector.to_payload` / :meth:`Detector.from_payload`.

Artifact versions: 1 stored every bank image as raw uint8 pixels in the state dict (217 MB for a
650-image line); 2 stores them compressed (:class:`redi.methods.redi.prompt.PromptImages`) and not at all when
no prompt is used. Version-1 files still load: their prompts are re-encoded losslessly (PNG), so
the scores are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from redi.core.backbones import build_backbone
from redi.core.config import RediConfig
from redi.core.errors import InputError, WeightsError
from redi.core.images import preprocess
from redi.core.maps import GaussianBlur, image_scores
from redi.core.selfmaps import build_selfmap, fit_selfmap_scale
from redi.core.utils import bf16_autocast, load_torch_file, use_bf16
from redi.methods.base import DetectorOutput
from redi.methods.redi.discriminate import DiscriminateHead
from redi.methods.redi.prompt import PROMPT_CODEC, PROMPT_QUALITY, PromptImages, bank_transforms, prompt_pixels, top_prompts
from redi.methods.redi.recover import RecoverNet


@dataclass
class RediOutput(DetectorOutput):
    """ReDi's output: the protocol's (score from the map by ``model.image_score``, map, embedding of X)
    and its own."""

    recovered: torch.Tensor | None = None  # (B, 3, H, W) the recovered image Y
    prompt_index: torch.Tensor | None = None  # (B,) index into the prompt bank, -1 when no prompt is used


class Detector(nn.Module):
    """ReDi inference module; see the module docstring for the data flow."""

    method = "redi"

    def __init__(self, cfg: RediConfig, num_prompts: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_size = cfg.data.image_size
        self.input_hw = cfg.data.input_hw()  # (H, W): (S, S), or the line's canvas for data.aspect=native
        model = cfg.model
        self.backbone = build_backbone(model.backbone, model.backbone_weights or None)
        self.use_recover = model.recover.enabled
        self.use_prompt = model.prompt == "nearest"
        self.transforms = bank_transforms(model.prompt_transforms)  # of the augmented bank, identity first
        # k nearest prompts only matter where a prompt is recovered from
        self.prompt_k = model.prompt_k if (self.use_recover and self.use_prompt) else 1
        self.selfmap = build_selfmap(model.selfmap) if self.use_recover else None
        self.recover = (RecoverNet(selfmap_channels=1, base_width=model.recover.base_width, depth=model.recover.depth,
                                   work_size=model.recover.input_size, fused_skips=model.recover.fused_skips)
                        if self.use_recover else None)
        bottleneck = model.bottleneck_channels or round(model.bottleneck_ratio * self.backbone.channels[-1])
        self.head = DiscriminateHead(tuple(self.backbone.channels), bottleneck, model.use_frb, model.bottleneck_dropout)
        self.blur = GaussianBlur(model.gaussian_sigma)
        self.register_buffer("prompt_embeddings", torch.zeros(num_prompts, self.backbone.embedding_dim))
        # Not a buffer: compressed bytes on the CPU, decoded per batch (see redi.methods.redi.prompt.PromptImages)
        self.prompts = PromptImages.empty(self.input_hw)
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.prompt_ids: list[str] = []
        self.metadata: dict[str, Any] = {}

    @property
    def fit_image_ids(self) -> list[str]:
        """The training images the model was fitted on: its prompt bank (the held-out normals
        that set the threshold are the other training images)."""
        return list(self.prompt_ids)

    # -- the prompt bank -------------------------------------------------------------------
    @property
    def needs_prompt_images(self) -> bool:
        """Whether inference ever looks at a prompt image (recover net on and prompt=nearest)."""
        return self.use_recover and self.use_prompt

    @property
    def prompt_images(self) -> PromptImages:
        """The bank's images (compressed; ``[i]`` decodes one to uint8 (3, H, W))."""
        return self.prompts

    def set_prompts(self, embeddings: torch.Tensor, images: torch.Tensor | None, image_ids: Sequence[str],
                    prompts: PromptImages | None = None) -> None:
        """Install the prompt bank: embeddings (N, D, normalised here) and either float images
        (N, 3, H, W) in [0, 1], compressed with the default codec, or ``prompts`` already encoded
        (the exact bytes the recover net was trained on). The images are kept only when inference
        uses them (:attr:`needs_prompt_images`)."""
        count = len(image_ids)
        if embeddings.shape[0] != count * len(self.transforms):
            raise ValueError(f"{embeddings.shape[0]} prompt embeddings for {count} image ids and "
                             f"{len(self.transforms)} transforms")
        self.prompt_embeddings = F.normalize(embeddings.float(), dim=1).to(self.prompt_embeddings.device)
        self.prompt_ids = list(image_ids)
        if images is not None and self._selfmap_unfitted():  # the line scale comes from the bank's images
            fit_selfmap_scale(self.selfmap, images, self.cfg.model.selfmap.scale_percentile)
        if not self.needs_prompt_images:
            self.prompts = PromptImages.empty(self.input_hw)
            return
        if prompts is None:
            if images is None:
                raise ValueError("set_prompts needs the prompt images (or encoded prompts) when the recover net uses them")
            prompts = PromptImages.encode(images, self.cfg.model.prompt_codec, self.cfg.model.prompt_quality)
        if len(prompts) != count or prompts.size != self.input_hw:
            raise WeightsError(f"{len(prompts)} prompt images of {prompts.size} px do not fit {count} embeddings at "
                               f"{self.input_hw} px; rebuild the prompt bank and retrain the recover net")
        self.prompts = prompts

    @property
    def bank_images(self) -> int:
        """N, the number of prompt bank images (the embeddings number N per transform)."""
        return self.prompt_embeddings.shape[0] // len(self.transforms)

    def select_prompts(self, embedding: torch.Tensor, exclude: torch.Tensor | None = None,
                       k: int = 1) -> torch.Tensor:
        """Bank index of each image's prompt, (B,) for k = 1 else (B, k) best first (-1 when prompts are off)."""
        if not self.use_prompt:
            shape = (embedding.shape[0],) if k == 1 else (embedding.shape[0], k)
            return torch.full(shape, -1, dtype=torch.long, device=embedding.device)
        if self.prompt_embeddings.shape[0] == 0:
            raise WeightsError("the detector has an empty prompt bank; train it with a prompt bank "
                               "or set model.prompt=none")
        indices = top_prompts(embedding, self.prompt_embeddings, k, exclude, period=self.bank_images)[0]
        return indices[:, 0] if k == 1 else indices

    def prompt_batch(self, indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Prompt images for the indices as floats in [0, 1]; zeros where the index is -1 ('Free')."""
        prompts = torch.zeros_like(like)
        valid = indices >= 0
        if valid.any():
            if len(self.prompts) == 0:
                raise WeightsError("the detector holds no prompt images but was asked for a prompt; retrain it")
            # only this batch's prompts are decoded, then turned as their bank entry says
            decoded = prompt_pixels(lambda base: self.prompts.decode_float(base.cpu(), like.dtype),
                                    indices[valid].cpu(), len(self.prompts), self.transforms)
            prompts[valid] = decoded.to(like.device)
        return prompts

    def _selfmap_unfitted(self) -> bool:
        scale = getattr(self.selfmap, "scale", None)
        return getattr(self.selfmap, "mode", None) == "line" and scale is not None and bool(torch.isnan(scale))

    # -- the two networks ------------------------------------------------------------------
    def recover_image(self, x: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        """Y = HIP(H(X), X+); with the recover net off, Y = X (the RD + L_S ablation)."""
        if not self.use_recover:
            return x
        selfmap, prompts = self.selfmap(x), self.prompt_batch(prompt_index, x)
        with bf16_autocast(use_bf16(self.cfg.model.recover.precision, x.device), x.device):
            return self.recover(selfmap, prompts).float()

    def anomaly_maps(self, reference: list[torch.Tensor], recovered: list[torch.Tensor]) -> torch.Tensor:
        """D = sum over levels of (1 - cos) resized to the input size, then smoothed: (B, H, W)."""
        size = self.input_hw
        total = None
        for fx, fy in zip(reference, recovered):
            distance = 1 - F.cosine_similarity(fx.float(), fy.float(), dim=1).unsqueeze(1)
            distance = F.interpolate(distance, size=size, mode="bilinear", align_corners=False)
            total = distance if total is None else total + distance
        return self.blur(total).squeeze(1)

    def image_score(self, maps: torch.Tensor) -> torch.Tensor:
        """(B,) image scores of the maps (``model.image_score``: the max, or the mean of the top pixels)."""
        return image_scores(maps, self.cfg.model.image_score, self.cfg.model.image_score_share)

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse tensors the detector was not built for, with a message that says what to do."""
        expected = (3, *self.input_hw)
        if not torch.is_tensor(x) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise InputError(f"the detector takes a (B, {expected[0]}, {expected[1]}, {expected[2]}) float batch in "
                             f"[0, 1], got {shape}; use Detector.preprocess() to convert and resize images")
        if not x.dtype.is_floating_point:
            raise InputError(f"the detector takes float images in [0, 1], got {x.dtype}; divide uint8 by 255")

    def forward(self, x: torch.Tensor, exclude: torch.Tensor | None = None) -> RediOutput:
        """Score a batch. ``exclude`` (training only) names each image's own bank index."""
        self.check_input(x)
        reference = self.backbone(x)
        if self.prompt_k > 1:
            return self._forward_k_prompts(x, reference, exclude)
        prompt_index = self.select_prompts(reference.embedding, exclude)
        recovered = self.recover_image(x, prompt_index)
        recovered_features = self.head(self.backbone(recovered).features)
        maps = self.anomaly_maps(reference.features, recovered_features)
        return RediOutput(self.image_score(maps), maps, reference.embedding, recovered=recovered,
                          prompt_index=prompt_index)

    def _forward_k_prompts(self, x: torch.Tensor, reference, exclude: torch.Tensor | None) -> RediOutput:
        """One recovery per nearest prompt; each pixel keeps the smallest distance: a region is
        normal when any of the k prompts explains it (k times the recover and backbone cost)."""
        candidates = self.select_prompts(reference.embedding, exclude, self.prompt_k)
        maps, first = None, None
        for rank in range(candidates.shape[1]):
            recovered = self.recover_image(x, candidates[:, rank])
            rank_maps = self.anomaly_maps(reference.features, self.head(self.backbone(recovered).features))
            maps = rank_maps if maps is None else torch.minimum(maps, rank_maps)
            first = recovered if first is None else first
        return RediOutput(self.image_score(maps), maps, reference.embedding, recovered=first,
                          prompt_index=candidates[:, 0])

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, image_ids: Sequence[str] | None = None,
                exclude: torch.Tensor | None = None) -> RediOutput:
        """Inference: eval mode, no autograd, input moved to the detector's device.

        ``image_ids`` names the images when they may be training images: a bank image then never
        takes itself as its prompt (as at training time). ``exclude[i]`` says the same by bank
        index (-1: none).
        """
        self.eval()
        device = self.threshold.device
        if image_ids is not None:
            bank_index = {image_id: i for i, image_id in enumerate(self.prompt_ids)}
            exclude = torch.tensor([bank_index.get(i, -1) for i in image_ids], dtype=torch.long)
        return self(x.to(device), None if exclude is None else exclude.to(device))

    def pictures(self, output: DetectorOutput) -> dict[str, torch.Tensor]:
        """How ReDi saw each image, for reports: the recovered image Y and the prompt X+ it was
        recovered from (black where no prompt is used)."""
        if not isinstance(output, RediOutput) or output.recovered is None:
            return {}
        pictures = {"recovered Y": output.recovered}
        if self.needs_prompt_images:
            pictures["prompt X+"] = self.prompt_batch(output.prompt_index, output.recovered)
        return pictures

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 RGB arrays of any size -> ``(B, 3, H, W)`` float batch in [0, 1] at this model's
        input size: :func:`redi.core.images.preprocess`, the conversion the threshold was calibrated on."""
        return preprocess(images, self.input_hw, self.cfg.data.aspect)

    def is_anomalous(self, scores: torch.Tensor) -> torch.Tensor:
        """Decision: score above the calibrated threshold."""
        if math.isnan(float(self.threshold)):
            raise WeightsError("the detector has no calibrated threshold; finish training first")
        return scores > self.threshold.to(scores.device)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything that is saved: all weights and buffers except the frozen backbone's."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    # -- export (the ONNX contract of redi.methods.onnx) --------------------------------------
    def export_onnx(self, path: str | Path) -> Path:
        """The whole detector as one fp32 ONNX graph (:func:`redi.methods.redi.export.export_onnx`)."""
        from redi.methods.redi.export import export_onnx  # onnx loads only when exporting

        return export_onnx(self, path)

    def fp32(self):
        """A context in which the recover net runs in fp32, as the exported graph does."""
        from redi.methods.redi.export import torch_fp32

        return torch_fp32(self)

    def example_images(self, count: int) -> torch.Tensor:
        """Up to ``count`` realistic inputs for a parity check: the first prompt-bank images."""
        return self.prompts.decode_float(range(min(count, len(self.prompts))))

    # -- the artifact file (redi.methods.base.save_detector / load_detector) -----------------
    def to_payload(self) -> dict[str, Any]:
        """ReDi's part of the artifact: weights (not the backbone's), prompt bank, its ids."""
        return {
            "backbone_channels": list(self.backbone.channels),
            "num_prompts": int(self.prompt_embeddings.shape[0]),
            "prompt_ids": self.prompt_ids,
            "prompts": self.prompts.to_payload(),  # compressed; empty when inference never uses them
            "state": {k: v.detach().cpu() for k, v in self.trainable_state().items()},
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any], cfg: RediConfig, path: str | Path) -> "Detector":
        """Rebuild a saved detector; the backbone's weights come from its package or file."""
        detector = cls(cfg, num_prompts=payload["num_prompts"])
        if list(detector.backbone.channels) != list(payload["backbone_channels"]):
            raise WeightsError(f"{path} was trained on backbone channels {payload['backbone_channels']}, "
                               f"but {cfg.model.backbone} gives {list(detector.backbone.channels)}")
        prompts = _prompts_of(payload, detector, path)
        missing, unexpected = detector.load_state_dict(payload["state"], strict=False)
        # the frozen backbone comes from its package; a per-image scaled self-map has no fitted scale
        # (artifacts from before model.selfmap.scale do not hold one)
        optional = {"selfmap.scale"} if cfg.model.selfmap.scale == "image" else set()
        missing = [k for k in missing if not k.startswith("backbone.") and k not in optional]
        if missing or unexpected:
            raise WeightsError(f"{path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        detector.prompt_ids = list(payload["prompt_ids"])
        if detector.needs_prompt_images and len(prompts) * len(detector.transforms) != payload["num_prompts"]:
            raise WeightsError(f"{path} has {len(prompts)} prompt images for {payload['num_prompts']} prompts; "
                               f"retrain it")
        detector.prompts = prompts
        return detector


def as_served_prompts(images: torch.Tensor, codec: str = PROMPT_CODEC, quality: int = PROMPT_QUALITY) -> torch.Tensor:
    """The prompt images the detector will serve for ``images``: rounded to uint8, compressed with
    the codec and decoded, so the recover net is trained on exactly the prompts it sees at
    inference. (The training stage encodes the bank once and hands the same bytes to the detector.)"""
    return PromptImages.encode(images, codec, quality).decode_float(dtype=images.dtype)


def _prompts_of(payload: dict[str, Any], detector: Detector, path: str | Path) -> PromptImages:
    """The artifact's prompt images; a version-1 file's raw uint8 prompts (taken out of its state
    dict) are re-encoded losslessly, so the detector serves the very pixels it served before."""
    raw = payload["state"].pop("prompt_images", None)
    if "prompts" in payload:
        return PromptImages.from_payload(payload["prompts"])
    if raw is None:
        raise WeightsError(f"{path} holds no prompt images (format {payload.get('format_version')}); retrain it")
    if not detector.needs_prompt_images:
        return PromptImages.empty(detector.input_hw)
    return PromptImages.encode_uint8(raw, codec="png")


def load_module_weights(module: nn.Module, path: str | Path, kind: str) -> None:
    """Load a stage's weights file into a module, with a clear error for a mismatch."""
    payload = load_torch_file(path, f"{kind} weights", f"run the {kind} training stage first")
    if isinstance(payload, dict) and payload.get("enabled") is False:
        raise WeightsError(f"{kind} weights {path} were written with model.recover.enabled=false; retrain the "
                           f"{kind} stage with the recover net enabled, or set model.recover.enabled=false here too")
    try:
        module.load_state_dict(payload["state"] if "state" in payload else payload)
    except RuntimeError as exc:
        raise WeightsError(f"{kind} weights {path} do not fit this model (another backbone or width?): "
                           f"{str(exc).splitlines()[0]}") from exc
