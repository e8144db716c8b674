"""Tests of redi.core.selfmaps: TorchHOG against skimage's rendered HOG, edge maps, dispatch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data, transform
from skimage.feature import canny
from skimage.util import img_as_ubyte

from redi.core.config import SelfMapConfig
from redi.core.errors import ConfigError, InputError, WeightsError
from redi.core.selfmaps import (
    CannyMap,
    RobertsMap,
    SobelMap,
    TorchHOG,
    build_selfmap,
    fit_selfmap_scale,
    hog_image_skimage,
    orientation_bin_table,
    selfmap_names,
)

# TorchHOG reproduces skimage up to float32 summation order; measured max ~2.4e-7.
MAX_DIFF = 1e-5
MEAN_DIFF = 1e-7


def _resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return img_as_ubyte(transform.resize(image[..., :3], (height, width), anti_aliasing=True))


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


IMAGES = {
    "astronaut_256": lambda: _resized(data.astronaut(), 256, 256),
    "chelsea_256": lambda: _resized(data.chelsea(), 256, 256),
    "brick_256": lambda: _resized(data.brick(), 256, 256),
    "random_256": lambda: np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8),
    "coffee_200x136": lambda: _resized(data.coffee(), 200, 136),
    "coffee_203x141": lambda: _resized(data.coffee(), 203, 141),  # not a multiple of the cell
}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_torch_hog_matches_skimage(name: str) -> None:
    image = IMAGES[name]()
    reference = hog_image_skimage(image, orientations=9, cell=8)
    ours = TorchHOG(9, 8)(_to_tensor([image]))[0, 0].numpy()
    assert ours.shape == reference.shape == image.shape[:2]
    diff = np.abs(ours - reference)
    assert diff.max() < MAX_DIFF, f"{name}: max abs diff {diff.max():.2e}"
    assert diff.mean() < MEAN_DIFF, f"{name}: mean abs diff {diff.mean():.2e}"
    assert reference.max() == pytest.approx(1.0, abs=1e-5)  # per-image max scaling


@pytest.mark.parametrize("orientations,cell", [(8, 8), (12, 6), (9, 7), (4, 16)])
def test_torch_hog_matches_skimage_other_settings(orientations: int, cell: int) -> None:
    # Cell 7 exercises skimage's position-dependent line endpoints (float rounding of centre - d).
    image = IMAGES["chelsea_256"]()[:150, :230]
    reference = hog_image_skimage(image, orientations=orientations, cell=cell)
    ours = TorchHOG(orientations, cell)(_to_tensor([image]))[0, 0].numpy()
    assert np.abs(ours - reference).max() < MAX_DIFF


def test_remainder_rows_and_columns_are_zero() -> None:
    image = IMAGES["coffee_203x141"]()
    ours = TorchHOG()(_to_tensor([image]))[0, 0]
    assert ours.shape == (203, 141)
    assert torch.all(ours[200:, :] == 0) and torch.all(ours[:, 136:] == 0)
    assert ours[:200, :136].max() > 0.99


def test_pooled_histograms_equal_scattered() -> None:
    # The pooled path is CUDA's default; checking it on the CPU covers its indexing everywhere.
    hog = TorchHOG()
    x = _to_tensor([IMAGES["coffee_203x141"](), np.random.default_rng(2).integers(0, 256, (203, 141, 3), dtype=np.uint8)])
    scattered = hog.histograms(x, pooled=False)
    pooled = hog.histograms(x, pooled=True)
    assert scattered.shape == (2, 9, 25, 17)
    torch.testing.assert_close(pooled, scattered, rtol=1e-6, atol=1e-4)
    assert scattered.sum() > 0


def test_orientation_table_bins() -> None:
    table = orientation_bin_table(9)

    def bin_of(g_row: int, g_col: int) -> int:
        return int(table[(g_row + 255) * 511 + g_col + 255])

    assert bin_of(0, 5) == 0 and bin_of(0, -5) == 0  # 0 and 180 degrees fold to bin 0
    assert bin_of(5, 0) == 4  # 90 degrees lies in [80, 100)
    assert bin_of(-5, -5) == 2  # -135 % 180 = 45, in [40, 60)
    assert bin_of(1, 255) == 0 and bin_of(255, -1) == 4


def test_grey_input_matches_skimage_grey() -> None:
    grey = img_as_ubyte(transform.resize(data.camera(), (96, 128), anti_aliasing=True))
    reference = hog_image_skimage(grey)
    ours = TorchHOG()(torch.from_numpy(grey)[None, None].float() / 255.0)[0, 0].numpy()
    assert np.abs(ours - reference).max() < MAX_DIFF


def test_batch_consistency_and_determinism() -> None:
    images = [IMAGES[name]() for name in ("astronaut_256", "chelsea_256", "brick_256", "random_256", "astronaut_256")]
    batch = _to_tensor(images)
    for module in (TorchHOG(), SobelMap(), RobertsMap(), CannyMap()):
        together = module(batch)
        again = module(batch)
        assert torch.equal(together, again), f"{type(module).__name__} is not deterministic"
        alone = module(batch[1:2])
        torch.testing.assert_close(alone[0], together[1], rtol=0, atol=1e-6)
        assert torch.equal(together[0], together[4])  # same image, same map, wherever in the batch


@pytest.mark.parametrize("kind", ["hog", "sobel", "roberts", "canny"])
def test_shapes_and_ranges(kind: str) -> None:
    module = build_selfmap(SelfMapConfig(kind=kind, scale="image"))
    x = torch.rand(3, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    out = module(x)
    assert out.shape == (3, 1, 64, 48) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert out.amax(dim=(1, 2, 3)).min() > 0.99  # every map uses the full range
    assert torch.equal(module(x.clone().requires_grad_(True)), out)  # works on tensors needing grad
    flat = module(torch.full((2, 3, 32, 32), 0.5))
    assert torch.equal(flat, torch.zeros_like(flat))  # no NaN from dividing by a zero maximum


def test_sobel_and_roberts_respond_at_a_step_only() -> None:
    x = torch.zeros(1, 3, 16, 16)
    x[..., 8:] = 1.0  # vertical step between columns 7 and 8
    sobel = SobelMap()(x)[0, 0]
    roberts = RobertsMap()(x)[0, 0]
    assert torch.all(sobel[:, 7:9] > 0.999) and sobel[:, :7].abs().sum() == 0 and sobel[:, 9:].abs().sum() == 0
    assert torch.all(roberts[:, 7] > 0.999) and roberts[:, :7].sum() == 0 and roberts[:, 8:].sum() == 0


def test_canny_thresholds_are_in_0_255_units() -> None:
    def step(level: float) -> torch.Tensor:
        x = torch.zeros(1, 3, 32, 32)
        x[..., 10:22, 10:22] = level / 255.0
        return x

    module = CannyMap(50, 100)
    assert module(step(10)).sum() == 0  # Sobel response 4 * 10 = 40 < low threshold
    strong = module(step(200))[0, 0]
    assert strong.sum() > 30 and set(strong.unique().tolist()) <= {0.0, 1.0}
    grey = (step(200)[0, 0] * 255).round().to(torch.uint8).numpy()
    expected = canny(grey, sigma=0.0, low_threshold=50, high_threshold=100)
    assert np.array_equal(strong.numpy().astype(bool), expected)


def test_build_selfmap_dispatch_and_errors() -> None:
    hog = build_selfmap(SelfMapConfig(kind="hog", hog_orientations=12, hog_cell=16))
    assert isinstance(hog, TorchHOG) and (hog.orientations, hog.cell) == (12, 16)
    assert isinstance(build_selfmap(SelfMapConfig(kind="sobel")), SobelMap)
    assert isinstance(build_selfmap(SelfMapConfig(kind="roberts")), RobertsMap)
    edges = build_selfmap(SelfMapConfig(kind="canny", canny_low=20, canny_high=40))
    assert isinstance(edges, CannyMap) and (edges.low, edges.high) == (20.0, 40.0)
    with pytest.raises(ConfigError, match=r"unknown self-map kind 'laplace' \(setting model.selfmap.kind\); "
                                          r"choose one of \['hog', 'sobel', 'roberts', 'canny'\]"):
        build_selfmap(SelfMapConfig(kind="laplace"))
    with pytest.raises(ConfigError, match="hog_cell"):
        build_selfmap(SelfMapConfig(kind="hog", hog_cell=1))
    with pytest.raises(ConfigError, match="canny_low"):
        build_selfmap(SelfMapConfig(kind="canny", canny_low=100, canny_high=50))


def test_bad_inputs_raise_input_error() -> None:
    hog = TorchHOG()
    with pytest.raises(InputError):
        hog(torch.rand(1, 4, 32, 32))
    with pytest.raises(InputError):
        hog(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(InputError, match="smaller than one"):
        hog(torch.rand(1, 3, 4, 32))
    with pytest.raises(InputError):
        hog_image_skimage(np.zeros((32, 32, 3), dtype=np.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    images = [IMAGES[name]() for name in ("astronaut_256", "random_256", "chelsea_256")]
    batch = _to_tensor(images)
    for kind in ("hog", "sobel", "roberts", "canny"):
        module = build_selfmap(SelfMapConfig(kind=kind))
        fit_selfmap_scale(module, batch, 99.5)
        cpu = module(batch)
        gpu = module.to("cuda")(batch.cuda())
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)
        assert torch.equal(gpu, module(batch.cuda()))  # deterministic on CUDA too


def test_config_validates_selfmap_kinds_from_the_registry():
    """Every registered self-map is a valid setting, and an unknown one is refused with the names."""
    from redi.core.config import from_dict
    from redi.core.errors import ConfigError

    for kind in selfmap_names():
        assert from_dict({"profile": "tiny", "model": {"selfmap": {"kind": kind}}}).model.selfmap.kind == kind
    with pytest.raises(ConfigError, match="model.selfmap.kind must be one of .*hog"):
        from_dict({"profile": "tiny", "model": {"selfmap": {"kind": "laplace"}}})


def _texture_with_defect() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fine random texture, the same texture with a strong 8x10 dark-on-bright patch, and the patch's mask."""
    g = torch.Generator().manual_seed(3)
    base = (0.45 + 0.1 * torch.rand(1, 1, 128, 128, generator=g)).expand(1, 3, 128, 128).clone()
    defect = base.clone()
    defect[:, :, 60:68, 60:70] = 0.0
    defect[:, :, 62:66, 62:68] = 1.0
    mask = torch.zeros(128, 128, dtype=torch.bool)
    mask[52:76, 52:78] = True  # the patch and the HOG cells its edges reach
    return base, defect, mask


@pytest.mark.parametrize("kind", ["hog", "sobel", "roberts"])
def test_line_scale_keeps_normal_regions_unchanged_by_a_defect(kind: str) -> None:
    """With one fixed scale per line a defect changes only its own neighbourhood of the map;
    per-image max scaling dims every normal region of the defective image."""
    base, defect, mask = _texture_with_defect()
    bank = torch.cat([base, base.flip(-1), base.flip(-2)])
    line = build_selfmap(SelfMapConfig(kind=kind, scale="line"))
    scale = fit_selfmap_scale(line, bank, 99.5)
    assert scale > 0 and torch.equal(line.scale, torch.tensor(scale))
    normal = ~mask
    clean_map, defect_map = line(base)[0, 0], line(defect)[0, 0]
    torch.testing.assert_close(defect_map[normal], clean_map[normal], rtol=0, atol=1e-6)
    per_image = build_selfmap(SelfMapConfig(kind=kind, scale="image"))
    ratio = per_image(defect)[0, 0][normal].sum() / per_image(base)[0, 0][normal].sum()
    assert ratio < 0.9, f"per-image scaling was expected to dim the normal regions (ratio {ratio:.2f})"


def test_line_scale_must_be_fitted_and_travels_in_the_state_dict() -> None:
    hog = build_selfmap(SelfMapConfig(kind="hog"))
    with pytest.raises(WeightsError, match="not fitted"):
        hog(torch.rand(1, 3, 32, 32))
    fit_selfmap_scale(hog, torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), 99.0)
    copy = build_selfmap(SelfMapConfig(kind="hog"))
    copy.load_state_dict(hog.state_dict())
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(copy(x), hog(x))
