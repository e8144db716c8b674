"""Export the whole ReDi detector for the edge as one ONNX graph (the contract of :mod:`redi.methods.onnx`).

One graph from the preprocessed batch to the answer: ``images`` (B, 3, H, W) float in [0, 1]
(the output of :func:`redi.core.images.preprocess`, i.e. ``Detector.preprocess``) -> ``score`` (B,) and
``anomaly_map`` (B, H, W), at the model's ``input_hw``. Inside: backbone(X), prompt retrieval (cosine nearest neighbour over
the prompt bank, which the graph carries as uint8 pixels), the self-map (HOG, Sobel or Roberts),
the recover net, backbone(Y), the discriminate head, the anomaly map and its max. The batch axis
is dynamic. The graph is fp32: the recover net's bf16 path (``model.recover.precision=auto`` on
CPUs with bf16 units) is a torch runtime choice, so parity is checked against the torch detector
forced to fp32 (:func:`torch_fp32`).

It uses torch's TorchScript-based ONNX exporter (``dynamo=False``): the dynamo exporter needs the
``onnxscript`` package, which is not part of this project's stack. ``TorchHOG`` writes its
gradients with ``out=`` into slices, which that tracer records wrongly, so the export swaps in
:class:`ExportableHOG`, the same picture written with functional ops (tested equal).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from redi.core.selfmaps import RobertsMap, SobelMap, TorchHOG
from redi.core.utils import atomic_write
from redi.methods.onnx import INPUT_NAME, OPSET, OUTPUT_NAMES, ExportError

if TYPE_CHECKING:  # the detector imports this module when exporting
    from redi.methods.redi.detector import Detector


def _antialiased_bilinear(g, image, output_size, align_corners, scale_factors):
    """ONNX for ``aten::_upsample_bilinear2d_aa`` (torch's antialiased bilinear resize, used by the
    recover net at a reduced ``input_size``), which the TorchScript exporter lacks: opset-18
    ``Resize`` with ``antialias=1``, half-pixel centres (align_corners=False), the same triangle
    filter widened by the scale (tested equal within float rounding through onnxruntime)."""
    from torch.onnx import symbolic_helper

    if symbolic_helper._maybe_get_const(align_corners, "b"):
        raise ExportError("antialiased resize with align_corners=True has no ONNX form; it is not used by redi")
    size = symbolic_helper._maybe_get_const(output_size, "is")
    leading = g.op("Shape", image, start_i=0, end_i=2)  # (B, C) stay dynamic
    sizes = g.op("Concat", leading, g.op("Constant", value_t=torch.tensor(size, dtype=torch.int64)), axis_i=0)
    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    return g.op("Resize", image, empty, empty, sizes, mode_s="linear", antialias_i=1,
                coordinate_transformation_mode_s="half_pixel")


_registered: set[int] = set()


def _register_symbolics(opset: int) -> None:
    """Teach the TorchScript exporter the ops it lacks (once per opset, process-wide)."""
    if opset not in _registered:
        torch.onnx.register_custom_op_symbolic("aten::_upsample_bilinear2d_aa", _antialiased_bilinear, opset)
        _registered.add(opset)


class ExportableHOG(TorchHOG):
    """:class:`TorchHOG`'s picture with functional integer gradients and no CPU batch chunking, so
    the ONNX tracer records it correctly and the batch axis stays dynamic. Same values: the
    gradients are the same integers, the channel choice the same rule (tested equal)."""

    def _dominant_gradient(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Integer arithmetic: exact in any runtime, also where floats run in bf16 (OpenVINO's
        # default on CPUs with bf16 units), which would pick wrong channels and table rows.
        v = x.float().mul(255.0).round().clamp(0.0, 255.0).to(torch.int32)
        g_row = F.pad(v[:, :, 2:, :] - v[:, :, :-2, :], (0, 0, 1, 1))  # 0 on the first and last row
        g_col = F.pad(v[:, :, :, 2:] - v[:, :, :, :-2], (1, 1, 0, 0))
        squared = g_row * g_row + g_col * g_col
        channel = squared.argmax(dim=1, keepdim=True)  # the largest magnitude, the first channel on ties
        code = g_row * self.LUT_SIDE + g_col
        index = (code.gather(1, channel) + (255 * self.LUT_SIDE + 255)).long()
        return index, squared.gather(1, channel).float().sqrt()

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the unscaled (B, 1, H, W) HOG picture (scaled by ScaledMap.forward)."""
        return self._picture(x)


def exportable_selfmap(module: nn.Module) -> nn.Module:
    """The self-map as a traceable module; Canny (skimage on the CPU) has no graph form."""
    if isinstance(module, TorchHOG):
        exportable = ExportableHOG(module.orientations, module.cell, module.mode)
        exportable.scale.copy_(module.scale)  # the line's fitted scale
        return exportable
    if isinstance(module, (SobelMap, RobertsMap)):
        return module
    raise ExportError(f"the {type(module).__name__} self-map runs outside torch and cannot be exported; "
                      f"export a model trained with model.selfmap.kind=hog, sobel or roberts")


class ExportableDetector(nn.Module):
    """The detector as one traceable graph: ``forward(images) -> (score (B,), anomaly_map (B, H, W))``.

    Shares the detector's modules (nothing is copied but the decoded prompt pixels); the recover
    net runs in fp32.
    """

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        if detector.prompt_k > 1 or len(detector.transforms) > 1:
            raise ExportError("the export covers one nearest prompt from a plain bank; this detector uses "
                              f"model.prompt_k={detector.prompt_k} and model.prompt_transforms="
                              f"{detector.transforms[1:]}: serve it with the torch runtime")
        self.detector = detector.cpu().eval()
        self.selfmap = exportable_selfmap(detector.selfmap) if detector.use_recover else None
        self.use_prompt = detector.needs_prompt_images
        if self.use_prompt and len(detector.prompts) == 0:
            raise ExportError("the detector has no prompt images; retrain it with a prompt bank")
        # the bank as the detector serves it (decoded once), uint8 like the torch path before its / 255
        pixels = detector.prompts.decode() if self.use_prompt else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
        self.register_buffer("prompt_pixels", pixels)

    def prompts(self, embedding: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Each image's nearest bank image (cosine of embeddings) as float in [0, 1]."""
        if not self.use_prompt:
            return torch.zeros_like(like)
        similarity = F.normalize(embedding.float(), dim=1) @ self.detector.prompt_embeddings.t()
        index = similarity.argmax(dim=1)
        return self.prompt_pixels.index_select(0, index).to(like.dtype) / 255.0

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score a preprocessed batch: (B, 3, H, W) float in [0, 1]."""
        detector = self.detector
        reference = detector.backbone(images)
        recovered = images
        if self.selfmap is not None:
            recovered = detector.recover(self.selfmap(images), self.prompts(reference.embedding, images)).float()
        maps = detector.anomaly_maps(reference.features, detector.head(detector.backbone(recovered).features))
        return detector.image_score(maps), maps


@contextlib.contextmanager
def torch_fp32(detector: Detector) -> Iterator[Detector]:
    """Run the torch detector with its recover net in fp32 inside the block (what the export computes)."""
    recover = detector.cfg.model.recover
    saved = recover.precision
    recover.precision = "fp32"
    try:
        yield detector
    finally:
        recover.precision = saved


def _metadata(detector: Detector) -> dict[str, str]:
    """What a runtime needs besides the graph: the input size, the threshold and where it came from."""
    meta = detector.metadata
    height, width = detector.input_hw
    return {"redi_format": "redi-detector-onnx", "image_size": str(detector.image_size),
            "input_hw": f"{height}x{width}", "aspect": detector.cfg.data.aspect,
            "threshold": repr(float(detector.threshold)), "line": str(meta.get("line", "")),
            "version": str(meta.get("version", "")), "profile": str(meta.get("profile", "")),
            "backbone": str(meta.get("backbone", "")), "input": f"{INPUT_NAME}: (B, 3, {height}, {width}) "
            "float32 in [0, 1] from redi.core.images.preprocess", "outputs": f"score: (B,), anomaly_map: (B, {height}, {width})"}


def export_onnx(detector: Detector, path: str | Path, opset: int = OPSET) -> Path:
    """Write the whole detector as one ONNX file with a dynamic batch axis; returns the path.

    The file's metadata (``metadata_props``) carries ``image_size``, ``input_hw`` (``HxW``),
    ``aspect``, ``threshold``, ``line`` and ``version``.
    """
    import onnx

    if opset < 18:
        raise ExportError(f"the export needs ONNX opset 18 or newer (antialiased Resize), got {opset}")
    _register_symbolics(opset)
    module = ExportableDetector(detector)
    example = torch.rand(2, 3, *detector.input_hw, generator=torch.Generator().manual_seed(0))
    dynamic = {INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"}, OUTPUT_NAMES[1]: {0: "batch"}}

    def write(tmp: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(module, (example,), str(tmp), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_axes=dynamic, opset_version=opset, dynamo=False, do_constant_folding=True)
        model = onnx.load(str(tmp))
        for key, value in _metadata(detector).items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(tmp))

    return atomic_write(Path(path), write)


