"""Synthetic demo product lines in MVTec-AD layout, so redi runs end to end with no real data.

Two lines that look different on purpose:

- ``bottle_caps``: a procedural object: a red cap with a knurled rim, a groove and a printed
  white mark on a grey conveyor belt. Normal images vary in position, size, rotation,
  colour, lighting and sensor noise.
- ``woven_fabric``: a texture: a denim-like 2/2 twill weave (indigo warp, light weft) whose
  fibre detail comes from random crops of scikit-image's bundled ``grass`` picture (shipped
  inside the package, no download). Normal images vary in thread pitch, angle, phase, colour,
  lighting and noise.

Defect types (each its own ``test/<type>`` folder): ``scratch`` (thin bright or dark lines),
``hole`` (missing material, dark background showing), ``stain`` (colour change),
``misplaced`` (the cap's printed mark shifted; on the fabric, a patch copied from elsewhere
and mirrored, so its twill ribs run the wrong way).

Every defective image is rendered together with its defect-free version (same random draws).
The mask is computed from the two: ``mask == (defect_image != clean_image).any(channel)``
holds exactly, so masks cover the changed pixels and nothing else. Pixels of a defect shape
whose change would be invisible (at most ``DIFF_THRESHOLD`` grey levels) are restored to the
clean value first, except small gaps inside a defect (a 3x3 morphological closing), which keep
the defect's value so masks are solid regions.

Everything is driven by ``numpy.random.default_rng([seed, line, split, index])``: the same
arguments give byte-identical PNG files.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import draw

from redi.core.errors import DatasetError

DEFECT_TYPES = ("scratch", "hole", "stain", "misplaced")
DIFF_THRESHOLD = 10  # grey levels: a smaller change of a defect shape's pixel is not a defect
README_NAME = "SYNTHETIC_DATA_README.md"
_SPLIT_CODES = {"train": 0, "test_good": 1, "test_defect": 2}

Params = dict[str, Any]


@dataclass(frozen=True)
class DemoLine:
    """One synthetic line: how to draw a normal part, and how to damage it."""

    name: str
    description: str
    sample_params: Callable[[np.random.Generator, int], Params]
    render: Callable[[Params, int], np.ndarray]  # float (S, S, 3) in 0..255, deterministic
    defect: Callable[[str, np.ndarray, Params, np.random.Generator, int], tuple[np.ndarray, np.ndarray]]
    defect_types: tuple[str, ...] = DEFECT_TYPES


@dataclass
class DemoPair:
    """A rendered sample: the defect-free image, the image as written, and its mask."""

    clean: np.ndarray  # uint8 (S, S, 3)
    image: np.ndarray  # uint8 (S, S, 3), equal to clean for normal samples
    mask: np.ndarray  # bool (S, S), all False for normal samples


# ----- shared drawing helpers ---------------------------------------------------------------
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) as float arrays."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    return ys, xs


def _coverage(signed_distance: np.ndarray) -> np.ndarray:
    """Antialiased inside-coverage from a signed distance in pixels (positive inside)."""
    return np.clip(signed_distance + 0.5, 0.0, 1.0)


def _blob(rng: np.random.Generator, size: int, center: tuple[float, float], radius: float) -> np.ndarray:
    """An irregular, star-shaped polygon blob (bool mask) around ``center``."""
    n = 14
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = radius * rng.uniform(0.65, 1.25, n)
    rows = center[0] + radii * np.sin(angles)
    cols = center[1] + radii * np.cos(angles)
    mask = np.zeros((size, size), dtype=bool)
    rr, cc = draw.polygon(rows, cols, shape=mask.shape)
    mask[rr, cc] = True
    return ndimage.binary_opening(mask, iterations=1) if mask.sum() > 50 else mask


def _scratch_shape(rng: np.random.Generator, size: int, start: tuple[float, float], length: float) -> np.ndarray:
    """A thin, slightly bent line (two segments, 1-2 px wide) as a bool mask."""
    mask = np.zeros((size, size), dtype=bool)
    angle = rng.uniform(0, np.pi)
    points = [np.array(start, dtype=float)]
    for bend in (0.0, rng.uniform(-0.5, 0.5)):
        step = np.array([np.sin(angle + bend), np.cos(angle + bend)]) * length / 2
        points.append(points[-1] + step)
    width = int(rng.integers(1, 3))
    for p0, p1 in zip(points[:-1], points[1:]):
        for offset in range(width):
            rr, cc = draw.line(int(round(p0[0])) + offset, int(round(p0[1])),
                               int(round(p1[0])) + offset, int(round(p1[1])))
            keep = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
            mask[rr[keep], cc[keep]] = True
    return mask


def _scratch_pixels(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Scratch colour: a bright (exposed metal / broken fibre) or dark (groove) line."""
    if rng.random() < 0.5:
        return image * 0.25 + rng.uniform(185, 215)
    return image * rng.uniform(0.2, 0.35)


def _stain_pixels(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Blend toward an oil / rust / ink colour, keeping some of the surface's texture."""
    colours = np.array([[115, 80, 35], [60, 90, 40], [150, 140, 40], [70, 40, 90]], dtype=np.float64)
    colour = colours[rng.integers(len(colours))]
    alpha = rng.uniform(0.6, 0.8)
    grey = image.mean(axis=2, keepdims=True)
    return (1 - alpha) * image + alpha * colour * (0.6 + 0.4 * grey / 255.0) / 0.8


def _hole_pixels(rng: np.random.Generator, shape: np.ndarray) -> np.ndarray:
    """Missing material: a dark background with a faint rim shading."""
    depth = ndimage.distance_transform_edt(shape)
    shade = 18 + 30 * np.exp(-depth / 2.0)  # the cut edge catches a little light
    base = rng.uniform(0.8, 1.2, 3)
    return shade[..., None] * base[None, None, :]


# ----- bottle caps ----------------------------------------------------------------------------
def _caps_params(rng: np.random.Generator, size: int) -> Params:
    return {
        "center": (size / 2 + rng.uniform(-0.04, 0.04) * size, size / 2 + rng.uniform(-0.04, 0.04) * size),
        "radius": 0.33 * size * rng.uniform(0.97, 1.03),
        "angle": rng.uniform(-0.25, 0.25),  # radians, about +-14 degrees
        "cap_rgb": np.array([185, 38, 35], dtype=np.float64) + rng.uniform(-10, 10, 3),
        "belt": rng.uniform(88, 108),
        "gain": rng.uniform(0.9, 1.1),
        "light_dir": rng.uniform(0, 2 * np.pi),
        "mark_shift": (0.0, 0.0),
        "noise": rng.normal(0.0, 2.0, (size, size, 3)),
        "belt_texture": rng.normal(0.0, 3.0, (size // 4 + 1, size // 4 + 1)),
    }


def _caps_mark(u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Coverage of the printed mark (a bar, a triangle and a dot) in cap coordinates (u, v)."""
    bar = np.minimum(0.35 * radius - np.abs(u), 0.06 * radius - np.abs(v - 0.18 * radius))
    top, bottom = -0.36 * radius, -0.04 * radius
    half_width = 0.55 * (v - top)
    triangle = np.minimum(np.minimum(v - top, bottom - v), half_width - np.abs(u))
    dot = 0.07 * radius - np.hypot(u - 0.32 * radius, v + 0.30 * radius)
    return _coverage(np.maximum(np.maximum(bar, triangle), dot))


def _caps_render(p: Params, size: int) -> np.ndarray:
    ys, xs = _grid(size)
    cy, cx = p["center"]
    radius = p["radius"]
    dy, dx = ys - cy, xs - cx
    r = np.hypot(dy, dx)
    phi = np.arctan2(dy, dx)
    # belt: smooth coarse texture plus a gentle vertical gradient
    belt_tex = ndimage.zoom(p["belt_texture"], size / p["belt_texture"].shape[0], order=1)[:size, :size]
    belt = p["belt"] + belt_tex + 8.0 * (ys / size - 0.5)
    shadow = 1.0 - 0.35 * _coverage((radius + 4 - np.hypot(dy - 4, dx - 4)) / 3.0)
    image = np.repeat((belt * shadow)[..., None], 3, axis=2)
    # cap body with a dome shading and a highlight toward the light
    inside = _coverage(radius - r)[..., None]
    ln = np.cos(phi - p["light_dir"]) * np.clip(r / radius, 0, 1)
    shading = (1.0 - 0.25 * (r / radius) ** 2 + 0.12 * ln)[..., None]
    body = p["cap_rgb"][None, None, :] * shading
    knurl = 1.0 + 0.12 * np.sin(48 * (phi - p["angle"])) * (r > 0.86 * radius)
    groove = 1.0 - 0.45 * np.exp(-((r - 0.80 * radius) / (0.012 * radius + 0.5)) ** 2)
    body = body * (knurl * groove)[..., None]
    # printed mark, in coordinates rotated with the cap
    cos_a, sin_a = math.cos(p["angle"]), math.sin(p["angle"])
    u = cos_a * dx + sin_a * dy - p["mark_shift"][1]
    v = -sin_a * dx + cos_a * dy - p["mark_shift"][0]
    mark = _caps_mark(u, v, radius)[..., None] * inside
    body = body * (1 - mark) + np.array([236, 234, 222])[None, None, :] * shading * mark
    image = image * (1 - inside) + body * inside
    return np.clip(image * p["gain"] + p["noise"], 0, 255)


def _caps_defect(kind: str, clean: np.ndarray, p: Params, rng: np.random.Generator, size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    cy, cx = p["center"]
    radius = p["radius"]
    ys, xs = _grid(size)
    on_cap = np.hypot(ys - cy, xs - cx) < radius - 1
    angle, dist = rng.uniform(0, 2 * np.pi), radius * np.sqrt(rng.uniform(0.0, 0.45))
    spot = (cy + dist * np.sin(angle), cx + dist * np.cos(angle))
    if kind == "scratch":
        shape = _scratch_shape(rng, size, spot, rng.uniform(0.6, 1.0) * radius) & on_cap
        return _scratch_pixels(rng, clean), shape
    if kind == "hole":
        shape = _blob(rng, size, spot, rng.uniform(0.07, 0.13) * radius) & on_cap
        return _hole_pixels(rng, shape), shape
    if kind == "stain":
        shape = _blob(rng, size, spot, rng.uniform(0.12, 0.22) * radius) & on_cap
        return _stain_pixels(rng, clean), shape
    if kind == "misplaced":  # the printed mark is shifted: both its old and new places change
        shift_angle, shift = rng.uniform(0, 2 * np.pi), rng.uniform(0.12, 0.2) * radius
        moved = dict(p, mark_shift=(shift * np.sin(shift_angle), shift * np.cos(shift_angle)))
        return _caps_render(moved, size), np.ones((size, size), dtype=bool)
    raise DatasetError(f"unknown defect type {kind!r}; choose one of {DEFECT_TYPES}")


# ----- woven fabric -------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _fibre_source() -> np.ndarray:
    """scikit-image's bundled ``grass`` picture (512x512 grey, no download), zero-mean, unit std."""
    from skimage import data as skdata  # imported lazily: only this line needs it

    grass = skdata.grass().astype(np.float64)
    return (grass - grass.mean()) / grass.std()


def _fabric_params(rng: np.random.Generator, size: int) -> Params:
    source = _fibre_source()
    crop = min(source.shape[0], size)
    top, left = rng.integers(0, source.shape[0] - crop + 1, 2)
    return {
        "pitch": size / 32 * rng.uniform(0.95, 1.05),
        "angle": rng.uniform(-0.06, 0.06),
        "phase": rng.uniform(0, 4, 2),
        "warp_rgb": np.array([48, 70, 128], dtype=np.float64) + rng.uniform(-8, 8, 3),
        "weft_rgb": np.array([205, 200, 185], dtype=np.float64) + rng.uniform(-8, 8, 3),
        "gain": rng.uniform(0.9, 1.1),
        "gradient": rng.uniform(-0.08, 0.08, 2),
        "fibre_crop": (int(top), int(left), int(crop)),
        "noise": rng.normal(0.0, 2.0, (size, size, 3)),
    }


def _fabric_render(p: Params, size: int) -> np.ndarray:
    ys, xs = _grid(size)
    cos_a, sin_a = math.cos(p["angle"]), math.sin(p["angle"])
    u = (cos_a * xs + sin_a * ys) / p["pitch"] + p["phase"][0]
    v = (-sin_a * xs + cos_a * ys) / p["pitch"] + p["phase"][1]
    iu, iv = np.floor(u), np.floor(v)
    warp_up = np.mod(iu - iv, 4) < 2  # 2/2 twill: diagonal ribs
    warp_profile = np.sin(np.pi * (u - iu)) ** 0.6  # a round thread across its width
    weft_profile = np.sin(np.pi * (v - iv)) ** 0.6
    shade = np.where(warp_up, 0.5 + 0.5 * warp_profile, 0.5 + 0.5 * weft_profile)[..., None]
    colour = np.where(warp_up[..., None], p["warp_rgb"], p["weft_rgb"])
    top, left, crop = p["fibre_crop"]
    fibre = _fibre_source()[top:top + crop, left:left + crop]
    if crop != size:
        fibre = ndimage.zoom(fibre, size / crop, order=1)[:size, :size]
    light = 1.0 + p["gradient"][0] * (ys / size - 0.5) + p["gradient"][1] * (xs / size - 0.5)
    image = colour * shade * (1.0 + 0.10 * fibre[..., None]) * (light * p["gain"])[..., None]
    return np.clip(image + p["noise"], 0, 255)


def _fabric_defect(kind: str, clean: np.ndarray, p: Params, rng: np.random.Generator, size: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    margin = 0.15 * size
    spot = tuple(rng.uniform(margin, size - margin, 2))
    if kind == "scratch":
        return _scratch_pixels(rng, clean), _scratch_shape(rng, size, spot, rng.uniform(0.25, 0.45) * size)
    if kind == "hole":
        shape = _blob(rng, size, spot, rng.uniform(0.03, 0.06) * size)
        return _hole_pixels(rng, shape), shape
    if kind == "stain":
        return _stain_pixels(rng, clean), _blob(rng, size, spot, rng.uniform(0.06, 0.11) * size)
    if kind == "misplaced":  # a patch from elsewhere, sewn in mirrored: the twill ribs turn
        side = int(rng.uniform(0.12, 0.2) * size)
        top, left = (int(np.clip(c - side / 2, 0, size - side)) for c in spot)
        src_top, src_left = (int(c) for c in rng.integers(0, size - side + 1, 2))
        moved = clean.copy()
        moved[top:top + side, left:left + side] = clean[src_top:src_top + side, src_left:src_left + side][:, ::-1]
        shape = np.zeros((size, size), dtype=bool)
        shape[top:top + side, left:left + side] = True
        return moved, shape
    raise DatasetError(f"unknown defect type {kind!r}; choose one of {DEFECT_TYPES}")


DEMO_LINES: dict[str, DemoLine] = {
    "bottle_caps": DemoLine(
        "bottle_caps", "red caps with a knurled rim and a printed white mark on a grey belt",
        _caps_params, _caps_render, _caps_defect),
    "woven_fabric": DemoLine(
        "woven_fabric", "denim-like twill weave with fibre detail from scikit-image's 'grass' picture",
        _fabric_params, _fabric_render, _fabric_defect),
}


# ----- generation ---------------------------------------------------------------------------
def _get_line(line: str) -> DemoLine:
    if line not in DEMO_LINES:
        raise DatasetError(f"unknown demo line {line!r}; choose one of {sorted(DEMO_LINES)}")
    return DEMO_LINES[line]


def _rng(seed: int, line: str, split: str, index: int) -> np.random.Generator:
    # crc32 is stable across runs and platforms, unlike Python's salted hash()
    return np.random.default_rng([int(seed), zlib.crc32(line.encode()), _SPLIT_CODES[split], int(index)])


def min_defect_area(size: int) -> int:
    """Fewest changed pixels a defect must have at image side ``size`` (a 1-px scratch of 0.13 S)."""
    return max(12, int(0.0005 * size * size))


def keep_visible(clean: np.ndarray, modified: np.ndarray, shape: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply a drawn defect to a uint8 image, keeping only its visible change.

    Args:
        clean: uint8 (S, S, 3), the defect-free image.
        modified: float or uint8 (S, S, 3), the image with the defect drawn everywhere it could be
            (rounded to uint8 here).
        shape: bool (S, S), where the defect is.

    Returns:
        (uint8 image, bool mask) with ``mask == (image != clean).any(channel)`` exactly. Pixels of
        ``shape`` that change by at most ``DIFF_THRESHOLD`` grey levels keep the clean value,
        except small gaps inside the defect (a 3x3 closing), so masks are solid regions.
    """
    modified = np.clip(np.rint(modified), 0, 255).astype(np.uint8)
    visible = shape & (np.abs(modified.astype(np.int16) - clean).max(axis=2) > DIFF_THRESHOLD)
    region = ndimage.binary_closing(visible, structure=np.ones((3, 3), bool)) & shape
    image = np.where(region[..., None], modified, clean)
    return image, (image != clean).any(axis=2)


def _damage(spec: DemoLine, kind: str, clean: np.ndarray, params: Params, rng: np.random.Generator,
            size: int) -> tuple[np.ndarray, np.ndarray]:
    """Apply a defect; returns (uint8 image, mask) with mask == image differs from clean."""
    min_area = min_defect_area(size)
    for _ in range(20):  # a draw can land where it changes too little: draw again
        modified, shape = spec.defect(kind, clean.astype(np.float64), params, rng, size)
        image, mask = keep_visible(clean, modified, shape)
        if mask.sum() >= min_area:
            return image, mask
    raise RuntimeError(f"could not place a visible {kind} defect at size {size}")  # a bug, not user input


def generate_pair(line: str, size: int, seed: int, split: str, index: int,
                  defect_type: str | None = None) -> DemoPair:
    """Render one sample and its defect-free version (what :func:`make_demo_line` writes).

    Args:
        split: ``"train"``, ``"test_good"`` or ``"test_defect"``.
        index: the sample's running index within that split.
        defect_type: one of the line's defect types for ``test_defect``, else None.
    """
    spec = _get_line(line)
    if split not in _SPLIT_CODES:
        raise DatasetError(f"unknown split {split!r}; choose one of {sorted(_SPLIT_CODES)}")
    rng = _rng(seed, line, split, index)
    params = spec.sample_params(rng, size)
    clean = np.clip(np.rint(spec.render(params, size)), 0, 255).astype(np.uint8)
    if defect_type is None:
        return DemoPair(clean, clean.copy(), np.zeros((size, size), dtype=bool))
    if defect_type not in spec.defect_types:
        raise DatasetError(f"unknown defect type {defect_type!r}; choose one of {spec.defect_types}")
    image, mask = _damage(spec, defect_type, clean, params, rng, size)
    return DemoPair(clean, image, mask)


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=1)  # fast; still lossless


def _prepare(out_dir: Path) -> None:
    """Make ``out_dir`` ready; replace an earlier demo line there, never anything else."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / README_NAME).is_file():
            raise DatasetError(f"{out_dir} is not empty and holds no demo line ({README_NAME}); "
                               f"choose an empty or new folder for the demo data")
        for name in ("train", "test", "ground_truth"):
            shutil.rmtree(out_dir / name, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def _readme(summary: dict[str, Any]) -> str:
    spec = _get_line(summary["line"])
    return (
        f"# Synthetic data: demo line `{summary['line']}`\n\n"
        f"These images are SYNTHETIC. They were generated by redi (`redi.data.demo.make_demo_line`),\n"
        f"not photographed; they contain no real product. Use them to try the pipeline, not to judge\n"
        f"how well a model works on real parts.\n\n"
        f"- what: {spec.description}\n"
        f"- parameters: seed={summary['seed']}, size={summary['size']}, n_train={summary['n_train']}, "
        f"n_test_good={summary['n_test_good']}, n_test_defect={summary['n_test_defect']}\n"
        f"- defect types: {', '.join(spec.defect_types)}\n"
        f"- counts: `{json.dumps(summary['counts'], sort_keys=True)}`\n"
        f"- masks: `ground_truth/<type>/<stem>_mask.png` (0 / 255) mark exactly the pixels where the\n"
        f"  defective image differs from its defect-free rendering.\n"
        f"- the same parameters regenerate byte-identical files.\n")


def make_demo_line(out_dir: str | Path, line: str = "bottle_caps", n_train: int = 30, n_test_good: int = 10,
                   n_test_defect: int = 20, size: int = 256, seed: int = 0) -> dict[str, Any]:
    """Write a synthetic line in MVTec-AD layout into ``out_dir`` (the line's root folder).

    Defective images cycle through the line's defect types (``scratch, hole, stain, misplaced``),
    each type in its own ``test/<type>/`` folder with masks in ``ground_truth/<type>/``. A
    ``SYNTHETIC_DATA_README.md`` records that the data is synthetic and the parameters.
    An existing demo line in ``out_dir`` is replaced; any other non-empty folder is refused.

    Returns:
        summary dict: ``line, root, seed, size, n_train, n_test_good, n_test_defect, counts``
        (``counts`` as :meth:`redi.data.mvtec.MVTecCategory.counts`) and ``defect_types``.

    Raises:
        DatasetError: unknown line, bad counts or size, or ``out_dir`` holds other files.
    """
    spec = _get_line(line)
    if size < 32 or n_train < 1 or n_test_good < 0 or n_test_defect < 0:
        raise DatasetError(f"make_demo_line needs size >= 32, n_train >= 1 and non-negative test "
                           f"counts; got size={size}, n_train={n_train}, n_test_good={n_test_good}, "
                           f"n_test_defect={n_test_defect}")
    out = Path(out_dir)
    _prepare(out)
    kinds = [spec.defect_types[i % len(spec.defect_types)] for i in range(n_test_defect)]
    counts: dict[str, dict[str, int]] = {"train": {"good": n_train}, "test": {}}
    if n_test_good:
        counts["test"]["good"] = n_test_good
    for kind in kinds:
        counts["test"][kind] = counts["test"].get(kind, 0) + 1
    summary = {"line": line, "root": str(out), "seed": seed, "size": size, "n_train": n_train,
               "n_test_good": n_test_good, "n_test_defect": n_test_defect, "counts": counts,
               "defect_types": sorted(set(kinds))}
    # the README goes first: it marks the folder as a demo line, so an interrupted run can be redone
    (out / README_NAME).write_text(_readme(summary))
    for i in range(n_train):
        _save_png(generate_pair(line, size, seed, "train", i).image, out / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        _save_png(generate_pair(line, size, seed, "test_good", i).image, out / "test" / "good" / f"{i:03d}.png")
    for i, kind in enumerate(kinds):
        stem = f"{i // len(spec.defect_types):03d}"
        pair = generate_pair(line, size, seed, "test_defect", i, kind)
        _save_png(pair.image, out / "test" / kind / f"{stem}.png")
        _save_png(pair.mask.astype(np.uint8) * 255, out / "ground_truth" / kind / f"{stem}_mask.png")
    return summary


def defect_source(line: str, index: int) -> tuple[str, str]:
    """The (defect type, file stem) that ``make_demo_line`` gives test_defect sample ``index``."""
    types = _get_line(line).defect_types
    return types[index % len(types)], f"{index // len(types):03d}"
