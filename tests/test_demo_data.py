"""redi.data.demo: synthetic lines read back through MVTecCategory, exact masks, determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from redi.data.demo import (DEFECT_TYPES, DEMO_LINES, DIFF_THRESHOLD, README_NAME, defect_source,
                            generate_pair, make_demo_line)
from redi.data.mvtec import MVTecCategory
from redi.core.errors import DatasetError
from redi.core.images import load_mask, load_rgb


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_line_reads_as_mvtec(demo_line_root):
    cat = MVTecCategory(demo_line_root)
    assert cat.counts() == {"train": {"good": 10},
                            "test": {"good": 4, "scratch": 2, "hole": 2, "stain": 2, "misplaced": 2}}
    assert cat.defect_types == sorted(DEFECT_TYPES)
    report = cat.validate(check_pixels=True)
    assert report.image_sizes == {"128x128": 22} and report.warnings == [] and report.skipped == []
    cat.require_test()
    readme = (demo_line_root / README_NAME).read_text()
    assert "SYNTHETIC" in readme and "seed=0" in readme and "size=128" in readme


def test_masks_cover_exactly_the_defects(demo_line_root):
    """Files on disk equal a fresh rendering; the mask is exactly where image and clean differ."""
    cat = MVTecCategory(demo_line_root)
    defective = {s.image_id: s for s in cat.test if s.label == 1}
    for index in range(8):
        kind, stem = defect_source("bottle_caps", index)
        sample = defective[f"test/{kind}/{stem}"]
        pair = generate_pair("bottle_caps", 128, 0, "test_defect", index, kind)
        image, mask = load_rgb(sample.path), load_mask(sample.mask_path)
        np.testing.assert_array_equal(image, pair.image)
        np.testing.assert_array_equal(mask, pair.mask)
        changed = (image != pair.clean).any(axis=2)
        np.testing.assert_array_equal(mask, changed)  # nothing outside, nothing missing
        diff = np.abs(image.astype(int) - pair.clean).max(axis=2)
        assert mask.sum() >= 8, f"{kind} {stem}: defect too small to see"
        # the defect is visible: nearly every masked pixel changed by more than the threshold
        assert (diff[mask] > DIFF_THRESHOLD).mean() > 0.8, kind
    for index, sample in enumerate(s for s in cat.test if s.label == 0):
        pair = generate_pair("bottle_caps", 128, 0, "test_good", index)
        np.testing.assert_array_equal(load_rgb(sample.path), pair.clean)


@pytest.mark.parametrize("line", sorted(DEMO_LINES))
def test_every_line_and_defect_type(tmp_path, line):
    summary = make_demo_line(tmp_path / line, line, n_train=3, n_test_good=1, n_test_defect=4, size=96, seed=5)
    assert summary["defect_types"] == sorted(DEFECT_TYPES) and summary["root"] == str(tmp_path / line)
    cat = MVTecCategory(tmp_path / line)
    cat.validate(check_pixels=True)
    for kind in DEFECT_TYPES:
        mask = load_mask(tmp_path / line / "ground_truth" / kind / "000_mask.png")
        assert 0 < mask.mean() < 0.2, (line, kind)
    train = np.stack([load_rgb(s.path).astype(float) for s in cat.train])
    # normal images vary (position, lighting, noise), but stay the same kind of part
    assert np.abs(train[0] - train[1]).mean() > 3
    assert np.abs(train.mean(axis=(1, 2, 3)) - train.mean()).max() < 30


def test_lines_look_different(tmp_path):
    caps = generate_pair("bottle_caps", 64, 0, "train", 0).image.astype(float)
    fabric = generate_pair("woven_fabric", 64, 0, "train", 0).image.astype(float)
    assert np.abs(caps.mean(axis=(0, 1)) - fabric.mean(axis=(0, 1))).max() > 30


def test_same_seed_gives_identical_files(tmp_path):
    args = dict(n_train=3, n_test_good=2, n_test_defect=4, size=64)
    make_demo_line(tmp_path / "a", "woven_fabric", seed=7, **args)
    make_demo_line(tmp_path / "b", "woven_fabric", seed=7, **args)
    make_demo_line(tmp_path / "c", "woven_fabric", seed=8, **args)
    first, second, other = _hashes(tmp_path / "a"), _hashes(tmp_path / "b"), _hashes(tmp_path / "c")
    assert len(first) == 3 + 2 + 4 + 4 + 1  # images, masks, README
    assert first == second
    assert first["train/good/000.png"] != other["train/good/000.png"]


def test_regenerate_replaces_a_demo_line_but_not_other_data(tmp_path):
    root = tmp_path / "line"
    make_demo_line(root, "bottle_caps", n_train=4, n_test_good=1, n_test_defect=4, size=64)
    make_demo_line(root, "bottle_caps", n_train=2, n_test_good=0, n_test_defect=0, size=64)
    assert MVTecCategory(root).counts() == {"train": {"good": 2}, "test": {}}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not empty"):
        make_demo_line(tmp_path / "mine", "bottle_caps", size=64)
    assert (tmp_path / "mine" / "photo.png").read_bytes() == b"x"
    with pytest.raises(DatasetError, match="unknown demo line"):
        make_demo_line(tmp_path / "new", "teapots")
    with pytest.raises(DatasetError, match="unknown defect type"):
        generate_pair("bottle_caps", 64, 0, "test_defect", 0, "dent")
