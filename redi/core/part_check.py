"""Does an image look like one of the line's parts at all? A hint for the review station.

A camera glitch (a black or white frame, an empty belt, a wrong crop, a 8x3000 strip, a 1x1
image) is not a defect and must never become training data. The service scores whatever it is
sent, so an image that is far off the line's parts is still flagged; this module lets the service
say so when it keeps the image, and the review page shows the reasons beside the card. It never
decides anything: the operator's verdict (``bad_image`` among them) does.

The line's *part profile* is the range of a few whole-image statistics over its normal training
images, stored in the detector's calibration metadata (``calibration.part_profile``):

- ``aspect`` (width / height) and ``short_side`` / ``long_side`` in pixels;
- ``brightness`` (mean luminance in [0, 1]) and ``contrast`` (its standard deviation), computed as
  the production log computes them (:func:`luminance_features`).

An image is *unlike the line's parts* when a statistic lies far outside that range: the margins
are wide on purpose (a real defect changes a part's whole-image brightness by a few hundredths, a
glitch by tenths), and they are fixed here, never tuned on test labels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image
from scipy import ndimage

from redi.core.errors import InputError

FEATURE_SIZE = 256  # whole-image statistics are taken on the image resized to this square
ASPECT_FACTOR = 1.5  # an aspect ratio this far beyond the line's range (either way) is unlike a part
SIDE_FACTOR = 4.0  # a side this many times shorter (or longer) than the line's shortest (longest) one
BRIGHTNESS_MARGIN = 0.15  # at least this much mean luminance beyond the line's range
CONTRAST_FACTOR = 4.0  # contrast this many times below the line's lowest (or above its highest)


def luminance_features(rgb_uint8: np.ndarray) -> dict[str, float]:
    """Brightness, contrast and sharpness of a uint8 RGB image, on the image resized to
    ``FEATURE_SIZE`` x ``FEATURE_SIZE``: mean luminance (ITU-R BT.601 weights) in ``[0, 1]``, its
    standard deviation, and the variance of its Laplacian (a blur lowers it)."""
    arr = np.asarray(rgb_uint8)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"expected a uint8 RGB image (H, W, 3), got {arr.dtype} {arr.shape}; "
                         f"read files with redi.core.images.load_rgb")
    if arr.shape[:2] != (FEATURE_SIZE, FEATURE_SIZE):
        arr = np.asarray(Image.fromarray(arr).resize((FEATURE_SIZE, FEATURE_SIZE), Image.Resampling.BILINEAR))
    grey = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
    return {"brightness": float(grey.mean()), "contrast": float(grey.std()),
            "sharpness": float(ndimage.laplace(grey * 255.0, mode="reflect").var())}


def image_statistics(rgb_uint8: np.ndarray) -> dict[str, float]:
    """The statistics a part profile ranges over, of one uint8 RGB image."""
    height, width = int(rgb_uint8.shape[0]), int(rgb_uint8.shape[1])
    stats = luminance_features(rgb_uint8)
    return {"width": float(width), "height": float(height), "brightness": stats["brightness"],
            "contrast": stats["contrast"]}


@dataclass(frozen=True)
class PartProfile:
    """The range of the whole-image statistics over a line's normal training images."""

    n_images: int
    aspect: tuple[float, float]
    short_side: tuple[float, float]
    long_side: tuple[float, float]
    brightness: tuple[float, float]
    contrast: tuple[float, float]

    @classmethod
    def from_statistics(cls, rows: Iterable[Mapping[str, float]]) -> "PartProfile":
        """The profile of these images' statistics (:func:`image_statistics` of each)."""
        rows = list(rows)
        if not rows:
            raise InputError("a part profile needs at least one normal image")

        def span(values: Iterable[float]) -> tuple[float, float]:
            values = list(values)
            return (float(min(values)), float(max(values)))

        return cls(n_images=len(rows),
                   aspect=span(r["width"] / r["height"] for r in rows),
                   short_side=span(min(r["width"], r["height"]) for r in rows),
                   long_side=span(max(r["width"], r["height"]) for r in rows),
                   brightness=span(r["brightness"] for r in rows),
                   contrast=span(r["contrast"] for r in rows))

    @classmethod
    def from_images(cls, images: Iterable[np.ndarray]) -> "PartProfile":
        """The profile of these uint8 RGB images."""
        return cls.from_statistics(image_statistics(rgb) for rgb in images)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for the detector's metadata, which is loaded weights-only)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PartProfile":
        """The profile stored by :meth:`to_dict`; a malformed one is an :class:`InputError`."""
        try:
            return cls(n_images=int(data["n_images"]),
                       **{name: (float(data[name][0]), float(data[name][1]))
                          for name in ("aspect", "short_side", "long_side", "brightness", "contrast")})
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InputError(f"a stored part profile is malformed ({exc!r}); retrain the line to rebuild it") from exc

    def unlike_reasons(self, stats: Mapping[str, float]) -> list[str]:
        """Why an image with these statistics does not look like one of the line's parts ([] when it does)."""
        width, height = float(stats["width"]), float(stats["height"])
        reasons = []
        aspect = width / height
        low, high = self.aspect
        if math.log(aspect) < math.log(low) - math.log(ASPECT_FACTOR) or \
                math.log(aspect) > math.log(high) + math.log(ASPECT_FACTOR):
            reasons.append(f"its shape {int(width)}x{int(height)} (aspect {aspect:.2f}) is far from the line's "
                           f"parts (aspect {_range(self.aspect, '.2f')})")
        short, long = min(width, height), max(width, height)
        if short < self.short_side[0] / SIDE_FACTOR or long > self.long_side[1] * SIDE_FACTOR:
            reasons.append(f"its size {int(width)}x{int(height)} px is far from the line's parts (short side "
                           f"{_range(self.short_side, '.0f')} px, long side {_range(self.long_side, '.0f')} px)")
        brightness, (b_low, b_high) = float(stats["brightness"]), self.brightness
        margin = max(BRIGHTNESS_MARGIN, b_high - b_low)
        if brightness < b_low - margin or brightness > b_high + margin:
            reasons.append(f"its mean brightness {brightness:.2f} is far from the line's parts "
                           f"({_range(self.brightness, '.2f')})")
        contrast, (c_low, c_high) = float(stats["contrast"]), self.contrast
        if contrast < c_low / CONTRAST_FACTOR or contrast > c_high * CONTRAST_FACTOR:
            reasons.append(f"its contrast {contrast:.3f} is far from the line's parts ({_range(self.contrast, '.3f')})"
                           + (": an almost uniform picture" if contrast < c_low / CONTRAST_FACTOR else ""))
        return reasons


def _range(span: tuple[float, float], fmt: str) -> str:
    low, high = span
    return f"{low:{fmt}}" if f"{low:{fmt}}" == f"{high:{fmt}}" else f"{low:{fmt}}-{high:{fmt}}"


def unlike_line(profile: Mapping[str, Any] | None, stats: Mapping[str, float]) -> list[str]:
    """:meth:`PartProfile.unlike_reasons` of a stored profile; [] when the model has none (an older model)."""
    if not profile:
        return []
    return PartProfile.from_dict(profile).unlike_reasons(stats)
