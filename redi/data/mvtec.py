"""Reading one product line ("category") stored in the MVTec-AD folder layout.

::

    <root>/train/good/*.png|jpg|...               normal images (training)
    <root>/test/good/*                            normal test images
    <root>/test/<defect_type>/*                   defective test images
    <root>/ground_truth/<defect_type>/<stem>_mask.png   pixel masks (> 0 = defect)

Image suffixes ``.png .jpg .jpeg .bmp .tif .tiff`` are accepted in any letter case; hidden
files (``.DS_Store``, ``._x.png``) and other files are ignored. Samples are sorted by file
name, so every listing is deterministic.

Image-level-only lines: when ``ground_truth/`` is absent altogether, defect images have
``mask_path=None`` and pixel metrics are unavailable (``MVTecCategory.has_masks`` is False,
the validation report says so). When ``ground_truth/`` exists, every defect image must have
its mask.

Checking is split by cost. The constructor checks the folder structure only (no pixel is
read). :meth:`MVTecCategory.validate` additionally reads headers (mask sizes) and, with
``check_pixels=True``, decodes every file. With ``skip_bad_files=True`` the constructor runs
that full validation itself, so ``.train`` / ``.test`` hold only usable files and
``.skipped`` lists the others with the reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from redi.core.errors import DatasetError, ImageReadError
from redi.core.images import IMAGE_SUFFIXES, image_size_of, load_mask, load_rgb

GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """One image of a line.

    Attributes:
        path: the image file.
        label: 0 normal, 1 defective.
        defect_type: ``"good"`` for normal images, else the test sub-folder's name.
        mask_path: the ground-truth mask (defective test images only), or None.
        image_id: ``"<split>/<defect_type>/<stem>"``, unique within the line.
    """

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None
    image_id: str


@dataclass
class ValidationReport:
    """What :meth:`MVTecCategory.validate` found (JSON-ready through :meth:`to_dict`)."""

    root: str
    counts: dict[str, dict[str, int]]
    has_test: bool
    has_masks: bool
    pixels_checked: bool
    image_sizes: dict[str, int] = field(default_factory=dict)  # "WxH" -> number of images
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    warnings: list[str] = field(default_factory=list)

    @property
    def n_train(self) -> int:
        """Number of usable normal training images."""
        return sum(self.counts.get("train", {}).values())

    @property
    def n_test(self) -> int:
        """Number of usable test images (normal and defective)."""
        return sum(self.counts.get("test", {}).values())

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON (tuples become lists)."""
        data = dataclasses.asdict(self)
        data["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        data["n_train"], data["n_test"] = self.n_train, self.n_test
        return data


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name; an absent folder gives ``[]``.

    Raises:
        DatasetError: two files share a stem (e.g. ``001.png`` and ``001.jpg``), which makes
            image ids and mask names ambiguous.
    """
    if not folder.is_dir():
        return []
    files = sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: p.name)
    seen: dict[str, Path] = {}
    for path in files:
        if path.stem in seen:
            raise DatasetError(f"{seen[path.stem]} and {path} share the name {path.stem!r}; image "
                               f"names must be unique within a folder - rename or remove one")
        seen[path.stem] = path
    return files


def _mask_index(mask_dir: Path) -> dict[str, Path]:
    """Map image stem -> ``<stem>_mask.<image suffix>`` file (any suffix case; .png preferred)."""
    index: dict[str, Path] = {}
    if not mask_dir.is_dir():
        return index
    for path in sorted(mask_dir.iterdir(), key=lambda p: (p.suffix.lower() != ".png", p.name)):
        if _is_image(path) and path.stem.endswith("_mask"):
            index.setdefault(path.stem[: -len("_mask")], path)
    return index


class MVTecCategory:
    """One product line in MVTec-AD layout.

    Args:
        root: the line's folder (holding ``train/``, optionally ``test/`` and ``ground_truth/``).
        skip_bad_files: instead of failing on a corrupt image, a missing or corrupt mask, or a
            mask of the wrong size, leave that sample out and list it in ``.skipped``. The full
            pixel validation then runs in the constructor.

    Raises:
        DatasetError: missing root, missing or empty ``train/good``, a defect image without its
            mask (when ``ground_truth/`` exists and ``skip_bad_files`` is False).
        ImageReadError: never from the constructor without ``skip_bad_files`` (no pixel is read
            then; :meth:`validate` or loading raises it); with it, bad files are skipped instead.
    """

    def __init__(self, root: str | Path, skip_bad_files: bool = False) -> None:
        self.root = Path(root)
        self.skip_bad_files = skip_bad_files
        self.skipped: list[tuple[Path, str]] = []
        self._check_structure()
        self.has_masks = (self.root / "ground_truth").is_dir()
        self.train: list[Sample] = self._list_train()
        self.test: list[Sample] = self._list_test()
        self._require_train()
        self._report: ValidationReport | None = None
        if skip_bad_files:
            self._report = self.validate(check_pixels=True)

    # ----- listing -----------------------------------------------------------------------
    def _check_structure(self) -> None:
        if not self.root.is_dir():
            raise DatasetError(f"dataset folder {self.root} does not exist; pass the folder that "
                               f"holds train/good (MVTec-AD layout), e.g. data/demo/bottle_caps")
        if not (self.root / "train" / GOOD).is_dir():
            raise DatasetError(f"{self.root} has no train/good folder; a line needs normal "
                               f"training images in {self.root / 'train' / GOOD} (MVTec-AD layout)")

    def _require_train(self) -> None:
        if not self.train:
            why = " (all of them were skipped as unreadable)" if self.skipped else ""
            raise DatasetError(f"{self.root / 'train' / GOOD} holds no usable images{why}; put "
                               f"normal images ({', '.join(IMAGE_SUFFIXES)}) there")

    def _list_train(self) -> list[Sample]:
        return [Sample(p, 0, GOOD, None, f"train/{GOOD}/{p.stem}")
                for p in list_images(self.root / "train" / GOOD)]

    def _test_types(self) -> list[str]:
        test_dir = self.root / "test"
        if not test_dir.is_dir():
            return []
        return sorted(d.name for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith("."))

    def _list_test(self) -> list[Sample]:
        samples = []
        for defect_type in self._test_types():
            masks = _mask_index(self.root / "ground_truth" / defect_type)  # one listing per type
            for path in list_images(self.root / "test" / defect_type):
                sample = self._test_sample(path, defect_type, masks)
                if sample is not None:
                    samples.append(sample)
        return samples

    def _test_sample(self, path: Path, defect_type: str, masks: dict[str, Path]) -> Sample | None:
        image_id = f"test/{defect_type}/{path.stem}"
        if defect_type == GOOD:
            return Sample(path, 0, GOOD, None, image_id)
        if not self.has_masks:
            return Sample(path, 1, defect_type, None, image_id)
        mask_dir = self.root / "ground_truth" / defect_type
        mask = masks.get(path.stem)
        if mask is None:
            expected = mask_dir / f"{path.stem}_mask.png"
            message = (f"defect image {path} has no mask: expected {expected}; add the mask "
                       f"(0 = normal, 255 = defect) or remove the image")
            if not self.skip_bad_files:
                raise DatasetError(message)
            self.skipped.append((path, f"missing mask {expected}"))
            return None
        return Sample(path, 1, defect_type, mask, image_id)

    # ----- properties ----------------------------------------------------------------------
    @property
    def report(self) -> ValidationReport | None:
        """The last :meth:`validate` report (set by the constructor with ``skip_bad_files``)."""
        return self._report

    @property
    def name(self) -> str:
        """The line's name (its folder name)."""
        return self.root.name

    @property
    def defect_types(self) -> list[str]:
        """Sorted defect types present among the test samples (``"good"`` excluded)."""
        return sorted({s.defect_type for s in self.test if s.label == 1})

    @property
    def samples(self) -> list[Sample]:
        """All train then test samples."""
        return self.train + self.test

    # ----- checks -----------------------------------------------------------------------------
    def require_test(self) -> None:
        """Raise DatasetError unless the test set has both normal and defective images.

        Training needs only ``train/good``; evaluation (AUROC, thresholds) needs both classes.
        """
        labels = {s.label for s in self.test}
        if labels != {0, 1}:
            missing = [what for what, label in (("normal images in test/good", 0),
                                                ("defective images in test/<defect_type>", 1))
                       if label not in labels]
            raise DatasetError(f"{self.root} cannot be evaluated: its test set lacks "
                               f"{' and '.join(missing)}; add them (MVTec-AD layout)")

    def _check_sample(self, sample: Sample, check_pixels: bool, sizes: dict[str, int]) -> None:
        """Raise ImageReadError / DatasetError when the sample is unusable."""
        if check_pixels:
            hw = load_rgb(sample.path).shape[:2]
        else:
            hw = image_size_of(sample.path)
        sizes[f"{hw[1]}x{hw[0]}"] = sizes.get(f"{hw[1]}x{hw[0]}", 0) + 1
        if sample.mask_path is None:
            return
        if check_pixels:
            load_mask(sample.mask_path, expected_hw=hw, image_path=sample.path)
        else:
            mask_hw = image_size_of(sample.mask_path)
            if mask_hw != hw:
                raise DatasetError(
                    f"mask {sample.mask_path} is {mask_hw[1]}x{mask_hw[0]} (WxH) but image "
                    f"{sample.path} is {hw[1]}x{hw[0]}; masks must have the image's size")

    def _filter(self, samples: list[Sample], check: Callable[[Sample], None]) -> list[Sample]:
        kept = []
        for sample in samples:
            try:
                check(sample)
            except (ImageReadError, DatasetError) as exc:
                if not self.skip_bad_files:
                    raise
                self.skipped.append((sample.path, str(exc)))
                continue
            kept.append(sample)
        return kept

    def validate(self, check_pixels: bool = True) -> ValidationReport:
        """Check every sample and return a report.

        Checks: each image (and mask) opens - and fully decodes when ``check_pixels`` -, each
        mask has its image's size, ``train/good`` is not empty. A line without a test set is
        valid (it can be trained on); the report warns, and :meth:`require_test` enforces it.

        Raises:
            ImageReadError: an image or mask is unreadable (unless ``skip_bad_files``).
            DatasetError: a mask's size differs from its image's (unless ``skip_bad_files``),
                or no usable training image is left.
        """
        sizes: dict[str, int] = {}
        check = lambda s: self._check_sample(s, check_pixels, sizes)  # noqa: E731
        self.train = self._filter(self.train, check)
        self.test = self._filter(self.test, check)
        self._require_train()
        report = ValidationReport(
            root=str(self.root), counts=self.counts(), has_test=bool(self.test),
            has_masks=self.has_masks, pixels_checked=check_pixels, image_sizes=sizes,
            skipped=[(str(p), r) for p, r in self.skipped], warnings=self._warnings())
        self._report = report
        return report

    def counts(self) -> dict[str, dict[str, int]]:
        """``{"train": {"good": n}, "test": {"good": n, "<type>": n, ...}}``."""
        result: dict[str, dict[str, int]] = {"train": {GOOD: len(self.train)}, "test": {}}
        for sample in self.test:
            result["test"][sample.defect_type] = result["test"].get(sample.defect_type, 0) + 1
        return result

    def _warnings(self) -> list[str]:
        warnings = []
        if not self.test:
            warnings.append("no test images: the line can be trained but not evaluated")
        elif {s.label for s in self.test} != {0, 1}:
            warnings.append("the test set lacks normal or defective images: it cannot be evaluated")
        if self.test and not self.has_masks:
            warnings.append("no ground_truth/ folder: image-level metrics only, pixel metrics "
                            "are unavailable")
        for defect_type in self._test_types():
            if defect_type != GOOD and not list_images(self.root / "test" / defect_type):
                warnings.append(f"test/{defect_type} holds no images")
        if self.skipped:
            warnings.append(f"{len(self.skipped)} bad file(s) skipped")
        return warnings

    def __repr__(self) -> str:
        return (f"MVTecCategory({str(self.root)!r}, train={len(self.train)}, test={len(self.test)}, "
                f"defect_types={self.defect_types})")


def split_train_val(samples: list[Sample], val_fraction: float, min_val: int = 2,
                    seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Hold out normal training images to calibrate the decision threshold on.

    ``n_val = max(min_val, round(val_fraction * n))``; ``val_fraction == 0`` holds out nothing.
    The choice depends only on ``seed`` and the samples' order; both parts keep that order.

    Raises:
        DatasetError: a sample is not normal, or fewer than one training image would remain.
    """
    abnormal = [s.image_id for s in samples if s.label != 0]
    if abnormal:
        raise DatasetError(f"split_train_val takes normal images only; got defective ones: {abnormal[:3]}")
    if val_fraction <= 0:
        return list(samples), []
    n = len(samples)
    n_val = max(int(min_val), int(round(val_fraction * n)))
    if n - n_val < 1:
        raise DatasetError(f"only {n} normal training images: holding out {n_val} for the threshold "
                           f"leaves none to train on; add normal images to train/good or lower "
                           f"data.val_fraction / data.min_val_images")
    order = np.random.default_rng(seed).permutation(n)
    val_idx = set(order[:n_val].tolist())
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return train, val
