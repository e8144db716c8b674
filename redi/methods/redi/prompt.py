"""The prompt bank: pooled backbone embeddings of the normal training images (paper Sec. 3.1).

The prompt image X+ of an image X is the bank image with the highest cosine similarity to X. At
training time X is itself in the bank, so its own entry is excluded: X+ is never X.

With ``model.prompt_transforms`` (e.g. ``hflip``, ``rot180``) the bank is augmented: it holds one
embedding per (image, transform) and a prompt is the transformed image whose embedding matches X
best, so a part that hangs mirrored or turned finds a prompt in its own pose. Bank index ``j``
names image ``j % N`` under transform ``j // N`` (0: as photographed), so only the N images
are stored.

The bank's images travel with the detector compressed (:class:`PromptImages`: lossy WebP by
default, or lossless PNG) and are decoded on demand, only the prompts a batch uses.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from redi.core.errors import WeightsError
from redi.core.images import size_hw
from redi.core.utils import atomic_torch_save, load_torch_file

BANK_FORMAT = "redi-prompt-bank"

# name -> the transform on (..., S, S) images; "identity" is always transform 0 of a bank
TRANSFORMS = {
    "identity": lambda t: t,
    "hflip": lambda t: t.flip(-1),
    "vflip": lambda t: t.flip(-2),
    "rot90": lambda t: t.rot90(1, dims=(-2, -1)),
    "rot180": lambda t: t.rot90(2, dims=(-2, -1)),
    "rot270": lambda t: t.rot90(3, dims=(-2, -1)),
}


def transform_images(images: torch.Tensor, name: str) -> torch.Tensor:
    """``images`` (..., S, S) under the named transform (one of :data:`TRANSFORMS`)."""
    if name not in TRANSFORMS:
        raise ValueError(f"unknown prompt transform {name!r}; known: {sorted(TRANSFORMS)}")
    return TRANSFORMS[name](images)


def bank_transforms(extra: Sequence[str]) -> list[str]:
    """The transforms of an augmented bank in index order: identity first, then ``extra``."""
    return ["identity", *extra]


def prompt_pixels(decode, index: torch.Tensor, num_images: int, transforms: Sequence[str]) -> torch.Tensor:
    """Prompt images for augmented bank indices ``index`` (all >= 0): image ``index % N`` decoded
    by ``decode(base_indices)`` (float (n, 3, S, S)), then transform ``index // N`` applied."""
    base, kind = index % num_images, index // num_images
    images = decode(base)
    if len(transforms) == 1:
        return images
    out = images.clone()
    for number, name in enumerate(transforms):
        rows = (kind == number).nonzero().flatten()
        if number and rows.numel():
            out[rows] = transform_images(images[rows], name)
    return out


@dataclass
class PromptBank:
    """L2-normalised embeddings (N, D) with the image ids they came from."""

    embeddings: torch.Tensor  # (N * (1 + len(transforms)), D): transform-major, see the module docstring
    image_ids: list[str]
    backbone: str
    transforms: list[str] = field(default_factory=list)  # the augmenting transforms (identity not listed)

    def __post_init__(self) -> None:
        self.embeddings = F.normalize(self.embeddings.float(), dim=1)
        if len(self.image_ids) * (1 + len(self.transforms)) != self.embeddings.shape[0]:
            raise ValueError("one embedding per image and transform is required")

    def __len__(self) -> int:
        """The number of images (not of embeddings, which is larger for an augmented bank)."""
        return len(self.image_ids)

    def nearest(self, queries: torch.Tensor, exclude: torch.Tensor | None = None,
                batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-1 cosine retrieval. ``exclude[i]`` is an image query i may not get under any transform (or -1)."""
        return nearest_prompt(queries, self.embeddings.to(queries.device), exclude, batch_size, period=len(self))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_torch_save({"format": BANK_FORMAT, "embeddings": self.embeddings, "image_ids": self.image_ids,
                           "backbone": self.backbone, "transforms": self.transforms}, path)
        return path

    @classmethod
    def load(cls, path: str | Path, backbone: str | None = None) -> "PromptBank":
        """Load a bank; with ``backbone`` given, refuse a bank built with another one."""
        data = load_torch_file(path, "prompt bank", "build it first with `redi prompt-bank` "
                                                    "(or the build_prompt_bank stage)")
        if not isinstance(data, dict) or data.get("format") != BANK_FORMAT:
            raise WeightsError(f"{path} is not a redi prompt bank")
        if backbone and data["backbone"] != backbone:
            raise WeightsError(f"prompt bank {path} was built with backbone {data['backbone']!r}, "
                               f"but the model uses {backbone!r}; rebuild the bank")
        return cls(data["embeddings"], list(data["image_ids"]), data["backbone"], list(data.get("transforms", [])))


def top_prompts(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, exclude: torch.Tensor | None = None,
                batch_size: int = 1024, period: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and cosine similarities (Q, k) of the k most similar bank rows (bank normalised).

    ``exclude[i]`` (or -1) is an image query i may not get; with ``period`` = N (an augmented
    bank) every row ``j`` with ``j % N == exclude[i]`` is excluded: no transform of X is X's prompt.
    """
    period = period or bank.shape[0]
    available = period - (1 if exclude is not None else 0)
    if bank.shape[0] < 1 or available < 1:
        raise ValueError("the prompt bank needs at least two images to exclude a query's own entry")
    k = min(k, bank.shape[0] - (bank.shape[0] // period if exclude is not None else 0))
    queries = F.normalize(queries.float(), dim=1)
    columns = torch.arange(bank.shape[0], device=bank.device) % period
    indices, similarities = [], []
    for start in range(0, queries.shape[0], batch_size):
        sims = queries[start:start + batch_size] @ bank.t()
        if exclude is not None:
            own = exclude[start:start + batch_size].to(sims.device).view(-1, 1)
            sims = sims.masked_fill((columns.view(1, -1) == own) & (own >= 0), float("-inf"))
        best = sims.topk(k, dim=1)
        indices.append(best.indices)
        similarities.append(best.values)
    return torch.cat(indices), torch.cat(similarities)


def nearest_prompt(queries: torch.Tensor, bank: torch.Tensor, exclude: torch.Tensor | None = None,
                   batch_size: int = 1024, period: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and cosine similarities (Q,) of the most similar bank rows (see :func:`top_prompts`)."""
    indices, similarities = top_prompts(queries, bank, 1, exclude, batch_size, period)
    return indices[:, 0], similarities[:, 0]


# -- prompt images as the detector stores them -------------------------------------------------
PROMPT_CODECS = ("webp", "png")
# Defaults of the encoders; a run's choice is the config's model.prompt_codec / prompt_quality.
PROMPT_CODEC = "webp"
PROMPT_QUALITY = 85
_PIL_FORMAT = {"webp": "WEBP", "png": "PNG"}


def _encode_one(rgb: np.ndarray, codec: str, quality: int) -> bytes:
    """One uint8 (S, S, 3) image as codec bytes (deterministic for a given Pillow build)."""
    buffer = io.BytesIO()
    options = {"quality": quality, "method": 6} if codec == "webp" else {"compress_level": 6}
    Image.fromarray(rgb).save(buffer, _PIL_FORMAT[codec], **options)
    return buffer.getvalue()


class PromptImages:
    """The prompt bank's images, compressed: one byte buffer and offsets, decoded on demand.

    Memory is the compressed size (a few KB per image) instead of 3 * H * W bytes each. Indexing
    (``store[i]``, ``store.shape``) gives uint8 ``(3, H, W)`` tensors like the raw tensor it
    replaces, so code that showed prompts from the old uint8 buffer keeps working. ``size`` is the
    images' ``(H, W)`` (an int S means ``(S, S)``).
    """

    def __init__(self, codec: str, quality: int, size: int | tuple[int, int], data: torch.Tensor,
                 offsets: torch.Tensor) -> None:
        if codec not in PROMPT_CODECS:
            raise WeightsError(f"unknown prompt codec {codec!r}; known: {PROMPT_CODECS}. Upgrade redi or retrain")
        if offsets.dim() != 1 or offsets.numel() < 1 or int(offsets[-1]) != data.numel():
            raise WeightsError("the prompt images are damaged (offsets do not match the data); retrain the detector")
        self.codec, self.quality, self.size = codec, int(quality), size_hw(size)
        self.data, self.offsets = data.to(torch.uint8).contiguous(), offsets.to(torch.int64)

    @classmethod
    def empty(cls, size: int | tuple[int, int]) -> "PromptImages":
        """A store with no images (the recover net is off or no prompt is used)."""
        return cls("png", 0, size, torch.zeros(0, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64))

    @classmethod
    def encode(cls, images: torch.Tensor, codec: str = PROMPT_CODEC, quality: int = PROMPT_QUALITY) -> "PromptImages":
        """Compress float images (N, 3, H, W) in [0, 1] (rounded to uint8 first)."""
        if codec not in PROMPT_CODECS:
            raise ValueError(f"prompt codec must be one of {PROMPT_CODECS}, got {codec!r}")
        pixels = (images.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8)
        return cls.encode_uint8(pixels, codec, quality)

    @classmethod
    def encode_uint8(cls, pixels: torch.Tensor, codec: str = PROMPT_CODEC,
                     quality: int = PROMPT_QUALITY) -> "PromptImages":
        """Compress uint8 images (N, 3, H, W)."""
        if codec not in PROMPT_CODECS:
            raise ValueError(f"prompt codec must be one of {PROMPT_CODECS}, got {codec!r}")
        blobs = [_encode_one(np.ascontiguousarray(p.permute(1, 2, 0).numpy()), codec, quality) for p in pixels]
        return cls.from_blobs(blobs, codec, quality, tuple(pixels.shape[-2:]))

    @classmethod
    def from_blobs(cls, blobs: Sequence[bytes], codec: str, quality: int,
                   size: int | tuple[int, int]) -> "PromptImages":
        """A store from already-encoded images."""
        lengths = torch.tensor([0] + [len(b) for b in blobs], dtype=torch.int64)
        data = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8) if blobs else torch.zeros(0, dtype=torch.uint8)
        return cls(codec, quality, size, data.clone(), lengths.cumsum(0))

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(N, 3, H, W)``: the shape of the decoded bank."""
        return (len(self), 3, *self.size)

    @property
    def nbytes(self) -> int:
        """Bytes held (compressed images and offsets)."""
        return self.data.numel() + self.offsets.numel() * 8

    def blob(self, index: int) -> bytes:
        """The encoded bytes of image ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"prompt index {index} is outside the bank of {len(self)} images")
        begin, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.data[begin:end].numpy().tobytes()

    def __getitem__(self, index: int) -> torch.Tensor:
        """Image ``index`` decoded: uint8 (3, H, W)."""
        with Image.open(io.BytesIO(self.blob(int(index)))) as image:
            rgb = np.asarray(image.convert("RGB"))
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1)

    def decode(self, indices: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Images at ``indices`` (all when None) decoded: uint8 (n, 3, H, W) on the CPU."""
        wanted = range(len(self)) if indices is None else [int(i) for i in indices]
        images = [self[i] for i in wanted]
        return torch.stack(images) if images else torch.zeros(0, 3, *self.size, dtype=torch.uint8)

    def decode_float(self, indices: torch.Tensor | Sequence[int] | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Images at ``indices`` as the detector serves them: float in [0, 1]."""
        return self.decode(indices).to(dtype) / 255.0

    def to_payload(self) -> dict[str, Any]:
        """What an artifact stores (plain types and tensors)."""
        height, width = self.size  # an int for a square bank, as files before non-square canvases have it
        return {"codec": self.codec, "quality": self.quality, "size": height if height == width else [height, width],
                "data": self.data, "offsets": self.offsets}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "PromptImages":
        """Inverse of :meth:`to_payload`."""
        return cls(payload["codec"], payload["quality"], payload["size"], payload["data"], payload["offsets"])
