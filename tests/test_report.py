"""Tests of redi.core.visualize (pictures) and redi.workflow.report (the HTML evaluation report)."""

from __future__ import annotations

import html
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from redi.core import visualize as vis
from redi.core.config import profile_config
from redi.data.mvtec import Sample
from redi.core.errors import InputError
from redi.workflow.report import select_for_strips, write_report


# ----------------------------------------------------------------------------- visualize
def test_heatmap_uses_fixed_scale_and_saturates() -> None:
    ramp = np.array([[-1.0, 0.0, 0.5, 1.0, 3.0]], dtype=np.float32)
    heat = vis.heatmap_rgb(ramp, vmin=0.0, vmax=1.0, cmap="inferno")
    assert heat.dtype == np.uint8 and heat.shape == (1, 5, 3)
    assert (heat[0, 0] == heat[0, 1]).all()  # below vmin clamps to the first colour
    assert (heat[0, 3] == heat[0, 4]).all()  # above vmax saturates
    assert heat[0, 1].sum() < heat[0, 2].sum() < heat[0, 3].sum()  # inferno brightens with the value
    assert heat[0, 1].max() < 10 and heat[0, 3].min() > 150  # near black ... near pale yellow
    # The same value gets the same colour whatever else is in the map (no per-image stretching).
    other = vis.heatmap_rgb(np.array([[0.5, 0.51]], dtype=np.float32), 0.0, 1.0, cmap="inferno")
    assert (other[0, 0] == heat[0, 2]).all()


def test_heatmap_rejects_bad_scale_and_shape() -> None:
    with pytest.raises(InputError, match="vmax > vmin"):
        vis.heatmap_rgb(np.zeros((4, 4)), 1.0, 1.0)
    with pytest.raises(InputError, match="2-D"):
        vis.heatmap_rgb(np.zeros((1, 4, 4)), 0.0, 1.0)
    with pytest.raises(InputError, match="colormap"):
        vis.heatmap_rgb(np.zeros((4, 4)), 0.0, 1.0, cmap="no-such-map")


def test_display_range_is_fixed_by_threshold() -> None:
    assert vis.display_range(0.4) == (0.0, 0.8)
    maps = np.array([0.1, 2.5])
    assert vis.display_range(float("nan"), maps) == (0.0, 2.5)  # no threshold: the maps' maximum
    assert vis.display_range(None) == (0.0, 1.0)


def test_overlay_resizes_map_and_blends() -> None:
    image = np.full((40, 60, 3), 200, dtype=np.uint8)
    small_map = np.zeros((10, 15), dtype=np.float32)
    out = vis.overlay(image, small_map, vmin=0.0, vmax=1.0, alpha=0.5, cmap="inferno")
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    low = vis.heatmap_rgb(np.zeros((1, 1)), 0.0, 1.0, cmap="inferno")[0, 0].astype(int)
    np.testing.assert_allclose(out[20, 30], (200 + low) / 2, atol=1)
    assert (vis.overlay(image, small_map, 0.0, 1.0, alpha=0.0) == image).all()
    with pytest.raises(InputError, match="uint8 RGB"):
        vis.overlay(image.astype(np.float32), small_map, 0.0, 1.0)


def test_mask_contour_draws_only_the_outline() -> None:
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:20, 10:22] = True
    out = vis.mask_contour(image, mask, colour=(0, 255, 0))
    green = (out == (0, 255, 0)).all(axis=2)
    assert green[8, 10:22].all() and green[19, 10:22].all() and green[8:20, 10].all()  # the border
    assert not green[12:16, 14:18].any()  # the inside stays the image
    assert not green[~mask].any()  # nothing outside the mask
    assert (image == 0).all()  # the input is not modified
    half = vis.mask_contour(np.zeros((64, 64, 3), np.uint8), mask)  # a 32 px mask on a 64 px image
    assert (half == (0, 255, 0)).all(axis=2)[16, 20:44].all()


def test_defect_regions_finds_two_blobs_with_boxes() -> None:
    amap = np.zeros((64, 64), dtype=np.float32)
    amap[5:10, 5:15] = 1.0  # 50 px, rows 5..9, cols 5..14
    amap[40:50, 30:34] = 2.0  # 40 px
    amap[40, 31] = 3.0  # peak inside the second blob
    amap[60, 60] = 5.0  # a 1-pixel speckle, below min_area
    regions = vis.defect_regions(amap, threshold=0.5, min_area=16)
    assert len(regions) == 2
    first, second = regions  # sorted by peak score
    assert first == {"x0": 30, "y0": 40, "x1": 34, "y1": 50, "area": 40, "max_score": 3.0}
    assert second == {"x0": 5, "y0": 5, "x1": 15, "y1": 10, "area": 50, "max_score": 1.0}
    assert len(vis.defect_regions(amap, threshold=0.5, min_area=1)) == 3
    assert vis.defect_regions(amap, threshold=10.0) == []
    # Diagonal neighbours belong to one region (8-connectivity, as the AUPRO regions).
    diagonal = np.eye(8, dtype=np.float32)
    assert len(vis.defect_regions(diagonal, 0.5, min_area=1)) == 1


def test_draw_boxes_marks_the_region_border() -> None:
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    out = vis.draw_boxes(image, [{"x0": 2, "y0": 3, "x1": 8, "y1": 9}], colour=(255, 0, 0))
    red = (out == (255, 0, 0)).all(axis=2)
    assert red[3, 2:8].all() and red[8, 2:8].all() and red[3:9, 2].all() and red[3:9, 7].all()
    assert not red[5, 4] and not red[3, 8] and not red[9, 2]


def test_png_round_trip(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    data = vis.to_png_bytes(rgb)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert (np.asarray(Image.open(io.BytesIO(data))) == rgb).all()
    path = vis.save_png(tmp_path / "a" / "b.png", rgb)
    assert (np.asarray(Image.open(path)) == rgb).all()


def test_strip_and_placeholder() -> None:
    tile = np.zeros((30, 30, 3), dtype=np.uint8)
    grey = vis.placeholder_tile(30, "no prompt")
    assert grey.shape == (30, 30, 3) and (grey[0, 0] == vis.GREY).all() and (grey > 200).any()  # white text
    picture = vis.strip([(tile, "input"), (grey, "prompt")], tile_size=48, gap=2)
    assert picture.shape == (48 + vis.CAPTION_HEIGHT, 48 * 2 + 2, 3)
    assert (picture[48:, :48] > 200).any()  # the caption's white text under the first tile


# ----------------------------------------------------------------------------- selection rule
def test_select_for_strips_puts_mistakes_first_and_balances() -> None:
    labels = np.array([0] * 10 + [1] * 10)
    scores = np.r_[np.linspace(0.1, 0.4, 10), np.linspace(0.6, 0.9, 10)]
    scores[0], scores[10] = 0.95, 0.05  # one false alarm, one missed defect
    decisions = scores > 0.5
    chosen = select_for_strips(labels, scores, decisions, 0.5, limit=6)
    assert len(chosen) == len(set(chosen)) == 6
    assert set(chosen[:2]) == {0, 10}  # the two mistakes lead
    rest = chosen[2:]
    assert sum(labels[rest]) == 2 and sum(1 - labels[rest]) == 2  # the rest split evenly
    assert select_for_strips(labels, scores, decisions, 0.5, limit=50) == list(range(20))
    only_normals = select_for_strips(np.zeros(5, int), np.arange(5.0), None, float("nan"), limit=3)
    assert len(only_normals) == 3  # places not needed by one class go to the other


# ----------------------------------------------------------------------------- write_report
@pytest.fixture(scope="module")
def detector():
    from redi.methods.redi.detector import Detector

    cfg = profile_config("tiny")
    cfg.eval.report_max_images = 4
    det = Detector(cfg)
    n, size = 3, det.image_size
    generator = torch.Generator().manual_seed(0)
    det.set_prompts(torch.randn(n, det.backbone.embedding_dim, generator=generator),
                    torch.rand(n, 3, size, size, generator=generator), [f"train/good/p{i}" for i in range(n)])
    det.threshold.fill_(0.5)
    det.metadata = {"line": "caps <b>line</b>", "version": "v7", "profile": "tiny", "backbone": "efficientnet_lite0",
                    "created": "2025-01-01T00:00:00+00:00"}
    return det


def _fake_line(root: Path, size: int, n_good: int = 3, n_bad: int = 3, detector=None) -> tuple[
        list[Sample], torch.Tensor, torch.Tensor, dict, dict]:
    """Samples with real paths under ``root`` and a synthetic scoring result (with the ReDi
    ``detector``'s pictures when given: the recovered image and the prompt)."""
    samples, masks = [], torch.zeros(n_good + n_bad, size, size, dtype=torch.bool)
    for i in range(n_good + n_bad):
        bad = i >= n_good
        kind = "scratch" if bad else "good"
        image_id = f"test/{kind}/<script>alert({i})</script>" if i == 0 else f"test/{kind}/{i:03d}"
        path = root / "test" / kind / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        samples.append(Sample(path, int(bad), kind, None, image_id))
        if bad:
            masks[i, 20 + 5 * i:40 + 5 * i, 30:50] = True
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(len(samples), 3, size, size, generator=generator)
    maps = torch.rand(len(samples), size, size, generator=generator) * 0.3
    maps[masks] += 0.6
    scores = maps.flatten(1).amax(1)
    scores[1] = 0.8  # a false alarm, so a mistake has to be drawn first
    prompt_index = torch.arange(len(samples)) % 3
    prompt_index[1] = -1  # image 1 has no prompt
    result = {"scores": scores, "maps": maps}
    if detector is not None:
        from redi.methods.redi.detector import RediOutput

        output = RediOutput(scores, maps, torch.zeros(len(samples), 4), recovered=images.flip(-1),
                            prompt_index=prompt_index)
        result["pictures"] = detector.pictures(output)
    metrics = {"image_auroc": 0.91234567, "pixel_auroc": 0.87654321, "pixel_ap": 0.45678912, "aupro": 0.76543219,
               "f1_threshold": 0.61111111, "f1": 0.85714286, "threshold": 0.5, "recall_at_threshold": 1.0,
               "false_alarm_rate_at_threshold": 0.33333333, "accuracy_at_threshold": 0.83333333, "n_images": 6,
               "n_anomalous": 3, "n_normal": 3, "seconds_per_image": 0.0123}
    return samples, images, masks, result, metrics


def _links(page: str) -> list[str]:
    return re.findall(r'src="([^"]+)"', page) + re.findall(r'href="([^"]+)"', page)


def test_write_report_page_and_pictures(tmp_path: Path, detector) -> None:
    size = detector.image_size
    samples, images, masks, result, metrics = _fake_line(tmp_path / "data", size, detector=detector)
    assert list(result["pictures"]) == ["recovered Y", "prompt X+"]
    index = write_report(tmp_path / "report", detector, samples, images, masks, result, metrics)
    assert index == tmp_path / "report" / "index.html" and index.is_file()
    page = index.read_text(encoding="utf-8")

    links = _links(page)
    for link in links:  # self-contained: relative links only, and every one resolves
        assert not re.match(r"^[a-z]+:|^/", link), link
        assert (index.parent / link).is_file(), link
    for name in ("roc.png", "pr.png", "pro.png", "histogram.png", "colour_scale.png"):
        assert name in links
    strips = sorted({link for link in links if link.startswith("images/strip_")})  # mistakes show twice
    assert len(strips) == 4  # cfg.eval.report_max_images
    assert "images/strip_0001.png" in strips  # the false alarm is always drawn
    assert "not drawn" in page  # the two others are listed without a picture
    assert "<script" not in page.lower()  # no script at all, and the malicious id is escaped
    assert html.escape("test/good/<script>alert(0)</script>") in page
    assert "caps &lt;b&gt;line&lt;/b&gt;" in page and "<b>line</b>" not in page
    for key in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro", "f1_threshold", "threshold",
                "recall_at_threshold", "false_alarm_rate_at_threshold"):
        assert f"{metrics[key]:.4f}" in page, key
    for word in ("v7", "tiny", "efficientnet_lite0"):
        assert word in page
    assert "SYNTHETIC" not in page

    picture = np.asarray(Image.open(index.parent / "images" / "strip_0001.png"))
    assert picture.shape[0] > size and picture.shape[1] >= 5 * size  # five tiles side by side
    assert (picture[:size, -size:] == 0).all()  # image 1 has no prompt: its prompt tile is black
    with_prompt = np.asarray(Image.open(index.parent / strips[-1]))
    assert (with_prompt[:size, -size:] != 0).any()  # a real prompt image is drawn


def test_write_report_flags_synthetic_data_and_missing_masks(tmp_path: Path, detector) -> None:
    size = detector.image_size
    data = tmp_path / "demo" / "line"
    samples, images, masks, result, metrics = _fake_line(data, size, n_good=2, n_bad=2)
    (tmp_path / "demo" / "SYNTHETIC_DATA_README.md").write_text("Generated caps <made up>\n")
    masks[:] = False  # an image-level-only line
    metrics.update(pixel_auroc=None, pixel_ap=None, aupro=None)
    result.pop("pictures", None)
    index = write_report(tmp_path / "report", detector, samples, images, masks, result, metrics)
    page = index.read_text(encoding="utf-8")
    assert "SYNTHETIC DATA" in page and "Generated caps &lt;made up&gt;" in page
    assert "pro.png" not in page and not (index.parent / "pro.png").exists()
    assert "no ground-truth masks" in page
    for link in _links(page):
        assert (index.parent / link).is_file(), link


def test_write_report_rejects_mismatched_inputs(tmp_path: Path, detector) -> None:
    samples, images, masks, result, metrics = _fake_line(tmp_path / "data", detector.image_size, 2, 2)
    with pytest.raises(InputError, match="4 samples but scores holds 3"):
        write_report(tmp_path / "r", detector, samples, images, masks, {**result, "scores": result["scores"][:3]},
                     metrics)


def test_write_report_without_threshold(tmp_path: Path, detector) -> None:
    samples, images, masks, result, metrics = _fake_line(tmp_path / "data", detector.image_size, 2, 2)
    for key in ("threshold", "recall_at_threshold", "false_alarm_rate_at_threshold", "accuracy_at_threshold"):
        metrics.pop(key)
    saved = detector.threshold.clone()
    detector.threshold.fill_(float("nan"))
    try:
        page = write_report(tmp_path / "r", detector, samples, images, masks, result, metrics).read_text()
    finally:
        detector.threshold.copy_(saved)
    assert "no calibrated threshold" in page  # the colour scale falls back and says why
    assert "NO</td>" not in page and "<td>n/a</td><td>n/a</td>" in page  # no decisions claimed
    for link in _links(page):
        assert (tmp_path / "r" / link).is_file(), link


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


@pytest.mark.slow
def test_operating_point_section_in_a_browser(tmp_path: Path, detector) -> None:
    """A plant engineer opens the report: the verdict at the served threshold, the confusion matrix,
    recall per defect type, the trade-off curve (validation and test) and the escapes are on the page."""
    from redi.workflow.stages import operating_point_metrics

    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing (make test installs it: apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    samples, images, masks, result, metrics = _fake_line(tmp_path / "data", detector.image_size, n_good=4, n_bad=4)
    scores = result["scores"].numpy().astype(np.float64)
    scores[5] = 0.3  # one defect scores below the threshold (0.5): an escape
    result["scores"] = torch.from_numpy(scores).float()
    labels = np.array([s.label for s in samples])
    metrics.update(threshold_policy="gumbel_trimmed", false_call_target=0.01,
                   **operating_point_metrics(labels, scores, [s.defect_type for s in samples], 0.5, detector.cfg))
    point = metrics["operating_point"]
    assert (point["tp"], point["fn"], point["fp"], point["tn"]) == (3, 1, 1, 3)
    validation = {"labels": np.r_[np.zeros(4), np.ones(8)].astype(int),
                  "scores": np.r_[0.1, 0.2, 0.3, 0.4, np.linspace(0.45, 0.95, 8)]}
    metrics["validation"] = {"recall_at_threshold": 7 / 8, "false_call_rate_at_threshold": 0.0, "n_synthetic": 8}
    index = write_report(tmp_path / "report", detector, samples, images, masks, result, metrics,
                         validation=validation)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1400})
            page.goto(index.as_uri())
            verdict = page.locator(".verdict").inner_text()
            assert "Served threshold 0.5000" in verdict and "catches 3 of 4 defective parts (75.0 %)" in verdict
            assert "1 escape" in verdict and "flags 1 of 4 good parts (25.0 % false calls)" in verdict
            cells = page.locator("table.confusion td").all_inner_texts()
            assert cells == ["3 caught", "1 escaped", "1 false calls", "3 passed"]
            assert page.get_by_role("heading", name="Escaped defective parts (1)").is_visible()
            assert page.get_by_role("heading", name="False calls: good parts flagged (1)").is_visible()
            curve = page.locator('img[src="tradeoff.png"]')
            curve.scroll_into_view_if_needed()
            assert curve.evaluate("img => img.complete && img.naturalWidth > 300")  # the picture loaded
            assert "scratch" in page.locator("text=Recall per defect type").locator("xpath=following::table[1]") \
                .inner_text()
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000
