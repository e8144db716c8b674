"""Pictures of anomaly maps: heatmaps, overlays, ground-truth outlines, defect boxes, PNG bytes.

numpy and Pillow only (matplotlib's colormap registry, no pyplot figure, no torch), so the HTML
report, ``redi predict`` and the BentoML service draw the same pictures.

Colour scale (why it is fixed per model): an anomaly map scaled to its own min/max always
shows a "hot spot", so every normal image would look defective. Here the scale is
``vmin = 0`` and ``vmax = 2 x the decision threshold`` (see :func:`display_range`): the map of
a normal image stays in the lower half of the colormap (the threshold is the top of the
held-out normal scores, i.e. the middle colour), and only a map that crosses the threshold
reaches the upper, hot half. Values above ``vmax`` saturate. Without a calibrated threshold
the scale falls back to ``[0, max of the maps shown]``. Every function takes ``vmin`` / ``vmax``
so a caller can choose otherwise.

Conventions: RGB pictures are ``uint8`` arrays ``(H, W, 3)``; maps are float ``(H, W)``;
boxes are pixel coordinates with ``x0, y0`` inclusive and ``x1, y1`` exclusive (slice style).
"""

from __future__ import annotations

import io
import math
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from redi.core.errors import InputError
from redi.core.images import resize_mask, resize_rgb

DEFAULT_CMAP = "inferno"  # perceptually uniform and readable in greyscale print
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # same region rule as redi.core.metrics' AUPRO
CAPTION_HEIGHT = 16
GREY = (128, 128, 128)


# ----------------------------------------------------------------------------- checks
def _check_rgb(rgb: np.ndarray, name: str = "image") -> np.ndarray:
    """Return ``rgb`` as a uint8 (H, W, 3) array or raise InputError naming the problem."""
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"{name} must be a uint8 RGB array (H, W, 3), got {arr.dtype} {arr.shape}; "
                         f"convert floats in [0, 1] with (x * 255).round().astype(np.uint8)")
    return arr


def _check_map(anomaly_map: np.ndarray) -> np.ndarray:
    """Return the map as float32 (H, W) or raise InputError."""
    arr = np.asarray(anomaly_map, dtype=np.float32)
    if arr.ndim != 2:
        raise InputError(f"an anomaly map must be 2-D (H, W), got shape {arr.shape}; squeeze batch/channel axes")
    return arr


# ----------------------------------------------------------------------------- colour scale
def display_range(threshold: float | None, maps: np.ndarray | None = None, factor: float = 2.0) -> tuple[float, float]:
    """The fixed colour scale ``(vmin, vmax)`` for one model's maps (see the module docstring).

    ``vmin = 0``; ``vmax = factor x threshold`` when the threshold is finite and positive, else
    the maximum of ``maps`` (any shape), else 1.
    """
    if threshold is not None and math.isfinite(float(threshold)) and float(threshold) > 0:
        return 0.0, float(factor) * float(threshold)
    if maps is not None:
        arr = np.asarray(maps, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        if finite.size and finite.max() > 0:
            return 0.0, float(finite.max())
    return 0.0, 1.0


@lru_cache(maxsize=8)
def _lut(cmap: str) -> np.ndarray:
    """256-entry uint8 RGB lookup table of a matplotlib colormap."""
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError as exc:
        raise InputError(f"unknown colormap {cmap!r}; use a matplotlib name such as 'inferno' or 'jet'") from exc
    return (colormap(np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def heatmap_rgb(anomaly_map: np.ndarray, vmin: float, vmax: float, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """Colour an (H, W) map: ``vmin`` -> the colormap's first colour, ``vmax`` (and above) -> its last.

    NaN values are drawn as ``vmin``. Returns uint8 (H, W, 3).
    """
    values = _check_map(anomaly_map)
    span = float(vmax) - float(vmin)
    if not math.isfinite(span) or span <= 0:
        raise InputError(f"the colour scale needs vmax > vmin, got vmin={vmin}, vmax={vmax}")
    scaled = np.nan_to_num((values - float(vmin)) / span, nan=0.0, posinf=1.0, neginf=0.0)
    index = np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)
    return _lut(cmap)[index]


def resize_map(anomaly_map: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to ``(H, W)`` (Pillow's 32-bit float mode)."""
    values = _check_map(anomaly_map)
    if values.shape == tuple(hw):
        return values
    image = Image.fromarray(np.ascontiguousarray(values), mode="F")
    return np.asarray(image.resize((int(hw[1]), int(hw[0])), Image.Resampling.BILINEAR), dtype=np.float32)


def overlay(image_rgb: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5,
            cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """Blend the coloured map over the image: ``(1 - alpha) * image + alpha * heatmap``.

    The map is resized (bilinear) to the image when the sizes differ. Returns uint8 (H, W, 3).
    """
    image = _check_rgb(image_rgb)
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    heat = heatmap_rgb(resize_map(anomaly_map, image.shape[:2]), vmin, vmax, cmap)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * heat.astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- outlines and regions
def mask_contour(image_rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0),
                 thickness: int = 1) -> np.ndarray:
    """Draw the outline of a bool mask on a copy of the image (mask resized if sizes differ).

    The outline is the mask's pixels that touch a non-mask pixel (or the border), widened by
    ``thickness - 1`` pixels inwards, so the defect itself stays visible.
    """
    image = _check_rgb(image_rgb).copy()
    region = np.asarray(mask).astype(bool)
    if region.ndim != 2:
        raise InputError(f"a mask must be 2-D (H, W), got shape {region.shape}")
    if region.shape != image.shape[:2]:
        region = resize_mask(region, image.shape[:2])
    inner = ndimage.binary_erosion(region, structure=_EIGHT_CONNECTED, iterations=max(1, thickness),
                                   border_value=0)
    image[region & ~inner] = colour
    return image


def defect_regions(anomaly_map: np.ndarray, threshold: float, min_area: int = 16) -> list[dict]:
    """Bounding boxes of the connected regions (8-connectivity) where ``map > threshold``.

    Regions smaller than ``min_area`` pixels are dropped (speckle). Each region is a dict
    ``{x0, y0, x1, y1, area, max_score}`` (``x1``/``y1`` exclusive), sorted by ``max_score``,
    highest first.
    """
    values = _check_map(anomaly_map)
    labels, count = ndimage.label(values > float(threshold), structure=_EIGHT_CONNECTED)
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    areas = ndimage.sum_labels(np.ones_like(values), labels, index)
    peaks = ndimage.maximum(values, labels, index)
    regions = []
    for slices, area, peak in zip(ndimage.find_objects(labels), areas, peaks):
        if area < min_area:
            continue
        rows, cols = slices
        regions.append({"x0": int(cols.start), "y0": int(rows.start), "x1": int(cols.stop), "y1": int(rows.stop),
                        "area": int(area), "max_score": float(peak)})
    return sorted(regions, key=lambda r: r["max_score"], reverse=True)


def draw_boxes(image_rgb: np.ndarray, regions: Sequence[dict], colour: tuple[int, int, int] = (0, 255, 255),
               scale: float = 1.0) -> np.ndarray:
    """Draw region boxes (as :func:`defect_regions` returns them) on a copy of the image.

    ``scale`` maps the boxes' coordinates to this image (e.g. image width / map width).
    """
    image = Image.fromarray(_check_rgb(image_rgb).copy())
    draw = ImageDraw.Draw(image)
    for r in regions:
        x0, y0 = r["x0"] * scale, r["y0"] * scale
        x1, y1 = r["x1"] * scale - 1, r["y1"] * scale - 1  # PIL's rectangle corners are inclusive
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=colour, width=1)
    return np.asarray(image)


# ----------------------------------------------------------------------------- tiles and strips
@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled default font (a scalable one on Pillow >= 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: fixed-size bitmap font
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """Shorten ``text`` with an ellipsis until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def caption_tile(rgb: np.ndarray, caption: str, height: int = CAPTION_HEIGHT) -> np.ndarray:
    """The picture with a one-line caption bar (white on black) below it."""
    image = _check_rgb(rgb)
    canvas = Image.new("RGB", (image.shape[1], image.shape[0] + height), (0, 0, 0))
    canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font(max(8, height - 5))
    draw.text((3, image.shape[0] + 2), _fit_text(draw, caption, image.shape[1] - 6, font), fill=(255, 255, 255),
              font=font)
    return np.asarray(canvas)


def placeholder_tile(size: int | tuple[int, int], text: str, colour: tuple[int, int, int] = GREY) -> np.ndarray:
    """A plain grey tile with centred text, for a picture that does not exist (e.g. no prompt)."""
    height, width = (size, size) if isinstance(size, int) else size
    canvas = Image.new("RGB", (int(width), int(height)), colour)
    draw = ImageDraw.Draw(canvas)
    font = _font(max(10, int(height) // 12))
    text = _fit_text(draw, text, int(width) - 6, font)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((width - (right - left)) / 2, (height - (bottom - top)) / 2 - top), text, fill=(255, 255, 255),
              font=font)
    return np.asarray(canvas)


def strip(tiles: Sequence[tuple[np.ndarray, str]], tile_size: int | None = None, gap: int = 2) -> np.ndarray:
    """Captioned tiles side by side: ``[(rgb, caption), ...]`` -> one uint8 picture.

    Each tile is resized to the first tile's shape, scaled to a height of ``tile_size`` (default:
    the first tile's height): square tiles for square inputs, strips for a non-square canvas.
    """
    if not tiles:
        raise InputError("strip() needs at least one tile")
    first_h, first_w = _check_rgb(tiles[0][0]).shape[:2]
    height = tile_size or first_h
    size = (height, max(1, round(first_w * height / first_h)))
    pictures = [caption_tile(resize_rgb(_check_rgb(rgb, f"tile {caption!r}"), size), caption)
                for rgb, caption in tiles]
    height = pictures[0].shape[0]
    width = sum(p.shape[1] for p in pictures) + gap * (len(pictures) - 1)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for picture in pictures:
        canvas[:, x:x + picture.shape[1]] = picture
        x += picture.shape[1] + gap
    return canvas


# ----------------------------------------------------------------------------- files
def to_png_bytes(rgb: np.ndarray) -> bytes:
    """Encode a uint8 RGB array as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(_check_rgb(rgb)).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write a uint8 RGB array as a PNG file (parent folders are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_png_bytes(rgb))
    return path
