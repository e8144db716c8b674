"""Build a non-square dev set (aspect 1:2.5) from an MVTec-layout line, to measure ``data.aspect``.

Every image and mask of the source line is cut to the largest centred crop of aspect 2.5:1
(``--orientation wide``, the default: for a square source the full width and a height of
width / 2.5) or 1:2.5 (``tall``: the full height, width = height / 2.5), and written as PNG
(lossless; a JPEG source is not compressed a second time) into a new MVTec-layout folder::

    <out>/train/good/<stem>.png
    <out>/test/<type>/<stem>.png
    <out>/ground_truth/<type>/<stem>_mask.png     0 / 255
    <out>/NONSQUARE.json                          source, crop, counts, dropped images

A defective test image whose cropped mask holds no defect pixel would be a "defective" image
without a visible defect, so it is dropped (with its mask) and counted. Lines without
``ground_truth/`` (image-level labels) keep every defect image: nothing tells what the crop cut.

The source is read with redi's own loaders (``MVTecCategory``, ``load_rgb``, ``load_mask``), so
the conversions are the ones training uses. The output must be outside the source and outside
the shared data folder (``../shared``): this script never writes there.

    python bench/make_nonsquare.py ../shared/data/metal_plate --out runs/nonsquare/metal_plate
    python bench/make_nonsquare.py ../shared/data/hazelnut --out runs/nonsquare/hazelnut --orientation tall
    python bench/make_nonsquare.py ../shared/data/metal_plate --out runs/grey_strips/metal_plate --grey

``--grey`` also turns every image to grey (ITU-R 601 luma, written as ``L`` PNG), the look of the
grey strip and tile lines the product failed on (issue 17): no colour cue is left.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from redi.data.mvtec import MVTecCategory, Sample
from redi.core.errors import RediError
from redi.core.images import load_mask, load_rgb

SHARED = Path(__file__).resolve().parents[2] / "shared"  # the read-only data next to the checkout
MARKER = "NONSQUARE.json"
ORIENTATIONS = ("wide", "tall")


def crop_box(height: int, width: int, ratio: float = 2.5, orientation: str = "wide") -> tuple[int, int, int, int]:
    """The largest centred crop of aspect ``ratio``:1 (wide) or 1:``ratio`` (tall) of a
    ``height x width`` image: ``(top, left, crop_h, crop_w)``; the long side is rounded to the
    nearest pixel (halves up)."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1 (long side / short side), got {ratio}")
    target = ratio if orientation == "wide" else 1.0 / ratio  # width / height of the crop
    if width / height >= target:  # the source is wider than the crop: keep its full height
        crop_h, crop_w = height, max(1, min(width, int(height * target + 0.5)))
    else:
        crop_h, crop_w = max(1, min(height, int(width / target + 0.5))), width
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def _crop(array: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    top, left, crop_h, crop_w = box
    return np.ascontiguousarray(array[top:top + crop_h, left:left + crop_w])


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or below it (both resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_output(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse an output inside the source or the shared data, or an existing non-empty folder
    (``--overwrite`` replaces one this script wrote, recognised by its NONSQUARE.json)."""
    guarded = [(src, "the source line"), (SHARED, "the shared data folder (read-only)"),
               (Path("..") / "shared", "the shared data folder (read-only)")]
    for folder, what in guarded:
        if _inside(out, folder) or _inside(folder, out):
            raise SystemExit(f"error: --out {out} is inside (or holds) {what} {folder}; write the new set somewhere "
                             f"else, e.g. runs/nonsquare/{src.name}")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SystemExit(f"error: {out} exists and is not empty; remove it or pass --overwrite")
        if not (out / MARKER).is_file():
            raise SystemExit(f"error: {out} was not written by this script (no {MARKER}); --overwrite only replaces "
                             f"an earlier output of make_nonsquare.py - remove it by hand or choose another --out")
        shutil.rmtree(out)


def _save(path: Path, array: np.ndarray, written: set[Path]) -> None:
    """Write a uint8 array as PNG; two sources with one stem (a.png, a.jpg) would overwrite each other."""
    if path in written:
        raise SystemExit(f"error: two source files map to {path} (same stem, different suffix); rename one")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    written.add(path)


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 grey (ITU-R 601 luma, as Pillow's ``convert("L")``)."""
    return np.asarray(Image.fromarray(rgb).convert("L"))


def build(src: Path, out: Path, ratio: float = 2.5, orientation: str = "wide", grey: bool = False) -> dict[str, Any]:
    """Write the cropped line; return the summary also stored in ``<out>/NONSQUARE.json``."""
    category = MVTecCategory(src)
    written: set[Path] = set()
    counts: dict[str, dict[str, int]] = {}
    dropped: list[str] = []
    sizes: dict[str, int] = {}
    for sample in category.train + category.test:
        rgb = load_rgb(sample.path)
        box = crop_box(rgb.shape[0], rgb.shape[1], ratio, orientation)
        split = sample.image_id.split("/", 1)[0]  # "train" | "test"
        key = f"{split}/{sample.defect_type}"
        target = out / split / sample.defect_type / f"{sample.path.stem}.png"
        mask = _cropped_mask(sample, rgb.shape[:2], box)
        if mask is not None and not mask.any():
            dropped.append(sample.image_id)  # the crop cut the whole defect away
            continue
        picture = _crop(rgb, box)
        _save(target, to_grey(picture) if grey else picture, written)
        if mask is not None:
            _save(out / "ground_truth" / sample.defect_type / f"{sample.path.stem}_mask.png",
                  mask.astype(np.uint8) * 255, written)
        counts[key] = counts.get(key, 0) + 1
        size = f"{box[3]}x{box[2]}"
        sizes[size] = sizes.get(size, 0) + 1
    summary = {"source": str(src.resolve()), "out": str(out.resolve()), "orientation": orientation, "ratio": ratio,
               "grey": grey,
               "sizes_wxh": sizes, "written": counts, "dropped_empty_mask": len(dropped), "dropped": dropped,
               "has_masks": any(s.mask_path is not None for s in category.test)}
    (out / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _cropped_mask(sample: Sample, image_hw: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray | None:
    """A defect sample's mask cut like its image, or None when it has none (normal, image-level)."""
    if sample.mask_path is None:
        return None
    return _crop(load_mask(sample.mask_path, expected_hw=image_hw, image_path=sample.path), box)


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="the source line (MVTec-AD layout), e.g. ../shared/data/metal_plate")
    parser.add_argument("--out", type=Path, required=True,
                        help="the new line's folder, e.g. runs/nonsquare/metal_plate")
    parser.add_argument("--orientation", choices=ORIENTATIONS, default="wide",
                        help="wide: width = 2.5 x height (default); tall: height = 2.5 x width")
    parser.add_argument("--ratio", type=float, default=2.5, help="long side / short side of the crop (default 2.5)")
    parser.add_argument("--grey", action="store_true", help="also turn every image grey (L PNG)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier output of this script at --out")
    args = parser.parse_args(argv)
    check_output(args.src, args.out, args.overwrite)
    try:
        summary = build(args.src, args.out, args.ratio, args.orientation, args.grey)
    except RediError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    shape = f"{args.ratio:g}:1" if args.orientation == "wide" else f"1:{args.ratio:g}"
    print(f"wrote {summary['out']} ({args.orientation}: centred {shape} (W:H) crops of {summary['source']})")
    for key, number in sorted(summary["written"].items()):
        print(f"  {key:<24} {number:4d} images")
    print(f"  image sizes (WxH): {summary['sizes_wxh']}")
    if summary["has_masks"]:
        print(f"  dropped {summary['dropped_empty_mask']} defective test image(s) whose cropped mask holds no defect "
              f"pixel{': ' + ', '.join(summary['dropped']) if summary['dropped'] else ''}")
    else:
        print("  no ground_truth/: every defect image kept (nothing tells whether the crop cut its defect)")
    print(f"  summary: {Path(summary['out']) / MARKER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
