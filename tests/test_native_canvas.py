"""``data.aspect=native``: a line's own non-square canvas, measured on its training images, kept by
the fitted model and used alike by training, calibration, evaluation and prediction."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from tiny_line import make_wide_line

from redi.core.config import RediConfig, profile_config
from redi.core.errors import ConfigError, InputError
from redi.core.images import load_rgb, native_canvas, preprocess, resize_mask
from redi.data.synthetic import synthesize_defects
from redi.methods.base import load_detector


@pytest.mark.parametrize("sizes, short, expected", [
    ([(900, 900), (1024, 1024)], 256, (256, 256)),  # a square line: the squash input itself
    ([(500, 1260)] * 3, 256, (256, 640)),  # the strip line of issue 17: 2.52 -> 640 columns
    ([(1260, 500)] * 3, 256, (640, 256)),  # the same strip standing up
    ([(100, 2000)], 128, (128, 512)),  # 20:1 is capped at 4 S
    ([(300, 400), (300, 900), (300, 1200)], 256, (256, 768)),  # the median aspect, 3
    ([(300, 310)], 64, (64, 64)),  # 1.03: the nearest multiple of 32 is S itself
])
def test_native_canvas_keeps_the_short_side_and_the_lines_aspect(sizes, short, expected):
    assert native_canvas(sizes, short) == expected


def test_native_canvas_refuses_what_it_cannot_measure():
    with pytest.raises(InputError, match="training images"):
        native_canvas([], 256)
    with pytest.raises(InputError, match="multiple of 32"):
        native_canvas([(10, 20)], 100)
    with pytest.raises(InputError, match="positive"):
        native_canvas([(0, 20)], 64)


def test_config_says_when_the_native_canvas_is_missing_or_malformed():
    cfg = RediConfig(profile="tiny")
    assert cfg.data.input_hw() == (cfg.data.image_size, cfg.data.image_size)
    cfg.data.aspect = "native"
    with pytest.raises(ConfigError, match="data.canvas"):
        cfg.data.input_hw()
    cfg.data.canvas = [64, 192]
    assert cfg.data.input_hw() == (64, 192)
    cfg.validate()
    cfg.data.canvas = [64, 100]
    with pytest.raises(ConfigError, match="multiples of 32"):
        cfg.validate()
    cfg.data.canvas, cfg.data.aspect = [64, 192], "squash"  # a canvas that would be ignored is refused
    with pytest.raises(ConfigError, match="aspect=native only"):
        cfg.validate()


def test_preprocess_and_masks_share_the_native_canvas():
    rgb = np.random.default_rng(0).integers(0, 255, (50, 130, 3), dtype=np.uint8)
    mask = np.zeros((50, 130), dtype=bool)
    mask[10:20, 100:120] = True
    x = preprocess([rgb], (64, 160), "native")
    small = resize_mask(mask, (64, 160), "native")
    assert x.shape == (1, 3, 64, 160) and small.shape == (64, 160)
    rows, cols = np.nonzero(small)
    # the box keeps its place: rows 10-20 of 50 and columns 100-120 of 130, scaled
    assert rows.min() == pytest.approx(10 * 64 / 50, abs=1.5) and cols.min() == pytest.approx(100 * 160 / 130, abs=1.5)


def test_synthetic_defects_on_a_wide_canvas_are_exact_and_spread_along_it():
    rng = np.random.default_rng(1)
    base = rng.integers(60, 200, (1, 64, 64, 3), dtype=np.uint8)
    wide = np.concatenate([base, base[:, :, ::-1], base], axis=2)  # (1, 64, 192, 3)
    donors = np.concatenate([wide, wide[:, ::-1]], axis=0)
    result = synthesize_defects(wide, donors, per_image=12, seed=3)
    assert result.images.shape == (12, 3, 64, 192) and result.masks.shape == (12, 64, 192)
    clean = torch.from_numpy(wide[0]).permute(2, 0, 1)
    for image, mask in zip(result.images, result.masks):
        changed = ((image * 255).round().to(torch.uint8) != clean).any(dim=0)
        assert torch.equal(changed, mask) and mask.any()
        columns = torch.nonzero(mask)[:, 1]
        assert int(columns.max() - columns.min()) < 64  # drawn inside one 64 x 64 window
    centres = [float(torch.nonzero(m)[:, 1].float().mean()) for m in result.masks]
    assert min(centres) < 64 and max(centres) > 128  # the windows cover the whole strip


def test_a_square_stack_draws_the_same_defects_as_before_the_windows():
    """The window's draws come from their own generator: a square image's defects do not move.
    The digest was computed with the code before windows existed (commit c8649a1)."""
    images = np.random.default_rng(2).integers(60, 200, (3, 64, 64, 3), dtype=np.uint8)
    out = synthesize_defects(images, per_image=3, seed=5)
    pixels = (out.images.numpy() * 255).round().astype(np.uint8)
    digest = hashlib.sha256(out.masks.numpy().tobytes() + pixels.tobytes()).hexdigest()
    assert digest[:16] == "38a514b02311134e"


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    from redi.workflow.stages import train_all

    root = tmp_path_factory.mktemp("native")
    data = make_wide_line(root, "bottle_caps")
    cfg = profile_config("tiny")
    cfg.data.image_size, cfg.data.aspect = 64, "native"
    cfg.train.recover.epochs = cfg.train.discriminate.epochs = 1
    cfg.train.device, cfg.model.candidates = "cpu", ["redi", "patchcore", "fused"]
    paths = train_all(data, root / "run", cfg, line="strips")
    return {"root": root, "data": data, "paths": paths, "cfg": cfg}


@pytest.mark.parametrize("method", ["redi", "patchcore", "fused"])
def test_every_candidate_fits_and_serves_the_lines_own_canvas(wide_run, method):
    detector = load_detector(wide_run["paths"][f"candidate_{method}"])
    assert detector.cfg.data.aspect == "native" and detector.cfg.data.canvas == [64, 192]
    assert detector.input_hw == (64, 192)
    image = load_rgb(sorted((wide_run["data"] / "test").glob("*/*.png"))[0])
    assert image.shape[:2] == (128, 384)
    out = detector.predict(detector.preprocess([image]))
    assert out.anomaly_map.shape == (1, 64, 192) and torch.isfinite(out.score).all()
    assert not torch.isnan(detector.threshold)


def test_evaluation_scores_a_native_line_with_its_masks(wide_run):
    import json

    from redi.workflow.stages import evaluate

    out = wide_run["root"] / "eval"
    evaluate(wide_run["paths"]["detector"], wide_run["data"], out, wide_run["cfg"], write_report=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and 0.0 <= metrics["pixel_ap"] <= 1.0
    assert "64 x 192 px (height x width), native" in (out / "report" / "index.html").read_text()
