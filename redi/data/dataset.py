"""Torch views of a list of samples: tensors at one square size, ``[0, 1]`` RGB."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from redi.data.mvtec import Sample
from redi.images import image_size_of, load_mask, load_rgb, preprocess, resize_mask


def load_image(sample: Sample, image_size: int) -> torch.Tensor:
    """Read one sample's image as model input ``(3, S, S)``, exactly as ``Detector.preprocess``
    converts it (:func:`redi.images.preprocess`), so training, calibration, evaluation and
    inference see the same pixels.

    Raises:
        ImageReadError: the image cannot be read.
    """
    return preprocess([load_rgb(sample.path)], image_size)[0]


def load_sample(sample: Sample, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one sample as ``(image (3, S, S), mask (1, S, S))`` float tensors.

    The mask is all zeros for samples without one (normal images, image-level-only lines).

    Raises:
        ImageReadError: the image or mask cannot be read.
        DatasetError: the mask's size differs from the image's.
    """
    rgb = load_rgb(sample.path)
    image = preprocess([rgb], image_size)[0]
    if sample.mask_path is None:
        mask = torch.zeros(1, image_size, image_size)
    else:
        full = load_mask(sample.mask_path, expected_hw=rgb.shape[:2], image_path=sample.path)
        mask = torch.from_numpy(resize_mask(full, image_size)).float().unsqueeze(0)
    return image, mask


class ImageDataset(Dataset):
    """Samples as dicts ``image (3,S,S) float [0,1], mask (1,S,S) float {0,1}, label int,
    index int, image_id str``.

    Args:
        samples: the samples (e.g. ``MVTecCategory(...).train``).
        image_size: the square side S every image is resized to (:func:`redi.images.preprocess`;
            masks nearest).
        cache: keep decoded, resized tensors in memory after the first read (worth it when
            many epochs run over a small set: 3*S*S*4 bytes per image, 0.8 MB at 256 px).
    """

    def __init__(self, samples: Sequence[Sample], image_size: int, cache: bool = False) -> None:
        self.samples = list(samples)
        self.image_size = int(image_size)
        self.cache = cache
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        if index in self._cache:
            image, mask = self._cache[index]
        else:
            image, mask = load_sample(sample, self.image_size)
            if self.cache:
                self._cache[index] = (image, mask)
        return {"image": image.clone() if self.cache else image,
                "mask": mask.clone() if self.cache else mask,
                "label": int(sample.label), "index": int(index), "image_id": sample.image_id}


def load_images(samples: Sequence[Sample], image_size: int) -> torch.Tensor:
    """All samples' images as one float tensor ``(N, 3, S, S)`` in ``[0, 1]`` (small sets only),
    each converted by :func:`load_image` (one full-size image in memory at a time)."""
    if not samples:
        return torch.zeros(0, 3, image_size, image_size)
    return torch.stack([load_image(s, image_size) for s in samples])


def load_masks(samples: Sequence[Sample], image_size: int) -> torch.Tensor:
    """All samples' masks as one float tensor ``(N, 1, S, S)`` with values in {0, 1}."""
    masks = []
    for sample in samples:
        if sample.mask_path is None:
            masks.append(torch.zeros(1, image_size, image_size))
            continue
        # the image's header gives its size without decoding it
        full = load_mask(sample.mask_path, expected_hw=image_size_of(sample.path), image_path=sample.path)
        masks.append(torch.from_numpy(resize_mask(full, image_size)).float().unsqueeze(0))
    return torch.stack(masks) if masks else torch.zeros(0, 1, image_size, image_size)
