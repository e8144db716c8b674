"""Validation without test labels: synthetic defects with exact masks, the margin table, the stage and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from redi.data.demo import generate_pair
from redi.data.mvtec import MVTecCategory
from redi.data.synthetic import SYNTHETIC_KINDS, synthesize_defects, to_uint8_images
from redi.core.errors import DatasetError, InputError
from redi.workflow.validation import MARGINS, held_out_split, margin_table

SIZE = 96


@pytest.fixture(scope="module")
def clean_images() -> np.ndarray:
    """Four caps and four fabric images, uint8 (8, S, S, 3)."""
    return np.stack([generate_pair(line, SIZE, 0, "train", i).image
                     for line in ("bottle_caps", "woven_fabric") for i in range(4)])


def _changed(images: torch.Tensor, clean: np.ndarray, sources: list[int]) -> np.ndarray:
    """Which pixels of each synthetic image differ from its clean source after uint8 rounding."""
    return (to_uint8_images(images) != clean[sources]).any(axis=-1)


def test_every_kind_has_an_exact_mask_inside_the_image(clean_images):
    synthetic = synthesize_defects(clean_images, per_image=4, seed=3)
    assert len(synthetic) == 4 * len(clean_images)
    assert set(synthetic.kinds) == set(SYNTHETIC_KINDS)
    assert synthetic.images.dtype == torch.float32 and synthetic.images.shape == (32, 3, SIZE, SIZE)
    assert synthetic.masks.dtype == torch.bool and (synthetic.labels == 1).all()
    assert 0.0 <= float(synthetic.images.min()) and float(synthetic.images.max()) <= 1.0
    masks = synthetic.masks.numpy()
    assert np.array_equal(masks, _changed(synthetic.images, clean_images, synthetic.sources))
    areas = masks.reshape(len(synthetic), -1).sum(axis=1)
    assert (areas >= 12).all(), "a defect must be visible"
    assert (areas < 0.25 * SIZE * SIZE).all(), "a defect is small to medium, never the whole image"


def test_float_sources_keep_their_exact_pixels_outside_the_defect(clean_images):
    # model input is not on the uint8 grid; outside the mask a synthetic image must equal it bit for bit
    sources = torch.from_numpy(clean_images).permute(0, 3, 1, 2).float() / 255.0 + 0.001
    synthetic = synthesize_defects(sources, per_image=4, seed=3)
    assert np.array_equal(synthetic.masks.numpy(),
                          _changed(synthetic.images, to_uint8_images(sources), synthetic.sources))
    for image, mask, source in zip(synthetic.images, synthetic.masks, synthetic.sources):
        assert torch.equal(image[:, ~mask], sources[source][:, ~mask])


def test_defects_are_deterministic_in_the_seed(clean_images):
    first = synthesize_defects(clean_images, per_image=2, seed=5)
    again = synthesize_defects(clean_images, per_image=2, seed=5)
    other = synthesize_defects(clean_images, per_image=2, seed=6)
    assert torch.equal(first.images, again.images) and torch.equal(first.masks, again.masks)
    assert first.kinds == again.kinds and first.donors == again.donors
    assert not torch.equal(first.masks, other.masks)
    # with the same donors a defect depends on its own (image, defect) only: fewer images leave the others as they were
    donors = clean_images[4:]
    full = synthesize_defects(clean_images[:4], donors, per_image=2, seed=5)
    fewer = synthesize_defects(clean_images[:3], donors, per_image=2, seed=5)
    assert torch.equal(fewer.images, full.images[:6]) and fewer.donors == full.donors[:6]


def test_cutpaste_takes_its_patch_from_another_image(clean_images):
    synthetic = synthesize_defects(clean_images, per_image=3, seed=1, kinds=("cutpaste",))
    assert synthetic.kinds == ["cutpaste"] * len(synthetic)
    assert all(0 <= d < len(clean_images) and d != s for d, s in zip(synthetic.donors, synthetic.sources))
    # given donors: indices into them, and the rest of the kinds carry no donor
    donors = clean_images[4:]
    mixed = synthesize_defects(clean_images[:4], donors, per_image=4, seed=1)
    for kind, donor in zip(mixed.kinds, mixed.donors):
        assert (0 <= donor < len(donors)) if kind == "cutpaste" else donor == -1


def test_texture_kinds_are_thin_low_contrast_and_small(clean_images):
    synthetic = synthesize_defects(clean_images, per_image=3, seed=5, kinds=("crack", "blowhole", "patch"))
    clean = clean_images[synthetic.sources].astype(np.float64)
    damaged = to_uint8_images(synthetic.images).astype(np.float64)
    for i, kind in enumerate(synthetic.kinds):
        mask = synthetic.masks[i].numpy()
        ratio = damaged[i][mask].mean() / max(clean[i][mask].mean(), 1.0)
        if kind == "crack":  # a thin line, slightly darker than the surface
            assert 0.65 <= ratio <= 0.9 and mask.sum() < 0.01 * mask.size
        elif kind == "blowhole":
            assert ratio < 0.85 and mask.sum() < 0.01 * mask.size
        else:  # patch: a shift of 8-18 % in brightness, over a larger region
            assert 0.75 <= ratio <= 1.25 and abs(ratio - 1.0) > 0.04


def test_bad_inputs_are_refused_with_a_clear_error(clean_images):
    with pytest.raises(InputError, match="unknown synthetic defect kinds"):
        synthesize_defects(clean_images, kinds=("dent",))
    with pytest.raises(InputError, match="uint8"):
        synthesize_defects(clean_images.astype(np.float32))
    with pytest.raises(InputError, match="donor"):  # one image cannot be its own donor
        synthesize_defects(clean_images[:1], kinds=("cutpaste",))


def test_margin_table_prefers_the_larger_margin_on_a_tie():
    normal = np.array([1.0, 1.1, 1.2, 1.3])
    defect = np.array([5.0, 6.0])  # every margin catches them all
    rows, best = margin_table(normal, defect, quantile=1.0)
    assert [r["margin"] for r in rows] == list(MARGINS) and MARGINS[0] == 0.8 and MARGINS[-1] == 1.5
    # leave-one-out: at m = 1.0 the highest normal exceeds the max of the others (1 false alarm in 4)
    at_one = next(r for r in rows if r["margin"] == 1.0)
    assert at_one["false_alarm_rate"] == 0.25 and at_one["false_alarm_rate_in_sample"] == 0.0
    assert best == 1.5
    # a defect just above the normals: a large margin misses it, so a smaller one wins
    rows, best = margin_table(normal, np.array([1.35, 1.36]), quantile=1.0)
    assert best < 1.1
    with pytest.raises(DatasetError, match="at least 3 normal"):
        margin_table(normal[:1], defect, quantile=1.0)


def test_fewer_than_two_held_out_normals_is_a_clear_error(demo_line_root):
    category = MVTecCategory(demo_line_root)
    ids = [s.image_id for s in category.train]
    with pytest.raises(DatasetError, match="at least 2"):
        held_out_split(SimpleNamespace(fit_image_ids=ids[1:]), category)
    with pytest.raises(DatasetError, match="trained on"):
        held_out_split(SimpleNamespace(fit_image_ids=["train/good/elsewhere"]), category)
    held, bank = held_out_split(SimpleNamespace(fit_image_ids=ids[2:]), category)
    assert [s.image_id for s in held] == ids[:2] and len(bank) == len(ids) - 2


def _check_metrics(result: dict) -> None:
    for key in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro"):
        assert 0.0 <= result["metrics"][key] <= 1.0, key
    assert [row["margin"] for row in result["margin_table"]] == list(MARGINS)
    assert result["recommended_margin"] in MARGINS
    # kinds cycle over the defects: with fewer defects than kinds, the first ones
    count = result["counts"]["synthetic"]
    assert list(result["per_kind"]) == list(SYNTHETIC_KINDS[:min(count, len(SYNTHETIC_KINDS))])
    assert sum(kind["n"] for kind in result["per_kind"].values()) == count


def test_validate_stage_end_to_end(trained_line, tmp_path):
    from redi.core.config import load_config
    from redi.methods.base import load_detector
    from redi.workflow.validation import validate

    cfg = load_config(profile="tiny", overrides=[f"data.root={trained_line['data']}", "train.device=cpu"])
    path = validate(trained_line["detector"], trained_line["data"], tmp_path, cfg)
    result = json.loads(Path(path).read_text())
    _check_metrics(result)
    detector = load_detector(trained_line["detector"])
    held = result["held_out_ids"]
    assert held and not set(held) & set(detector.prompt_ids), "validation must use images the detector never trained on"
    assert result["counts"]["normal"] == len(held)
    assert result["counts"]["synthetic"] == len(held) * cfg.eval.synthetic_per_image
    assert result["threshold"] == pytest.approx(float(detector.threshold))
    assert (tmp_path / "val_examples.png").stat().st_size > 0


def test_validate_command(trained_line, tmp_path, capsys):
    from redi.cli.main import main

    out = tmp_path / "val"
    code = main(["validate-detector", str(trained_line["run"]), str(trained_line["data"]), "--out", str(out),
                 "--profile", "tiny", "--set", "train.device=cpu", "--set", "eval.synthetic_per_image=1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert '"image_auroc"' in printed and "recommended_margin" in printed
    result = json.loads((out / "val_metrics.json").read_text())
    _check_metrics(result)
    assert result["counts"]["synthetic"] == result["counts"]["normal"]
    # a folder that is not the detector's line is refused with a message, not a traceback
    assert main(["validate-detector", str(trained_line["run"]), str(out), "--out", str(out)]) == 2
