"""The review station's pictures of one kept part, drawn for an operator who judges it in seconds.

- ``map``: the anomaly map alone, on the model's fixed colour scale (0 .. 2 x threshold, see
  :func:`redi.core.visualize.display_range`; the page's colour bar names the range and marks the
  threshold in its middle).
- ``overlay``: the map over the part, faint where the map is below the threshold and strong where
  it is above, with the above-threshold region outlined in cyan: the hot spot is what catches
  the eye, not a uniform tint.
- ``mask``: the region above the threshold on the part itself: the rest dimmed, the region at full
  brightness with a red outline. When no pixel is above the threshold it says so in the picture
  (an all-black or all-white tile looks like a picture that failed to load).
- ``threshold_mask``: the same region as a plain white-on-black mask at the image's size: where
  the page's mask editor starts (the operator corrects it with a brush and an eraser).

A drawn mask comes back as a PNG data URL (:func:`drawn_mask_png`): checked, made binary, and
stored with the verdict.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from redi.core.visualize import DEFAULT_CMAP, _font, display_range, heatmap_rgb, mask_contour, resize_map

PICTURES = ("image", "map", "overlay", "mask", "threshold_mask")
NO_REGION_TEXT = "no pixel above the threshold"
_FAINT, _STRONG = 0.25, 0.75  # the map's weight in the overlay below / above the threshold
_CYAN, _RED = (0, 255, 255), (255, 40, 40)


def colour_stops(n: int = 9, cmap: str = DEFAULT_CMAP) -> list[str]:
    """``n`` CSS colours evenly along the colormap (the page's colour bar, same scale as the pictures)."""
    rgb = heatmap_rgb(np.linspace(0.0, 1.0, n, dtype=np.float32)[None, :], 0.0, 1.0, cmap)[0]
    return [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in rgb.tolist()]


def _outline_px(shape: tuple[int, ...]) -> int:
    """An outline a few screen pixels wide once the page shrinks the picture to ~230 px."""
    return max(1, round(max(shape[:2]) / 150))


def render(what: str, rgb: np.ndarray, amap: np.ndarray, threshold: float) -> np.ndarray:
    """The ``map``, ``overlay`` or ``mask`` picture (uint8 RGB at the image's size)."""
    vmin, vmax = display_range(threshold, amap)
    full = resize_map(amap, rgb.shape[:2])
    above = full > threshold
    if what == "map":
        return heatmap_rgb(full, vmin, vmax)
    if what == "threshold_mask":
        return np.repeat((above.astype(np.uint8) * 255)[..., None], 3, axis=2)
    if what == "overlay":
        weight = np.where(above, _STRONG, _FAINT)[..., None].astype(np.float32)
        heat = heatmap_rgb(full, vmin, vmax).astype(np.float32)
        blended = np.clip(np.rint((1.0 - weight) * rgb.astype(np.float32) + weight * heat), 0, 255).astype(np.uint8)
        return mask_contour(blended, above, _CYAN, _outline_px(rgb.shape)) if above.any() else blended
    if what == "mask":
        dimmed = (rgb.astype(np.float32) * 0.35).astype(np.uint8)
        if not above.any():
            return _with_text(dimmed, NO_REGION_TEXT)
        shown = np.where(above[..., None], rgb, dimmed)
        return mask_contour(shown, above, _RED, _outline_px(rgb.shape))
    raise ValueError(f"no picture {what!r}: one of {PICTURES}")


def drawn_mask_png(data_url: str, width: int, height: int) -> bytes:
    """The operator's drawn mask (``data:image/png;base64,...`` from the page's canvas) as a binary
    8-bit PNG (0 / 255) of the image's size: painted (opaque, non-black) pixels are the defect.

    Raises:
        ValueError: not a PNG data URL, another size than the image, or nothing drawn.
    """
    import base64
    import binascii
    import io

    prefix = "data:image/png;base64,"
    if not data_url.startswith(prefix):
        raise ValueError("the drawn mask is not a PNG data URL (data:image/png;base64,...)")
    try:
        drawn = Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix):], validate=True)))
        drawn.load()
    except (binascii.Error, OSError) as exc:
        raise ValueError(f"the drawn mask is not a readable PNG ({exc})") from exc
    if drawn.size != (width, height):
        raise ValueError(f"the drawn mask is {drawn.size[0]}x{drawn.size[1]} px, the image {width}x{height}: "
                         f"reload the page and draw again")
    rgba = np.asarray(drawn.convert("RGBA"))
    painted = (rgba[..., 3] > 127) & (rgba[..., :3].max(axis=2) > 127)
    if not painted.any():
        raise ValueError("the drawn mask is empty: paint the defect, or close the mask editor to judge without one")
    buffer = io.BytesIO()
    Image.fromarray(painted.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _with_text(rgb: np.ndarray, text: str) -> np.ndarray:
    """The picture with ``text`` centred on it in white on a dark band."""
    canvas = Image.fromarray(rgb)
    draw = ImageDraw.Draw(canvas)
    font = _font(max(10, canvas.width // 14))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x, y = max(2, (canvas.width - (right - left)) / 2), (canvas.height - (bottom - top)) / 2 - top
    draw.rectangle((0, y + top - 4, canvas.width, y + bottom + 4), fill=(0, 0, 0))
    draw.text((x, y), text, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


__all__ = ["NO_REGION_TEXT", "PICTURES", "colour_stops", "drawn_mask_png", "render"]
