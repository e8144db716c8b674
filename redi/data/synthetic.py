"""Synthetic defects drawn on real normal images, with exact masks: a validation set made from
the training data alone (see docs/validation.md).

Four kinds, drawn with the demo lines' helpers (:mod:`redi.data.demo`) but placed on any image:

- ``scratch``: a thin, slightly bent bright or dark line (0.12-0.4 S long, 1-2 px wide);
- ``hole``: an irregular blob of missing material (radius 0.025-0.08 S), dark, or bright where
  the surface itself is dark (a dark hole in a dark surface would not be visible);
- ``stain``: an irregular blob (radius 0.04-0.12 S) blended toward an oil / rust / ink colour;
- ``cutpaste``: a rectangle (side 0.08-0.22 S, aspect 1:2 to 2:1) cut from ANOTHER normal image
  (a donor), rotated by a multiple of 90 degrees and maybe mirrored, pasted at another place;

and three that look like what grey textured lines fail on (magnetic tiles, strips with cracks):

- ``crack``: a thin (1 px), long (0.25-0.6 S), meandering line, only slightly darker than the
  surface (to 70-85 % of its brightness): a low-contrast crack;
- ``blowhole``: a small round pit (radius 0.012-0.03 S), darkened to 35-60 % with a soft edge;
- ``patch``: an irregular region (radius 0.06-0.15 S) whose brightness is shifted by 8-18 %
  (up or down) with a smooth falloff: an uneven, low-contrast patch of the texture.

Every defect lies wholly inside the image. As in the demo lines, pixels whose change would be
invisible (at most ``DIFF_THRESHOLD`` grey levels) keep their clean value (small gaps inside a
defect excepted), and a draw whose visible area is below :func:`redi.data.demo.min_defect_area`,
or below ``MIN_VISIBLE_FRACTION`` of its shape, is drawn again. The mask is then exact:
``mask == (round(255 * image) != round(255 * clean))`` in any channel. Everything is driven by
``numpy.random.default_rng([seed, image, defect])``, so with the same donors a defect does not
change when other images are added.

Sizes are fractions of S, the image's short side. A non-square image (a ``data.aspect=native``
canvas) gets each defect drawn inside an S x S window of it, placed at random along the long
side (by its own generator, so square images draw exactly what they drew before).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage
from skimage import draw

from redi.data.demo import (_blob, _hole_pixels, _scratch_pixels, _scratch_shape, _stain_pixels, keep_visible,
                            min_defect_area)
from redi.core.errors import DatasetError, InputError

SYNTHETIC_KINDS = ("scratch", "hole", "stain", "cutpaste", "crack", "blowhole", "patch")
MAX_TRIES = 30  # draws per defect before giving up (a nearly uniform image hides most defects)
DARK_SURFACE = 90  # mean brightest-channel level below which a hole shows a bright background, not a dark one
MIN_VISIBLE_FRACTION = 0.25  # a draw must change at least this share of its shape visibly, else it is redrawn


@dataclass
class SyntheticSet:
    """Synthetic defective images and their exact masks.

    Attributes:
        images: float32 ``(M, 3, H, W)`` in [0, 1]. Outside the mask each image equals its
            source image exactly (bit for bit when the sources were given as float tensors).
        masks: bool ``(M, H, W)``, the pixels that differ from the source after uint8 rounding.
        labels: int64 ``(M,)``, all 1 (anomalous).
        kinds: the defect kind of each image (one of :data:`SYNTHETIC_KINDS`).
        sources: index into the ``images`` given to :func:`synthesize_defects` of each one's clean image.
        donors: for ``cutpaste``, the index into ``donors`` the patch was cut from; -1 otherwise.
    """

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    kinds: list[str]
    sources: list[int]
    donors: list[int]

    def __len__(self) -> int:
        return len(self.kinds)


def to_uint8_images(images: np.ndarray | torch.Tensor, name: str = "images") -> np.ndarray:
    """A stack of RGB images as uint8 ``(N, H, W, 3)``.

    Takes uint8 ``(N, H, W, 3)`` arrays as they are, and float tensors ``(N, 3, H, W)`` in [0, 1]
    (model input, :func:`redi.data.dataset.load_images`) rounded to the nearest grey level.

    Raises:
        InputError: anything else, saying what was given.
    """
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise InputError(f"{name}: expected a uint8 (N, H, W, 3) array of RGB images, got "
                             f"{images.dtype} {images.shape}; or pass a float (N, 3, H, W) tensor in [0, 1]")
        return images
    if torch.is_tensor(images):
        if not images.dtype.is_floating_point or images.dim() != 4 or images.shape[1] != 3:
            raise InputError(f"{name}: expected a float (N, 3, H, W) tensor in [0, 1], got {images.dtype} "
                             f"{tuple(images.shape)}; or pass a uint8 (N, H, W, 3) array")
        return images.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    raise InputError(f"{name}: expected a uint8 numpy array or a float torch tensor, got {type(images).__name__}")


# ----- one defect of each kind: (modified float image, shape) or None when it left the image ----------------
Draw = tuple[np.ndarray, np.ndarray] | None


def _scratch(rng: np.random.Generator, clean: np.ndarray, size: int) -> Draw:
    length = rng.uniform(0.12, 0.4) * size
    start = rng.uniform(0, size, 2)
    # drawn on a padded canvas so a scratch that leaves the image is seen (and redrawn), not cut off
    pad = int(math.ceil(length)) + 3
    canvas = _scratch_shape(rng, size + 2 * pad, (start[0] + pad, start[1] + pad), length)
    shape = canvas[pad:pad + size, pad:pad + size]
    if shape.sum() != canvas.sum():
        return None
    return _scratch_pixels(rng, clean), shape


def _blob_inside(rng: np.random.Generator, size: int, low: float, high: float) -> np.ndarray:
    """An irregular blob of radius ``low..high`` x S wholly inside the image (its polygon reaches 1.25 r)."""
    radius = rng.uniform(low, high) * size
    reach = 1.25 * radius + 2
    center = rng.uniform(reach, size - reach, 2)
    return _blob(rng, size, (float(center[0]), float(center[1])), radius)


def _hole(rng: np.random.Generator, clean: np.ndarray, size: int) -> Draw:
    shape = _blob_inside(rng, size, 0.025, 0.08)
    if not shape.any():
        return None
    pixels = _hole_pixels(rng, shape)
    if clean[shape].max(axis=-1).mean() < DARK_SURFACE:  # behind a dark surface, show a bright background
        pixels = 255.0 - pixels
    return pixels, shape


def _stain(rng: np.random.Generator, clean: np.ndarray, size: int) -> Draw:
    shape = _blob_inside(rng, size, 0.04, 0.12)
    return (_stain_pixels(rng, clean), shape) if shape.any() else None


def _crack(rng: np.random.Generator, clean: np.ndarray, size: int) -> Draw:
    length = rng.uniform(0.25, 0.6) * size
    segments = int(rng.integers(4, 8))
    angle = rng.uniform(0, 2 * np.pi)
    point = rng.uniform(0.1 * size, 0.9 * size, 2)
    shape = np.zeros((size, size), dtype=bool)
    for _ in range(segments):
        angle += rng.uniform(-0.6, 0.6)  # meanders, as a crack follows the grain
        end = point + np.array([np.sin(angle), np.cos(angle)]) * length / segments
        if not ((0 <= end) & (end <= size - 1)).all():
            return None
        rr, cc = draw.line(int(round(point[0])), int(round(point[1])), int(round(end[0])), int(round(end[1])))
        shape[rr, cc] = True
        point = end
    return clean * rng.uniform(0.7, 0.85), shape


def _blowhole(rng: np.random.Generator, clean: np.ndarray, size: int) -> Draw:
    radius = max(2.0, rng.uniform(0.012, 0.03) * size)
    center = rng.uniform(radius + 2, size - radius - 2, 2)
    rows, cols = np.mgrid[:size, :size]
    distance = np.hypot(rows - center[0], cols - center[1])
    shape = distance <= radius + 1
    depth = np.clip((radius + 1 - distance) / 2.0, 0.0, 1.0)[..., None]  # soft edge
    return clean * (1 - depth * (1 - rng.uniform(0.35, 0.6))), shape


def _patch(rng: np.random.Generator, clean: np.ndarray, size: int) -> Draw:
    shape = _blob_inside(rng, size, 0.06, 0.15)
    if not shape.any():
        return None
    inside = ndimage.gaussian_filter(shape.astype(np.float64), sigma=max(1.0, 0.01 * size))[..., None]
    shift = rng.uniform(0.08, 0.18) * (1 if rng.random() < 0.5 else -1)
    return np.clip(clean * (1 + shift * inside), 0, 255), shape


def _cutpaste(rng: np.random.Generator, clean: np.ndarray, donor: np.ndarray, size: int) -> Draw:
    side = rng.uniform(0.08, 0.22) * size
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    height = int(np.clip(round(side * math.sqrt(aspect)), 3, size // 2))
    width = int(np.clip(round(side / math.sqrt(aspect)), 3, size // 2))
    top, left = int(rng.integers(0, size - height + 1)), int(rng.integers(0, size - width + 1))
    patch = np.rot90(donor[top:top + height, left:left + width], int(rng.integers(4)))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    ph, pw = patch.shape[:2]
    to_top, to_left = int(rng.integers(0, size - ph + 1)), int(rng.integers(0, size - pw + 1))
    # "another place": the paste must move by at least half the patch, else a similar donor could
    # put back nearly the same pixels
    if max(abs(to_top - top), abs(to_left - left)) < max(ph, pw) / 2:
        return None
    modified = clean.copy()
    modified[to_top:to_top + ph, to_left:to_left + pw] = patch
    shape = np.zeros((size, size), dtype=bool)
    shape[to_top:to_top + ph, to_left:to_left + pw] = True
    return modified, shape


def _pick_donor(rng: np.random.Generator, target: np.ndarray, donors: np.ndarray, own: int | None) -> int:
    """A donor other than the target: never its own index, nor a donor with the very same pixels."""
    candidates = [d for d in range(donors.shape[0]) if d != own]
    rng.shuffle(candidates)
    for d in candidates:
        if not np.array_equal(donors[d], target):
            return d
    raise InputError("cutpaste needs a donor image that differs from the image it is pasted on; give donors "
                     "(other normal images) or at least 2 different images, or leave 'cutpaste' out of kinds")


def _window(place: np.random.Generator, height: int, width: int) -> tuple[slice, slice]:
    """An S x S window (S the short side) of an ``height x width`` image: the whole of a square one,
    else at a random place along the long side."""
    size = min(height, width)
    top = int(place.integers(0, height - size + 1)) if height > size else 0
    left = int(place.integers(0, width - size + 1)) if width > size else 0
    return slice(top, top + size), slice(left, left + size)


def _in_image(drawn: tuple[np.ndarray, np.ndarray], clean: np.ndarray,
              window: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """A defect drawn in ``window`` as a whole-image (modified image, shape) pair."""
    if drawn[1].shape == clean.shape[:2]:
        return drawn
    modified, shape = clean.copy(), np.zeros(clean.shape[:2], dtype=bool)
    modified[window], shape[window] = drawn[0], drawn[1]
    return modified, shape


_DRAW = {"scratch": _scratch, "hole": _hole, "stain": _stain, "crack": _crack, "blowhole": _blowhole, "patch": _patch}


# ----- the set ------------------------------------------------------------------------------------------------
def synthesize_defects(images: np.ndarray | torch.Tensor, donors: np.ndarray | torch.Tensor | None = None,
                       per_image: int = 2, seed: int = 0, kinds: Sequence[str] = SYNTHETIC_KINDS) -> SyntheticSet:
    """Draw ``per_image`` synthetic defects on copies of each image, with exact masks.

    Args:
        images: the clean normal images: uint8 ``(N, H, W, 3)`` or float ``(N, 3, H, W)`` in [0, 1].
        donors: normal images that ``cutpaste`` cuts its patches from (same forms and size). None:
            the other images of ``images`` (never an image itself).
        per_image: defects per image; defect ``j`` of image ``i`` has kind
            ``kinds[(i * per_image + j) % len(kinds)]``, so kinds are spread evenly.
        seed: the same seed (and inputs) gives identical defects. Must be >= 0.
        kinds: which of :data:`SYNTHETIC_KINDS` to draw.

    Returns:
        a :class:`SyntheticSet` of ``N * per_image`` images, ordered by image then defect.

    Raises:
        InputError: bad images, donors, kinds, ``per_image`` or seed; or no usable donor for cutpaste.
        DatasetError: no visible defect could be placed on an image in :data:`MAX_TRIES` draws
            (a nearly uniform image).
    """
    clean = to_uint8_images(images, "images")
    height, width = clean.shape[1:3]
    size = min(height, width)  # defects are drawn in an S x S window (the whole of a square image)
    same_set = donors is None or donors is images
    donor_stack = clean if same_set else to_uint8_images(donors, "donors")
    if donor_stack.shape[1:3] != clean.shape[1:3]:
        raise InputError(f"donors are {donor_stack.shape[1:3]} px but the images {clean.shape[1:3]} px; load both at "
                         f"one size")
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in SYNTHETIC_KINDS]
    if not kinds or unknown:
        raise InputError(f"unknown synthetic defect kinds {unknown or '(none given)'}; choose from {SYNTHETIC_KINDS}")
    if per_image < 1:
        raise InputError(f"per_image must be >= 1, got {per_image}")
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    float_sources = torch.is_tensor(images)
    min_area = min_defect_area(size)
    out_images, out_masks, out_kinds, out_sources, out_donors = [], [], [], [], []
    for i in range(clean.shape[0]):
        target = clean[i]
        target_f = target.astype(np.float64)
        for j in range(per_image):
            kind = kinds[(i * per_image + j) % len(kinds)]
            rng = np.random.default_rng([int(seed), i, j])
            place = np.random.default_rng([int(seed), i, j, 1])  # the window's own draws: rng's stay as on squares
            for _ in range(MAX_TRIES):
                donor = -1
                window = _window(place, height, width)
                if kind == "cutpaste":
                    donor = _pick_donor(rng, target, donor_stack, i if same_set else None)
                    drawn = _cutpaste(rng, target_f[window], donor_stack[donor][window].astype(np.float64), size)
                else:
                    drawn = _DRAW[kind](rng, target_f[window], size)
                if drawn is None:  # left the image, or pasted back onto its own place
                    continue
                drawn = _in_image(drawn, target_f, window)
                damaged, mask = keep_visible(target, drawn[0], drawn[1])
                # too small, or mostly invisible (a patch of belt pasted on belt): draw again
                if mask.sum() >= max(min_area, MIN_VISIBLE_FRACTION * drawn[1].sum()):
                    break
            else:
                raise DatasetError(f"could not place a visible {kind} defect on image {i} in {MAX_TRIES} draws: "
                                   f"the image is nearly uniform where defects land (or its donors look like it); "
                                   f"leave {kind!r} out of kinds for this line")
            mask_t = torch.from_numpy(mask)
            if float_sources:  # keep the source's exact float pixels outside the defect
                picture = images[i].detach().float().cpu().clone()
                picture[:, mask_t] = torch.from_numpy(damaged[mask]).float().T / 255.0
            else:
                picture = torch.from_numpy(damaged).permute(2, 0, 1).float() / 255.0
            out_images.append(picture)
            out_masks.append(mask_t)
            out_kinds.append(kind)
            out_sources.append(i)
            out_donors.append(donor)
    empty = len(out_images) == 0
    return SyntheticSet(
        images=torch.zeros(0, 3, height, width) if empty else torch.stack(out_images),
        masks=torch.zeros(0, height, width, dtype=torch.bool) if empty else torch.stack(out_masks),
        labels=torch.ones(len(out_kinds), dtype=torch.long),
        kinds=out_kinds, sources=out_sources, donors=out_donors)
