"""Reading images and masks from disk or bytes: the one place where pixels enter redi.

Every image, whatever its file mode, comes out as ``uint8`` RGB ``(H, W, 3)``; every mask as a
``bool`` ``(H, W)`` array. The conversions (documented here once, relied on everywhere):

- grey (``L``, ``1``) is repeated into three channels;
- images with alpha (``LA``, ``RGBA``, ``PA``, palette with transparency) are composited on
  black: ``rgb * alpha / 255``. Fully transparent pixels carry no defined colour, and black is
  what a camera would see with nothing in front of it;
- palette (``P``) images are expanded through their palette;
- 16-bit images (``I;16*``) are scaled to 8 bits by dividing by 257 (65535 -> 255, rounded);
- 32-bit integer images (``I``) whose values lie in 0..65535 are treated as 16-bit (divided by
  257); any other range is scaled linearly from its min..max to 0..255 (per image, as there is
  no other reference for such files). Float images (``F``) in 0..1 are multiplied by 255, others
  are scaled min..max the same way;
- ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` are converted to RGB by Pillow;
- multi-frame files (GIF, TIFF) give their first frame;
- EXIF orientation is deliberately NOT applied: masks are drawn on the stored pixel grid, so
  rotating the image alone would misalign them.

Files are fully decoded (``Image.load()``), so a truncated PNG or JPEG fails here with an
:class:`~redi.core.errors.ImageReadError` naming the file, not later inside a training loop. Pillow's
``LOAD_TRUNCATED_IMAGES`` is never enabled.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from redi.core.errors import DatasetError, ImageReadError, InputError

ASPECTS = ("squash", "letterbox", "native")  # how an image reaches the model's input (data.aspect)
CANVAS_STRIDE = 32  # a native canvas's sides are multiples of the backbones' largest stride
MAX_CANVAS_ASPECT = 4  # a native canvas's long side is at most 4 times its short side

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_FIX = ("re-export or re-copy the file (or remove it, or set data.skip_bad_files=true to skip "
        "bad files and list them)")


def _scale_wide(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a 16-bit / 32-bit / float single-channel array to uint8 (see module docstring)."""
    if mode.startswith("I;16"):
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    values = arr.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if mode == "I" and low >= 0 and high <= 65535:
        return np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    if mode == "F" and low >= 0 and high <= 1:
        return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
    if high <= low:  # a constant image: nothing to scale, keep it black
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.clip(np.rint((values - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)


def _composite_on_black(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8 with colour multiplied by alpha (black background)."""
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    return ((rgb * alpha + 127) // 255).astype(np.uint8)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """Convert a loaded Pillow image of any mode to uint8 RGB (H, W, 3)."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _scale_wide(np.asarray(image), mode)
        return np.repeat(grey[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in image.info)
    if has_alpha:
        return _composite_on_black(np.asarray(image.convert("RGBA"), dtype=np.uint8))
    if mode == "1":
        image = image.convert("L")
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _pil_to_mask(image: Image.Image) -> np.ndarray:
    """Convert a loaded Pillow image to a bool mask: any non-zero colour value is defect."""
    mode = image.mode
    if mode == "P":  # palette index 0 need not be black: look at the colours
        image = image.convert("RGB")
        mode = "RGB"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):  # the alpha channel is not the label
        image = image.convert("RGB" if mode in ("RGBA", "RGBa", "PA") else "L")
    arr = np.asarray(image)
    if arr.ndim == 3:
        return np.any(arr > 0, axis=2)
    return arr > 0


def _open_and_load(source, name: str) -> Image.Image:
    """Open and fully decode an image; any failure becomes an ImageReadError naming the file."""
    try:
        image = Image.open(source)
        image.load()
    except FileNotFoundError as exc:
        raise ImageReadError(f"image file {name} does not exist; check the path") from exc
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"image file {name} is too large to decode safely ({exc}); "
                             f"resize it before use") from exc
    # Pillow's decoders raise many types (OSError for truncation, SyntaxError for broken PNG
    # chunks, ValueError, EOFError, struct.error...): all mean "cannot read this file".
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(f"cannot read image file {name}: {type(exc).__name__}: {exc}; "
                             f"the file is corrupt, truncated or not an image; {_FIX}") from exc
    return image


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 RGB ``(H, W, 3)`` (conversions: see the module docstring).

    Raises:
        ImageReadError: the file is missing, unreadable, truncated or not an image.
    """
    path = Path(path)
    image = _open_and_load(path, str(path))
    try:
        return _pil_to_rgb(image)
    finally:
        image.close()


def load_mask(path: str | Path, expected_hw: tuple[int, int] | None = None,
              image_path: str | Path | None = None) -> np.ndarray:
    """Read a ground-truth mask as bool ``(H, W)``; any value > 0 (in any channel) is defect.

    Args:
        path: the mask file.
        expected_hw: the (height, width) of the image the mask belongs to; checked when given.
        image_path: that image's file, only used to name it in the error message.

    Raises:
        ImageReadError: the mask file cannot be read.
        DatasetError: the mask's size differs from ``expected_hw``.
    """
    path = Path(path)
    image = _open_and_load(path, str(path))
    try:
        mask = _pil_to_mask(image)
    finally:
        image.close()
    if expected_hw is not None and tuple(mask.shape) != tuple(expected_hw):
        of_image = f" of image {image_path}" if image_path is not None else ""
        raise DatasetError(
            f"mask {path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image{of_image} is "
            f"{expected_hw[1]}x{expected_hw[0]}; masks must have exactly the image's size - "
            f"re-export the mask at the image's resolution")
    return mask


def image_size_of(path: str | Path) -> tuple[int, int]:
    """Return ``(height, width)`` from the file header without decoding the pixels.

    Raises:
        ImageReadError: the file cannot be opened as an image.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError as exc:
        raise ImageReadError(f"image file {path} does not exist; check the path") from exc
    except Exception as exc:  # noqa: BLE001 - see _open_and_load
        raise ImageReadError(f"cannot read image file {path}: {type(exc).__name__}: {exc}; "
                             f"{_FIX}") from exc
    return height, width


def decode_rgb(data: bytes, max_pixels: int | None = None, name: str = "<uploaded bytes>") -> np.ndarray:
    """Decode image bytes (e.g. an HTTP upload) to uint8 RGB ``(H, W, 3)``, like :func:`load_rgb`.

    Args:
        data: the encoded file content (PNG, JPEG, BMP, TIFF, ...).
        max_pixels: refuse images with more than this many pixels; checked from the header
            before any pixel is decoded, so an oversized upload costs no memory.
        name: how to name the input in error messages.

    Raises:
        InputError: the image has more than ``max_pixels`` pixels.
        ImageReadError: the bytes are not a readable image.
    """
    if not data:
        raise ImageReadError(f"{name} is empty; send the bytes of an image file (PNG, JPEG, ...)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise InputError(f"{name} is too large ({exc}); send a smaller image") from exc
    except Exception as exc:  # noqa: BLE001 - see _open_and_load
        raise ImageReadError(f"cannot read {name}: {type(exc).__name__}: {exc}; "
                             f"send a complete PNG, JPEG, BMP or TIFF file") from exc
    try:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise InputError(f"{name} is {width}x{height} = {width * height} pixels, more than the "
                             f"limit of {max_pixels}; send a smaller image")
        try:
            image.load()
        except Exception as exc:  # noqa: BLE001 - see _open_and_load
            raise ImageReadError(f"cannot read {name}: {type(exc).__name__}: {exc}; the image is "
                                 f"corrupt or truncated; send a complete file") from exc
        return _pil_to_rgb(image)
    finally:
        image.close()


def size_hw(size: int | tuple[int, int] | Sequence[int]) -> tuple[int, int]:
    """Normalise a size argument (S, or ``(height, width)``) to ``(height, width)``."""
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    height, width = int(size[0]), int(size[1])
    if height <= 0 or width <= 0:
        raise InputError(f"resize size must be positive, got {size}")
    return height, width


def _check_rgb(image: np.ndarray, what: str) -> None:
    """Raise an InputError unless ``image`` is a uint8 ``(H, W, 3)`` array."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputError(f"{what} expects uint8 RGB arrays (H, W, 3), got {got}; read files with "
                         f"redi.core.images.load_rgb or decode bytes with redi.core.images.decode_rgb")


def _resize_float(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The one image resize: antialiased bilinear on a float ``(1, 3, H, W)`` tensor in [0, 1].

    torch's antialiased bilinear widens the triangle filter by the scale factor when shrinking
    (as Pillow's BILINEAR does), so fine defects are averaged, not aliased. It stays in float, so
    the model sees no second 8-bit rounding. The weights are non-negative, so the result stays in
    [0, 1]; the clamp only guards against the last float ulp.
    """
    if tuple(tensor.shape[-2:]) == size:
        return tensor
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0.0, 1.0)


def _to_unit_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> float ``(1, 3, H, W)`` in [0, 1]."""
    if not (image.flags.c_contiguous and image.flags.writeable):  # torch wants writable memory
        image = np.array(image, order="C")
    return torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def check_aspect(aspect: str) -> str:
    """Return ``aspect`` when it is one of :data:`ASPECTS`, else raise an InputError
    that names the allowed values."""
    if aspect not in ASPECTS:
        raise InputError(f"aspect must be one of {ASPECTS} ('squash': resize to S x S, the shape is lost; "
                         f"'letterbox': scale the long side to S and pad with black, the shape is kept; "
                         f"'native': resize to the line's canvas, short side S, long side at the line's aspect), "
                         f"got {aspect!r}; set data.aspect in the line's config")
    return aspect


def native_canvas(image_hws: Sequence[tuple[int, int]], short_side: int) -> tuple[int, int]:
    """The input canvas ``(height, width)`` of a line for ``aspect="native"``, from its images' sizes.

    The short side is ``short_side`` (S); the long side is S times the median long/short ratio of
    the images, rounded to the nearest multiple of :data:`CANVAS_STRIDE` and kept within
    ``[S, MAX_CANVAS_ASPECT * S]``. The long side lies along the axis most images are long in (ties:
    wide). A square line gets ``(S, S)``, the same input as ``"squash"``; a 500 x 1260 strip at
    S = 256 gets 256 x 640 instead of losing 4 in 5 of its columns.

    Raises:
        InputError: no sizes, a size that is not positive, or S not a positive multiple of the stride.
    """
    if not image_hws:
        raise InputError("native_canvas needs the sizes of the line's training images, got none")
    if short_side <= 0 or short_side % CANVAS_STRIDE:
        raise InputError(f"the canvas's short side must be a positive multiple of {CANVAS_STRIDE}, got {short_side}")
    if any(int(h) <= 0 or int(w) <= 0 for h, w in image_hws):
        raise InputError(f"image sizes must be positive, got {[hw for hw in image_hws if min(hw) <= 0][:3]}")
    ratios = np.array([max(h, w) / min(h, w) for h, w in image_hws], dtype=np.float64)
    tall = sum(1 for h, w in image_hws if h > w) > sum(1 for h, w in image_hws if w > h)
    long_side = int(round(short_side * float(np.median(ratios)) / CANVAS_STRIDE)) * CANVAS_STRIDE
    long_side = min(max(long_side, short_side), MAX_CANVAS_ASPECT * short_side)
    return (long_side, short_side) if tall else (short_side, long_side)


def letterbox_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """Where an ``height x width`` image lands on the ``size x size`` letterbox canvas:
    ``(new_h, new_w, top, left)``.

    The long side becomes ``size``; the short side is scaled by the same factor and rounded to the
    nearest integer (halves up, at least 1). The box is centred; when the margin is odd, the extra
    pixel goes below / to the right. This is the one place the box is computed: images, masks and
    maps all use it, so they line up pixel-exactly.

    Raises:
        InputError: a size is not a positive integer.
    """
    values = (height, width, size)
    if not all(isinstance(v, (int, np.integer)) and v > 0 for v in values):
        raise InputError(f"letterbox_geometry needs positive integers (height, width, size), got {values}")
    height, width, size = int(height), int(width), int(size)
    long_side, short_side = max(height, width), min(height, width)
    # integer arithmetic: floor(short * size / long + 1/2), no float rounding surprises
    scaled = max(1, (2 * short_side * size + long_side) // (2 * long_side))
    new_h, new_w = (size, scaled) if height >= width else (scaled, size)
    return new_h, new_w, (size - new_h) // 2, (size - new_w) // 2


def _letterbox_size(size: int | tuple[int, int], what: str) -> int:
    """The side S of a square target; letterboxing onto a non-square canvas is not defined."""
    height, width = size_hw(size)
    if height != width:
        raise InputError(f"{what} with aspect='letterbox' needs a square size (an int S), got {size}; "
                         f"use aspect='squash' for a (h, w) target")
    return height


def _letterbox_float(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """Float ``(1, 3, H, W)`` -> ``(1, 3, S, S)``: :func:`_resize_float` to the letterbox box, on black."""
    new_h, new_w, top, left = letterbox_geometry(tensor.shape[-2], tensor.shape[-1], size)
    resized = _resize_float(tensor, (new_h, new_w))
    if new_h == size and new_w == size:
        return resized
    canvas = tensor.new_zeros(tensor.shape[0], tensor.shape[1], size, size)
    canvas[..., top:top + new_h, left:left + new_w] = resized
    return canvas


def _fit(tensor: torch.Tensor, size: tuple[int, int], aspect: str) -> torch.Tensor:
    """The resize every image goes through: squash to ``size`` or letterbox onto it."""
    if aspect == "letterbox":
        return _letterbox_float(tensor, size[0])
    return _resize_float(tensor, size)


def preprocess(images: Sequence[np.ndarray], image_size: int | tuple[int, int], aspect: str = "squash") -> torch.Tensor:
    """The one conversion of images to model input: uint8 RGB arrays of any size -> float
    ``(B, 3, H, W)`` in [0, 1], antialiased bilinear resize (see :func:`_resize_float`).
    ``image_size`` is S (``(S, S)``) or the model's ``(H, W)`` (``DataConfig.input_hw``).

    ``aspect`` (``data.aspect``): ``"squash"`` and ``"native"`` resize every image to ``(H, W)``
    (for ``"native"`` that is the line's own canvas, :func:`native_canvas`, so the line's shape is
    kept); ``"letterbox"`` scales it so its long side is S (shape kept, :func:`letterbox_geometry`)
    and centres it on a black (0) S x S canvas.

    Training, threshold calibration, evaluation, ``redi predict``, the service and the drift
    reference all go through this function, so a threshold is always applied to scores made the
    way it was calibrated. Each image is resized alone (images may differ in size).

    Raises:
        InputError: an element is not a uint8 ``(H, W, 3)`` array, ``image_size`` is not positive,
            or ``aspect`` is not one of :data:`ASPECTS`.
    """
    check_aspect(aspect)
    if isinstance(images, np.ndarray) and images.ndim == 3:
        raise InputError("preprocess expects a list of images, got one (H, W, 3) array; pass [image]")
    size = size_hw(image_size)
    if aspect == "letterbox":
        _letterbox_size(image_size, "preprocess")
    batch = []
    for image in images:
        _check_rgb(image, "preprocess")
        batch.append(_fit(_to_unit_tensor(image), size, aspect))
    return torch.cat(batch) if batch else torch.zeros(0, 3, *size)


def crop_to_content(array: np.ndarray, image_hw: tuple[int, int], aspect: str = "squash") -> np.ndarray:
    """The part of a model-space ``(H, W, ...)`` array (anomaly map, mask, input) that shows an
    image of size ``image_hw``: all of it for ``"squash"`` and ``"native"``, the letterbox box for ``"letterbox"``
    (the black padding covers no part of the image, so it is cut off before anything is mapped
    back to the image's pixels). Returns a view.

    Raises:
        InputError: ``aspect`` is unknown, or a letterbox array is not square.
    """
    check_aspect(aspect)
    if aspect != "letterbox":
        return array
    if array.ndim < 2 or array.shape[0] != array.shape[1]:
        raise InputError(f"crop_to_content with aspect='letterbox' needs a square (S, S, ...) array, got shape "
                         f"{array.shape}")
    new_h, new_w, top, left = letterbox_geometry(int(image_hw[0]), int(image_hw[1]), int(array.shape[0]))
    return array[top:top + new_h, left:left + new_w]


def to_uint8_rgb(tensor: torch.Tensor) -> np.ndarray:
    """A float ``(3, H, W)`` image in [0, 1] (e.g. one element of :func:`preprocess`) -> uint8 ``(H, W, 3)``."""
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise InputError(f"to_uint8_rgb expects a (3, H, W) tensor, got shape {tuple(tensor.shape)}")
    return tensor.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def resize_rgb(arr: np.ndarray, size: int | tuple[int, int], aspect: str = "squash") -> np.ndarray:
    """Resize uint8 RGB ``(H, W, 3)`` to ``size x size`` (or ``(h, w)``) for display (reports,
    overlays), with the same antialiased bilinear resize as :func:`preprocess`, rounded to uint8.
    ``aspect="letterbox"`` (square ``size`` only) places it as :func:`preprocess` does.

    Model input never goes through this function: use :func:`preprocess` (no 8-bit rounding).
    """
    check_aspect(aspect)
    _check_rgb(arr, "resize_rgb")
    target = size_hw(size)
    if aspect == "letterbox":
        _letterbox_size(size, "resize_rgb")
    if arr.shape[:2] == target:
        return arr.copy()
    return to_uint8_rgb(_fit(_to_unit_tensor(arr), target, aspect)[0])


def resize_mask(mask: np.ndarray, size: int | tuple[int, int], aspect: str = "squash") -> np.ndarray:
    """Resize a bool ``(H, W)`` mask to ``size x size`` (or ``(h, w)``) with nearest neighbour
    (a mask stays binary; it is never blended).

    ``aspect="letterbox"`` (square ``size`` only): the mask is resized to the same box as its image
    (:func:`letterbox_geometry`) and padded with False, so it lines up with :func:`preprocess`'s
    output pixel for pixel.
    """
    check_aspect(aspect)
    if mask.ndim != 2:
        raise InputError(f"resize_mask expects an (H, W) array, got shape {mask.shape}")
    height, width = size_hw(size)
    if mask.shape == (height, width):
        return mask.astype(bool, copy=True)
    if aspect == "letterbox":
        side = _letterbox_size(size, "resize_mask")
        new_h, new_w, top, left = letterbox_geometry(mask.shape[0], mask.shape[1], side)
        canvas = np.zeros((side, side), dtype=bool)
        canvas[top:top + new_h, left:left + new_w] = _nearest(mask, new_h, new_w)
        return canvas
    return _nearest(mask, height, width)


def _nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D mask to ``(height, width)`` bool."""
    if mask.shape == (height, width):
        return mask.astype(bool, copy=True)
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    return np.array(small) > 127
