"""redi.data: MVTec-layout reader, bad-data errors, splits, torch datasets, importers, real sets."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from redi.data.dataset import ImageDataset, load_images, load_masks
from redi.data.importers import import_kolektorsdd2, import_plain_folder
from redi.data.mvtec import MVTecCategory, Sample, split_train_val
from redi.core.errors import DatasetError, ImageReadError

HW = (16, 20)


def _img(path: Path, value: int = 120, hw: tuple[int, int] = HW) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.full((*hw, 3), value, dtype=np.uint8)
    rgb[0, 0] = [value // 2, 0, 255 - value]
    Image.fromarray(rgb).save(path)
    return path


def _mask(path: Path, hw: tuple[int, int] = HW, box: tuple[int, int, int, int] = (2, 6, 3, 9)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros(hw, dtype=np.uint8)
    m[box[0]:box[1], box[2]:box[3]] = 255
    Image.fromarray(m).save(path)
    return path


def _line(root: Path, n_train: int = 4, n_good: int = 2, n_defect: int = 2) -> Path:
    for i in range(n_train):
        _img(root / "train" / "good" / f"{i:03d}.png", 100 + i)
    for i in range(n_good):
        _img(root / "test" / "good" / f"{i:03d}.png", 110 + i)
    for i in range(n_defect):
        _img(root / "test" / "crack" / f"{i:03d}.png", 50 + i)
        _mask(root / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    return root


def _tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----- MVTecCategory -----------------------------------------------------------------------------
def test_reads_layout(tmp_path):
    root = _line(tmp_path / "line", n_train=3)
    _img(root / "train" / "good" / "UPPER.PNG")
    _img(root / "train" / "good" / "x.JpG")
    (root / "train" / "good" / "notes.txt").write_text("ignored")
    (root / "train" / "good" / ".DS_Store").write_bytes(b"\0")
    _img(root / "train" / "good" / "._hidden.png")
    cat = MVTecCategory(root)
    assert [s.image_id for s in cat.train] == ["train/good/000", "train/good/001", "train/good/002",
                                               "train/good/UPPER", "train/good/x"]
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_path is None for s in cat.train)
    assert cat.defect_types == ["crack"]
    defects = [s for s in cat.test if s.label == 1]
    assert [s.image_id for s in defects] == ["test/crack/000", "test/crack/001"]
    assert defects[0].mask_path == root / "ground_truth" / "crack" / "000_mask.png"
    assert cat.counts() == {"train": {"good": 5}, "test": {"crack": 2, "good": 2}}
    report = cat.validate()
    assert report.n_train == 5 and report.n_test == 4 and report.has_test and report.has_masks
    assert report.image_sizes == {"20x16": 9} and report.warnings == [] and report.skipped == []
    cat.require_test()
    assert report.to_dict()["n_train"] == 5


def test_missing_root_and_train_good(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        MVTecCategory(tmp_path / "nope")
    (tmp_path / "line" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="train/good"):
        MVTecCategory(tmp_path / "line")


def test_empty_train_good(tmp_path):
    (tmp_path / "line" / "train" / "good").mkdir(parents=True)
    (tmp_path / "line" / "train" / "good" / "readme.txt").write_text("no images")
    with pytest.raises(DatasetError, match="no usable images"):
        MVTecCategory(tmp_path / "line")


def test_defect_without_mask_names_expected_path(tmp_path):
    root = _line(tmp_path / "line")
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DatasetError, match="001_mask.png") as info:
        MVTecCategory(root)
    assert str(root / "test" / "crack" / "001.png") in str(info.value)


def test_mask_size_mismatch(tmp_path):
    root = _line(tmp_path / "line")
    _mask(root / "ground_truth" / "crack" / "000_mask.png", hw=(8, 8), box=(1, 3, 1, 3))
    cat = MVTecCategory(root)  # structure is fine; sizes are checked by validate
    for check_pixels in (False, True):
        with pytest.raises(DatasetError, match="000_mask.png") as info:
            cat.validate(check_pixels=check_pixels)
        assert "000.png" in str(info.value) and "8x8" in str(info.value)


def test_corrupt_image_raises_image_read_error(tmp_path):
    root = _line(tmp_path / "line")
    bad = root / "train" / "good" / "002.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    cat = MVTecCategory(root)
    with pytest.raises(ImageReadError, match="002.png"):
        cat.validate(check_pixels=True)
    with pytest.raises(ImageReadError, match="002.png"):
        ImageDataset(cat.train, 32)[2]


def test_skip_bad_files_lists_skipped(tmp_path):
    root = _line(tmp_path / "line", n_train=4, n_good=2, n_defect=4)
    bad_train = root / "train" / "good" / "001.png"
    bad_train.write_bytes(b"not a png")
    bad_test = root / "test" / "good" / "000.png"
    bad_test.write_bytes(bad_test.read_bytes()[:50])
    (root / "ground_truth" / "crack" / "000_mask.png").unlink()
    _mask(root / "ground_truth" / "crack" / "001_mask.png", hw=(4, 4), box=(0, 1, 0, 1))
    (root / "ground_truth" / "crack" / "002_mask.png").write_bytes(b"junk")
    cat = MVTecCategory(root, skip_bad_files=True)
    skipped = sorted(str(Path(p).relative_to(root)) for p, _ in cat.skipped)
    assert skipped == ["test/crack/000.png", "test/crack/001.png", "test/crack/002.png",
                       "test/good/000.png", "train/good/001.png"]
    reasons = " | ".join(r for _, r in cat.skipped)
    assert "missing mask" in reasons and "4x4" in reasons and "002_mask.png" in reasons
    assert [s.image_id for s in cat.train] == ["train/good/000", "train/good/002", "train/good/003"]
    assert [s.image_id for s in cat.test] == ["test/crack/003", "test/good/001"]
    assert cat.report is not None and len(cat.report.skipped) == 5
    report = cat.validate()
    assert len(report.skipped) == 5 and any("skipped" in w for w in report.warnings)
    assert report.counts == {"train": {"good": 3}, "test": {"crack": 1, "good": 1}}


def test_skip_bad_files_with_no_usable_train_image(tmp_path):
    root = _line(tmp_path / "line", n_train=2)
    for path in (root / "train" / "good").iterdir():
        path.write_bytes(b"broken")
    with pytest.raises(DatasetError, match="skipped"):
        MVTecCategory(root, skip_bad_files=True)


def test_line_without_test_trains_but_cannot_be_evaluated(tmp_path):
    root = _line(tmp_path / "line", n_good=0, n_defect=0)
    cat = MVTecCategory(root)
    report = cat.validate()
    assert not report.has_test and report.n_train == 4
    assert any("not evaluated" in w for w in report.warnings)
    with pytest.raises(DatasetError, match="normal images in test/good and defective"):
        cat.require_test()
    only_good = _line(tmp_path / "line2", n_defect=0)
    with pytest.raises(DatasetError, match="defective images"):
        MVTecCategory(only_good).require_test()


def test_image_level_only_line_without_ground_truth(tmp_path):
    root = _line(tmp_path / "line")
    for path in (root / "ground_truth" / "crack").iterdir():
        path.unlink()
    (root / "ground_truth" / "crack").rmdir()
    (root / "ground_truth").rmdir()
    cat = MVTecCategory(root)
    assert not cat.has_masks and all(s.mask_path is None for s in cat.test)
    assert any("pixel metrics" in w for w in cat.validate().warnings)
    assert load_masks(cat.test, 8).sum() == 0


def test_duplicate_stems_are_refused(tmp_path):
    root = _line(tmp_path / "line")
    _img(root / "train" / "good" / "000.jpg")
    with pytest.raises(DatasetError, match="share the name"):
        MVTecCategory(root)


def test_split_train_val_is_deterministic():
    samples = [Sample(Path(f"{i}.png"), 0, "good", None, f"train/good/{i:03d}") for i in range(20)]
    train, val = split_train_val(samples, 0.15, min_val=2, seed=3)
    assert len(val) == 3 and len(train) == 17
    assert {s.image_id for s in train} | {s.image_id for s in val} == {s.image_id for s in samples}
    assert not {s.image_id for s in train} & {s.image_id for s in val}
    assert split_train_val(samples, 0.15, 2, 3) == (train, val)
    assert [s.image_id for s in val] == sorted(s.image_id for s in val)  # keeps input order
    others = {tuple(s.image_id for s in split_train_val(samples, 0.15, 2, seed)[1]) for seed in range(6)}
    assert len(others) > 1
    assert len(split_train_val(samples[:5], 0.1, 2, 0)[1]) == 2  # min_val wins
    assert split_train_val(samples, 0.0, 2, 0) == (samples, [])
    with pytest.raises(DatasetError, match="only 2 normal"):
        split_train_val(samples[:2], 0.5, 2, 0)
    with pytest.raises(DatasetError, match="normal images only"):
        split_train_val([Sample(Path("d.png"), 1, "crack", None, "test/crack/d")], 0.5, 0, 0)


# ----- torch datasets -------------------------------------------------------------------------------
def test_image_dataset_items(tmp_path):
    cat = MVTecCategory(_line(tmp_path / "line"))
    ds = ImageDataset(cat.test, 32)
    assert len(ds) == 4
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["mask"].shape == (1, 32, 32) and set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert item["label"] == 1 and item["index"] == 0 and item["image_id"] == "test/crack/000"
    good = ds[3]
    assert good["label"] == 0 and good["mask"].sum() == 0 and good["image_id"] == "test/good/001"
    # the 4x6 box of a 16x20 mask covers 24/320 of the image, about the same share at 32x32
    assert abs(item["mask"].mean().item() - 24 / 320) < 0.03
    np.testing.assert_allclose(good["image"][1, 5, 5].item(), 111 / 255, atol=1e-6)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].tolist() == [1, 1, 0, 0]
    cached = ImageDataset(cat.test, 32, cache=True)
    assert torch.equal(cached[0]["image"], item["image"]) and torch.equal(cached[0]["image"], item["image"])


def test_load_images_and_masks(tmp_path):
    cat = MVTecCategory(_line(tmp_path / "line"))
    images = load_images(cat.train, 24)
    assert images.shape == (4, 3, 24, 24) and images.dtype == torch.float32
    assert torch.allclose(images[2, 1, 10, 10], torch.tensor(102 / 255))
    masks = load_masks(cat.test, 24)
    assert masks.shape == (4, 1, 24, 24) and masks[:2].sum() > 0 and masks[2:].sum() == 0
    assert load_images([], 24).shape == (0, 3, 24, 24)


# ----- importers --------------------------------------------------------------------------------
def _plain_source(root: Path, n_good: int = 10, n_defect: int = 3, masks: bool = True) -> Path:
    for i in range(n_good):
        _img(root / "good" / f"g{i:02d}.png", 100 + i)
    for i in range(n_defect):
        _img(root / "defect" / f"d{i}.png", 30 + i)
        if masks:  # both accepted mask names
            _mask(root / "masks" / (f"d{i}.png" if i % 2 else f"d{i}_mask.png"))
    return root


def test_import_plain_folder(tmp_path):
    src = _plain_source(tmp_path / "src")
    before = _tree_hash(src)
    summary = import_plain_folder(src, tmp_path / "dst", seed=1)
    assert _tree_hash(src) == before  # the source is never modified
    assert summary["train_good"] == 8 and summary["test_good"] == 2 and summary["test_defect"] == 3
    assert summary["masks"] == 3
    cat = MVTecCategory(tmp_path / "dst")
    assert cat.counts() == {"train": {"good": 8}, "test": {"defect": 3, "good": 2}}
    cat.validate(check_pixels=True)
    cat.require_test()
    mask = np.asarray(Image.open(tmp_path / "dst" / "ground_truth" / "defect" / "d1_mask.png"))
    assert set(np.unique(mask).tolist()) == {0, 255} and (mask > 0).sum() == 4 * 6
    copied = tmp_path / "dst" / "test" / "defect" / "d0.png"
    assert copied.read_bytes() == (src / "defect" / "d0.png").read_bytes()
    # deterministic: the same seed picks the same train images
    import_plain_folder(src, tmp_path / "dst2", seed=1)
    assert sorted(p.name for p in (tmp_path / "dst2" / "train" / "good").iterdir()) == \
        sorted(p.name for p in (tmp_path / "dst" / "train" / "good").iterdir())


def test_import_plain_folder_mask_problems(tmp_path):
    src = _plain_source(tmp_path / "src", masks=False)
    with pytest.raises(DatasetError, match="image_level_only"):
        import_plain_folder(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    summary = import_plain_folder(src, tmp_path / "dst", image_level_only=True)
    assert summary["image_level_only"] and summary["masks"] == 0
    assert not (tmp_path / "dst" / "ground_truth").exists()
    assert not MVTecCategory(tmp_path / "dst").has_masks
    src2 = _plain_source(tmp_path / "src2")
    (src2 / "masks" / "d1.png").unlink()
    with pytest.raises(DatasetError, match="d1.png"):
        import_plain_folder(src2, tmp_path / "dst2")
    _mask(src2 / "masks" / "d1.png", hw=(5, 5), box=(0, 2, 0, 2))
    with pytest.raises(DatasetError, match="5x5"):
        import_plain_folder(src2, tmp_path / "dst2")
    assert not (tmp_path / "dst2").exists()
    assert not list(tmp_path.glob(".dst2.importing-*"))  # no staging folder left behind


def test_import_plain_folder_refuses_bad_destinations_and_corrupt_files(tmp_path):
    src = _plain_source(tmp_path / "src")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not empty"):
        import_plain_folder(src, tmp_path / "busy")
    assert (tmp_path / "busy" / "x.txt").read_text() == "keep me"
    with pytest.raises(DatasetError, match="overlaps"):
        import_plain_folder(src, src / "out")
    (src / "good" / "g03.png").write_bytes(b"broken")
    with pytest.raises(ImageReadError, match="g03.png"):
        import_plain_folder(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def _kolektor_source(root: Path) -> Path:
    hw = (24, 12)  # KolektorSDD2 images are tall and narrow
    empty = np.zeros(hw, dtype=np.uint8)
    for split, ids, defective in (("train", ["10000", "10001", "10002", "10003"], {"10002"}),
                                  ("test", ["20000", "20001", "20002"], {"20001", "20002"})):
        for image_id in ids:
            _img(root / split / f"{image_id}.png", 90, hw=hw)
            if image_id in defective:
                _mask(root / split / f"{image_id}_GT.png", hw=hw, box=(3, 9, 2, 5))
            else:
                (root / split).mkdir(parents=True, exist_ok=True)
                Image.fromarray(empty).save(root / split / f"{image_id}_GT.png")
    return root


def test_import_kolektorsdd2(tmp_path):
    src = _kolektor_source(tmp_path / "ksdd2")
    before = _tree_hash(src)
    summary = import_kolektorsdd2(src, tmp_path / "dst")
    assert _tree_hash(src) == before
    assert summary["train_good"] == 3 and summary["test_good"] == 1 and summary["test_defect"] == 2
    assert summary["excluded_train_defective"] == ["10002"]
    cat = MVTecCategory(tmp_path / "dst")
    assert [s.image_id for s in cat.train] == ["train/good/10000", "train/good/10001", "train/good/10003"]
    assert [s.image_id for s in cat.test] == ["test/defect/20001", "test/defect/20002", "test/good/20000"]
    cat.validate(check_pixels=True)
    mask = np.asarray(Image.open(tmp_path / "dst" / "ground_truth" / "defect" / "20001_mask.png"))
    assert mask.shape == (24, 12) and (mask == 255).sum() == 18 and set(np.unique(mask).tolist()) == {0, 255}
    (src / "test" / "20000_GT.png").unlink()
    with pytest.raises(DatasetError, match="20000_GT.png"):
        import_kolektorsdd2(src, tmp_path / "dst3")


# ----- the real sets beside the repository ------------------------------------------------------
@pytest.mark.realdata
def test_real_metal_plate(shared_data_dir):
    cat = MVTecCategory(shared_data_dir / "metal_plate")
    assert cat.counts() == {"train": {"good": 54}, "test": {"good": 26, "defect": 71}}
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in cat.test if s.label)
    report = cat.validate(check_pixels=False)
    assert report.image_sizes == {"512x512": 151} and report.warnings == []
    cat.require_test()


@pytest.mark.realdata
def test_real_hazelnut(shared_data_dir):
    cat = MVTecCategory(shared_data_dir / "hazelnut")
    assert cat.counts() == {"train": {"good": 28}, "test": {"good": 6, "colour": 17}}
    assert cat.defect_types == ["colour"]
    report = cat.validate(check_pixels=True)
    assert report.n_train == 28 and report.n_test == 23 and not report.skipped
    item = ImageDataset(cat.test, 64)[0]
    assert item["label"] == 1 and 0 < item["mask"].mean() < 0.5
