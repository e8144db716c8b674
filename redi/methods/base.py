"""The detector protocol every method meets, the method registry, and the one artifact format.

Everything downstream of training (calibration, evaluation, the report, prediction, serving,
monitoring, the gate, export) sees a detector only through :class:`AnomalyDetector`:

- ``preprocess(list_of_rgb_uint8) -> (B, 3, H, W)`` float batch in ``[0, 1]`` (the one inference
  path: :func:`redi.core.images.preprocess` at the model's ``input_hw``: ``(S, S)``, or the line's
  own canvas for ``data.aspect=native``);
- ``predict(batch, image_ids=None) -> DetectorOutput`` (image score, anomaly map, embedding);
  ``image_ids`` names training images so that a method that keeps them (a prompt or memory bank)
  never matches an image with itself;
- ``threshold`` (a 0-d tensor; NaN until calibrated), ``is_anomalous(scores)``;
- ``pictures(output)``: named pictures of how the method saw each image, for reports;
- ``fit_image_ids``: the training images the model was fitted on (the held-out normals that set
  the threshold are the others);
- ``to_payload()`` / ``from_payload(payload, cfg, path)``: its part of the artifact file.

A method is one folder ``redi/methods/<name>/`` that registers a :class:`Method` under its name
(``@register_method("name")``, as timm's ``@register_model``); ``model.method`` in the config
picks it. :func:`save_detector` / :func:`load_detector` write and read the one artifact file
(format ``redi-detector``), which names its method, so any registered method loads by itself.
The file holds tensors and plain Python data only and is read weights-only (no pickled code).
"""

from __future__ import annotations

import copy
import datetime as _dt
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from redi import __version__
from redi.core.config import RediConfig, from_dict, to_dict
from redi.core.errors import ConfigError, WeightsError
from redi.core.name_registry import Registry
from redi.core.utils import atomic_torch_save, load_torch_file

ARTIFACT_FORMAT = "redi-detector"
ARTIFACT_VERSION = 2
DEFAULT_METHOD = "redi"  # artifacts written before model.method existed are ReDi detectors


@dataclass
class DetectorOutput:
    """What a detector returns for a batch of B images of input size (H, W)."""

    score: torch.Tensor  # (B,) image anomaly score
    anomaly_map: torch.Tensor  # (B, H, W)
    embedding: torch.Tensor  # (B, D) pooled embedding of the image (drift monitoring)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # the method's own per-image outputs


@runtime_checkable
class AnomalyDetector(Protocol):
    """The face every method shows to evaluation, serving, monitoring, the gate and export."""

    method: str
    cfg: RediConfig
    image_size: int  # S, data.image_size
    input_hw: tuple[int, int]  # (H, W) of preprocess's output and of the maps
    threshold: torch.Tensor
    metadata: dict[str, Any]

    @property
    def fit_image_ids(self) -> list[str]: ...

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor: ...

    def predict(self, x: torch.Tensor, image_ids: Sequence[str] | None = None) -> DetectorOutput: ...

    def is_anomalous(self, scores: torch.Tensor) -> torch.Tensor: ...

    def pictures(self, output: DetectorOutput) -> dict[str, torch.Tensor]: ...

    def to_payload(self) -> dict[str, Any]: ...

    def to(self, device: Any) -> "AnomalyDetector": ...


class Method(ABC):
    """A registered method: how to fit it on a line and how to rebuild its detector from a file.

    Subclasses set ``name`` and ``detector_class`` and implement :meth:`fit`;
    ``detector_class.from_payload(payload, cfg, path)`` rebuilds a saved detector.
    """

    name: ClassVar[str] = ""
    detector_class: ClassVar[Any] = None

    @abstractmethod
    def fit(self, data_root: str | Path, out_dir: str | Path, cfg: RediConfig, line: str = "") -> dict[str, Path]:
        """Fit on the line's normal training images; calibrate; write ``out_dir/detector.pt``.

        Returns the files written, ``{"detector": path, ...}``.
        """

    def upgrade_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """An older artifact's config, filled in the way that older redi behaved (default: unchanged)."""
        return config

    def parts(self, cfg: RediConfig) -> list[str]:
        """The methods this one is built from (a combination such as ``fused``); [] for a method of its own."""
        return []

    def combine(self, parts: dict[str, Path], data_root: str | Path, out_dir: str | Path, cfg: RediConfig,
                line: str = "") -> dict[str, Path]:
        """Build this method's detector from its parts' fitted detector files (``{method: path}``)."""
        raise ConfigError(f"method {self.name!r} is not built from other methods")


METHOD_REGISTRY: Registry[type[Method]] = Registry("method", "model.method")


def register_method(name: str):
    """Class decorator: register a :class:`Method` subclass under ``name`` (``model.method``)."""

    def wrap(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHOD_REGISTRY.register(name)(cls)
        return cls

    return wrap


def method_names() -> list[str]:
    """The registered methods (the built-in ones register when ``redi.methods`` is imported)."""
    return list(METHOD_REGISTRY.names())


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name is a ConfigError listing the known ones."""
    return METHOD_REGISTRY.get(name)()


# -- the artifact file --------------------------------------------------------------------------
def save_detector(detector: AnomalyDetector, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write a detector (method, config, its payload, threshold, metadata) as one file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**detector.metadata, **(metadata or {})}
    meta.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    meta.setdefault("redi_version", __version__)
    meta["profile"] = detector.cfg.profile
    meta["backbone"] = detector.cfg.model.backbone
    meta["method"] = detector.method
    detector.metadata = meta
    payload = {
        **detector.to_payload(),
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_VERSION,
        "method": detector.method,
        "config": to_dict(detector.cfg),
        "metadata": meta,
    }
    atomic_torch_save(payload, path)  # a crash never leaves a half-written artifact
    return path


def read_artifact(path: str | Path) -> dict[str, Any]:
    """Load and check an artifact file's envelope (not the weights).

    The file is read weights-only (tensors and plain data): a detector file is data, never code, so
    a file that a writer to the store or the run folder crafted to run code is refused unread.
    """
    payload = load_torch_file(path, "detector file", "train a model first (`redi train`)")
    return _check_envelope(payload, path)


def _check_envelope(payload: Any, path: str | Path) -> dict[str, Any]:
    if not isinstance(payload, dict) or payload.get("format") != ARTIFACT_FORMAT:
        raise WeightsError(f"{path} is not a redi detector artifact")
    version = payload.get("format_version", 0)
    if version > ARTIFACT_VERSION:
        raise WeightsError(f"{path} was written by a newer redi (format {version}); upgrade redi")
    if version < 1:
        raise WeightsError(f"{path} has an unknown artifact format version {version!r}; retrain the model (`redi train`)")
    return payload


def convert_artifact(path: str | Path, out: str | Path | None = None) -> Path:
    """Rewrite a TRUSTED detector file from an earlier redi as tensors and plain data only.

    This is the one place redi unpickles a detector file fully (which can run code in the file):
    only for files the operator vouches for (``redi model convert-artifact PATH --trust``). The
    result (``out``, default: in place) loads weights-only. Its sha256 changes, so a converted
    model goes to production through the gate again (a new version), never by editing the store.
    """
    payload = _check_envelope(load_torch_file(path, "detector file", "check the path", weights_only=False), path)
    try:
        return atomic_torch_save(payload, Path(out or path))
    except TypeError as exc:
        raise WeightsError(f"{path} cannot be converted to plain data: {exc}; retrain the model") from exc


def artifact_method(payload: dict[str, Any]) -> str:
    """The method that wrote an artifact (files from before ``model.method`` are ReDi's)."""
    return str(payload.get("method") or DEFAULT_METHOD)


def _filled_config(config: dict[str, Any]) -> dict[str, Any]:
    """An artifact's config with every setting it lacks set to the schema's BASE defaults (not the
    profile's, which may have moved on since the file was written)."""

    def fill(saved: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        merged = copy.deepcopy(base)
        for key, value in saved.items():
            merged[key] = fill(value, base[key]) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        return merged

    return fill(config, to_dict(RediConfig(profile=str(config.get("profile", "cpu")))))


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> AnomalyDetector:
    """Rebuild any method's detector from its artifact, on ``device``, in eval mode."""
    payload = read_artifact(path)
    name = artifact_method(payload)
    try:
        method = get_method(name)
    except ConfigError as exc:
        raise WeightsError(f"{path} was written by method {name!r}, which this redi does not have "
                           f"(known: {method_names()}); upgrade redi") from exc
    config = method.upgrade_config(payload["config"])
    config = _filled_config(config)
    config.setdefault("model", {})["method"] = name
    cfg = from_dict(config)
    detector = method.detector_class.from_payload(payload, cfg, path)
    detector.metadata = dict(payload["metadata"])
    return detector.to(device).eval()
