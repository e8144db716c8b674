"""Torch views of a list of samples: tensors at the model's input size ``(H, W)``, ``[0, 1]`` RGB.

Every function takes the size (S for ``(S, S)``, or the model's ``(H, W)``: ``DataConfig.input_hw``)
and ``aspect`` (``data.aspect``: ``"squash"``, ``"letterbox"`` or ``"native"``, see
:func:`redi.core.images.preprocess`); images and masks of one sample always go through the same
geometry (:func:`redi.core.images.letterbox_geometry`), so masks line up with their images.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from redi.data.mvtec import Sample
from redi.core.images import check_aspect, image_size_of, load_mask, load_rgb, preprocess, resize_mask, size_hw

Size = int | tuple[int, int]  # S, or (height, width)


def load_image(sample: Sample, image_size: Size, aspect: str = "squash") -> torch.Tensor:
    """Read one sample's image as model input ``(3, H, W)``, exactly as ``Detector.preprocess``
    converts it (:func:`redi.core.images.preprocess` with the same ``aspect``), so training,
    calibration, evaluation and inference see the same pixels.

    Raises:
        ImageReadError: the image cannot be read.
        InputError: ``aspect`` is not one of :data:`redi.core.images.ASPECTS`.
    """
    check_aspect(aspect)
    return preprocess([load_rgb(sample.path)], image_size, aspect)[0]


def _mask_tensor(sample: Sample, image_hw: tuple[int, int], image_size: Size, aspect: str) -> torch.Tensor:
    """One sample's mask as float ``(1, H, W)`` in {0, 1}; zeros when it has none."""
    if sample.mask_path is None:
        return torch.zeros(1, *size_hw(image_size))
    full = load_mask(sample.mask_path, expected_hw=image_hw, image_path=sample.path)
    return torch.from_numpy(resize_mask(full, image_size, aspect)).float().unsqueeze(0)


def load_sample(sample: Sample, image_size: Size, aspect: str = "squash") -> tuple[torch.Tensor, torch.Tensor]:
    """Read one sample as ``(image (3, H, W), mask (1, H, W))`` float tensors.

    The mask is all zeros for samples without one (normal images, image-level-only lines). With
    ``aspect="letterbox"`` the mask is letterboxed into the same box as the image (padding False).

    Raises:
        ImageReadError: the image or mask cannot be read.
        DatasetError: the mask's size differs from the image's.
        InputError: ``aspect`` is not one of :data:`redi.core.images.ASPECTS`.
    """
    check_aspect(aspect)
    rgb = load_rgb(sample.path)
    image = preprocess([rgb], image_size, aspect)[0]
    return image, _mask_tensor(sample, rgb.shape[:2], image_size, aspect)


class ImageDataset(Dataset):
    """Samples as dicts ``image (3,H,W) float [0,1], mask (1,H,W) float {0,1}, label int,
    index int, image_id str``.

    Args:
        samples: the samples (e.g. ``MVTecCategory(...).train``).
        image_size: S or the ``(H, W)`` every image is resized to (:func:`redi.core.images.preprocess`;
            masks nearest).
        cache: keep decoded, resized tensors in memory after the first read (worth it when
            many epochs run over a small set: 3*S*S*4 bytes per image, 0.8 MB at 256 px).
        aspect: ``"squash"``, ``"letterbox"`` or ``"native"`` (``data.aspect``), for images and masks alike.

    Raises:
        InputError: ``aspect`` is not one of :data:`redi.core.images.ASPECTS`.
    """

    def __init__(self, samples: Sequence[Sample], image_size: Size, cache: bool = False,
                 aspect: str = "squash") -> None:
        self.samples = list(samples)
        self.image_size = size_hw(image_size)
        self.cache = cache
        self.aspect = check_aspect(aspect)  # fail at construction, not at the first batch
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        if index in self._cache:
            image, mask = self._cache[index]
        else:
            image, mask = load_sample(sample, self.image_size, self.aspect)
            if self.cache:
                self._cache[index] = (image, mask)
        return {"image": image.clone() if self.cache else image,
                "mask": mask.clone() if self.cache else mask,
                "label": int(sample.label), "index": int(index), "image_id": sample.image_id}


def load_images(samples: Sequence[Sample], image_size: Size, aspect: str = "squash") -> torch.Tensor:
    """All samples' images as one float tensor ``(N, 3, H, W)`` in ``[0, 1]`` (small sets only),
    each converted by :func:`load_image` (one full-size image in memory at a time).

    Raises:
        InputError: ``aspect`` is not one of :data:`redi.core.images.ASPECTS`.
    """
    check_aspect(aspect)
    if not samples:
        return torch.zeros(0, 3, *size_hw(image_size))
    return torch.stack([load_image(s, image_size, aspect) for s in samples])


def load_masks(samples: Sequence[Sample], image_size: Size, aspect: str = "squash") -> torch.Tensor:
    """All samples' masks as one float tensor ``(N, 1, H, W)`` with values in {0, 1}, in the same
    geometry as :func:`load_images` with the same ``aspect`` (pixel for pixel).

    Raises:
        InputError: ``aspect`` is not one of :data:`redi.core.images.ASPECTS`.
    """
    check_aspect(aspect)
    masks = []
    for sample in samples:
        # the image's header gives its size (which the letterbox box depends on) without decoding it
        image_hw = image_size_of(sample.path) if sample.mask_path is not None else size_hw(image_size)
        masks.append(_mask_tensor(sample, image_hw, image_size, aspect))
    return torch.stack(masks) if masks else torch.zeros(0, 1, *size_hw(image_size))
