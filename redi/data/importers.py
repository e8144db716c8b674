"""Turn other folder layouts into the MVTec-AD layout that the rest of redi reads.

Importers only read the source: image files are copied byte for byte (never moved), masks are
re-written as binary PNGs (0 = normal, 255 = defect). Every source image is decoded once, so a
corrupt file fails the import (ImageReadError naming it) instead of a later training run.
The result is built in a temporary folder beside ``dst`` and renamed into place at the end, so
a failed import leaves no half-written line behind. ``dst`` must not exist yet or be empty.
Each importer writes ``IMPORT_SUMMARY.json`` into ``dst`` and returns the same summary dict.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from redi.data.mvtec import GOOD, list_images
from redi.core.errors import DatasetError
from redi.core.images import load_mask, load_rgb

DEFECT = "defect"


def _check_paths(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise DatasetError(f"source folder {src} does not exist")
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r == src_r or src_r in dst_r.parents or dst_r in src_r.parents:
        raise DatasetError(f"destination {dst} overlaps the source {src}; choose a folder outside it")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise DatasetError(f"destination {dst} already exists and is not empty; choose a new folder "
                           f"or remove it first")


def _staging(dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.importing-", dir=dst.parent))


def _finish(stage: Path, dst: Path, summary: dict[str, Any]) -> dict[str, Any]:
    (stage / "IMPORT_SUMMARY.json").write_text(json.dumps(summary, indent=2) + "\n")
    if dst.exists():  # an empty folder (checked before): replace it
        dst.rmdir()
    stage.rename(dst)
    return summary


def _copy_image(src_file: Path, out_dir: Path) -> tuple[int, int]:
    """Decode (to validate) and copy an image byte for byte; returns its (height, width)."""
    hw = load_rgb(src_file).shape[:2]
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src_file, out_dir / src_file.name)
    return hw


def _write_mask(mask: np.ndarray, out_file: Path) -> None:
    out_file.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(out_file)


def import_plain_folder(src: str | Path, dst: str | Path, train_fraction: float = 0.8, seed: int = 0,
                        image_level_only: bool = False) -> dict[str, Any]:
    """Import ``src/good``, ``src/defect`` and optional ``src/masks`` into MVTec-AD layout.

    A deterministic ``train_fraction`` of the good images (chosen by ``seed``) goes to
    ``train/good``, the rest to ``test/good``; defect images go to ``test/defect`` and their
    masks (``masks/<stem>.png`` or ``masks/<stem>_mask.png``) to
    ``ground_truth/defect/<stem>_mask.png``.

    Args:
        image_level_only: accept defect images without masks. No ``ground_truth/`` is written
            at all (any ``masks/`` is ignored), so only image-level metrics can be computed for
            the line; pixel metrics are unavailable.

    Raises:
        DatasetError: no ``good/`` images, defect images without masks (unless
            ``image_level_only``), mask size mismatch, ``dst`` not empty or overlapping ``src``.
        ImageReadError: a source image or mask cannot be read.
    """
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst)
    if not 0.0 < train_fraction <= 1.0:
        raise DatasetError(f"train_fraction must be in (0, 1], got {train_fraction}")
    good = list_images(src / GOOD)
    defect = list_images(src / DEFECT)
    if not good:
        raise DatasetError(f"{src / GOOD} holds no images; put the normal images there")
    masks_dir = src / "masks"
    masks = _match_plain_masks(defect, masks_dir, image_level_only)
    n_train = max(1, int(round(train_fraction * len(good))))
    chosen = set(np.random.default_rng(seed).permutation(len(good))[:n_train].tolist())
    stage = _staging(dst)
    try:
        for i, path in enumerate(good):
            _copy_image(path, stage / ("train" if i in chosen else "test") / GOOD)
        for path in defect:
            hw = _copy_image(path, stage / "test" / DEFECT)
            if masks.get(path) is not None:
                mask = load_mask(masks[path], expected_hw=hw, image_path=path)
                _write_mask(mask, stage / "ground_truth" / DEFECT / f"{path.stem}_mask.png")
        summary = {"format": "plain_folder", "source": str(src), "destination": str(dst),
                   "train_good": n_train, "test_good": len(good) - n_train, "test_defect": len(defect),
                   "masks": sum(m is not None for m in masks.values()),
                   "image_level_only": image_level_only, "train_fraction": train_fraction, "seed": seed}
        return _finish(stage, dst, summary)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _match_plain_masks(defect: list[Path], masks_dir: Path, image_level_only: bool) -> dict[Path, Path | None]:
    """Map each defect image to its mask file (None for image-level-only imports)."""
    if image_level_only or not defect:
        return {path: None for path in defect}
    if not masks_dir.is_dir():
        raise DatasetError(f"{masks_dir} does not exist but {len(defect)} defect image(s) need masks "
                           f"for pixel-level evaluation; add masks/<stem>.png for each defect image, "
                           f"or import with image_level_only=True (pixel metrics will be unavailable)")
    # masks/<stem>.<ext> or masks/<stem>_mask.<ext>, any image suffix in any case
    by_stem: dict[str, Path] = {}
    for mask_file in list_images(masks_dir):
        stem = mask_file.stem[: -len("_mask")] if mask_file.stem.endswith("_mask") else mask_file.stem
        if stem in by_stem:
            raise DatasetError(f"{by_stem[stem]} and {mask_file} are both masks of {stem!r}; keep one")
        by_stem[stem] = mask_file
    matched: dict[Path, Path | None] = {}
    for path in defect:
        mask = by_stem.get(path.stem)
        if mask is None:
            raise DatasetError(f"defect image {path} has no mask: expected {masks_dir / (path.stem + '.png')} "
                               f"or {masks_dir / (path.stem + '_mask.png')}; add it, or import with "
                               f"image_level_only=True")
        matched[path] = mask
    return matched


def _kolektor_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(image, ``<id>_GT`` mask) pairs of one KolektorSDD2 split folder, sorted by id."""
    files = list_images(folder)
    by_stem = {p.stem: p for p in files}
    pairs = []
    for path in files:
        if path.stem.endswith("_GT"):
            continue
        gt = by_stem.get(f"{path.stem}_GT")
        if gt is None:
            raise DatasetError(f"KolektorSDD2 image {path} has no ground truth {folder / (path.stem + '_GT.png')}; "
                               f"every image needs its <id>_GT.png (all black for a defect-free image)")
        pairs.append((path, gt))
    return pairs


def import_kolektorsdd2(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Import KolektorSDD2 (``train/`` and ``test/`` with ``<id>.png`` + ``<id>_GT.png``).

    An image whose GT has any non-zero pixel is defective. Defect-free train images go to
    ``train/good``; defective train images are left out of training (listed in the summary as
    ``excluded_train_defective``); test images go to ``test/good`` or ``test/defect`` with the
    mask written to ``ground_truth/defect/<id>_mask.png``.

    Raises:
        DatasetError: missing ``train/``, an image without ``_GT``, mask size mismatch, ``dst``
            not empty or overlapping ``src``, no defect-free train image.
        ImageReadError: an image or GT file cannot be read.
    """
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst)
    if not (src / "train").is_dir():
        raise DatasetError(f"{src} has no train/ folder; expected KolektorSDD2 layout "
                           f"(train/ and test/ with <id>.png and <id>_GT.png)")
    counts = {"train_good": 0, "test_good": 0, "test_defect": 0}
    excluded: list[str] = []
    stage = _staging(dst)
    try:
        for split in ("train", "test"):
            for image_path, gt_path in _kolektor_pairs(src / split):
                hw = load_rgb(image_path).shape[:2]
                mask = load_mask(gt_path, expected_hw=hw, image_path=image_path)
                is_defect = bool(mask.any())
                if split == "train" and is_defect:
                    excluded.append(image_path.stem)
                    continue
                target = f"{split}/{DEFECT if is_defect else GOOD}"
                (stage / target).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(image_path, stage / target / image_path.name)  # decoded above
                counts[target.replace("/", "_")] += 1
                if is_defect:
                    _write_mask(mask, stage / "ground_truth" / DEFECT / f"{image_path.stem}_mask.png")
        if counts["train_good"] == 0:
            raise DatasetError(f"{src / 'train'} holds no defect-free image to train on")
        summary = {"format": "kolektorsdd2", "source": str(src), "destination": str(dst), **counts,
                   "excluded_train_defective": excluded}
        return _finish(stage, dst, summary)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
