"""redi.core.images: every file mode becomes uint8 RGB, bad files raise errors that name them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from redi.core.errors import DatasetError, ImageReadError, InputError
from redi.core.images import (crop_to_content, decode_rgb, image_size_of, letterbox_geometry, load_mask, load_rgb,
                         preprocess, resize_mask, resize_rgb, to_uint8_rgb)


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _gradient_rgb(h: int = 12, w: int = 16) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs * 15, ys * 20, (xs + ys) * 5], axis=2).astype(np.uint8)


def test_rgb_png_round_trips(tmp_path):
    rgb = _gradient_rgb()
    out = load_rgb(_save(Image.fromarray(rgb), tmp_path / "a.png"))
    assert out.dtype == np.uint8 and out.shape == (12, 16, 3)
    np.testing.assert_array_equal(out, rgb)


def test_grey_and_one_bit_become_three_equal_channels(tmp_path):
    grey = (np.arange(12 * 16).reshape(12, 16) % 256).astype(np.uint8)
    out = load_rgb(_save(Image.fromarray(grey, mode="L"), tmp_path / "g.png"))
    assert out.shape == (12, 16, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)
    bits = Image.fromarray((grey > 100).astype(np.uint8) * 255).convert("1")
    out1 = load_rgb(_save(bits, tmp_path / "b.png"))
    assert set(np.unique(out1).tolist()) == {0, 255}


def test_rgba_is_composited_on_black(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = [200, 100, 50]
    rgba[0, :, 3] = 255
    rgba[1, :, 3] = 0
    rgba[2, :, 3] = 128
    out = load_rgb(_save(Image.fromarray(rgba, mode="RGBA"), tmp_path / "a.png"))
    assert out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out[0, 0], [200, 100, 50])
    np.testing.assert_array_equal(out[1, 0], [0, 0, 0])
    np.testing.assert_allclose(out[2, 0], [100, 50, 25], atol=1)


def test_la_is_composited_on_black(tmp_path):
    la = np.zeros((2, 2, 2), dtype=np.uint8)
    la[..., 0] = 180
    la[0, :, 1] = 255
    out = load_rgb(_save(Image.fromarray(la, mode="LA"), tmp_path / "la.png"))
    np.testing.assert_array_equal(out[0, 0], [180, 180, 180])
    np.testing.assert_array_equal(out[1, 0], [0, 0, 0])


def test_palette_is_expanded(tmp_path):
    pal = Image.new("P", (3, 2))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    pal.putdata([0, 1, 0, 1, 1, 0])
    out = load_rgb(_save(pal, tmp_path / "p.png"))
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 255])
    # palette with a transparent index: that index goes black
    out_t = load_rgb(_save(pal, tmp_path / "pt.png", transparency=1))
    np.testing.assert_array_equal(out_t[0, 1], [0, 0, 0])
    np.testing.assert_array_equal(out_t[0, 0], [255, 0, 0])


def test_sixteen_bit_is_divided_by_257(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 257 * 7 + 200]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "s.png")
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    out = load_rgb(path)
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255, 8])


def test_int32_mode_scaling(tmp_path):
    in_range = np.array([[0, 257 * 50, 65535]], dtype=np.int32)
    out = load_rgb(_save(Image.fromarray(in_range, mode="I"), tmp_path / "i.tif"))
    np.testing.assert_array_equal(out[0, :, 1], [0, 50, 255])
    wide = np.array([[-1000, 0, 99000]], dtype=np.int32)
    out_w = load_rgb(_save(Image.fromarray(wide, mode="I"), tmp_path / "w.tif"))
    assert out_w[0, 0, 0] == 0 and out_w[0, 2, 0] == 255 and 0 < out_w[0, 1, 0] < 10


def test_cmyk_is_converted(tmp_path):
    out = load_rgb(_save(Image.new("CMYK", (3, 3), (0, 255, 255, 0)), tmp_path / "c.tif"))
    np.testing.assert_array_equal(out[1, 1], [255, 0, 0])


def _png_bytes(h: int = 64, w: int = 64) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_names_the_file(tmp_path, fmt):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError, match="cut"):
        load_rgb(path)


def test_non_image_and_missing_files(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ImageReadError, match="notes.png") as info:
        load_rgb(text)
    assert "skip_bad_files" in str(info.value)  # the message says what to do
    with pytest.raises(ImageReadError, match="does not exist"):
        load_rgb(tmp_path / "absent.png")
    with pytest.raises(ImageReadError, match="notes.png"):
        load_mask(text)


def test_load_mask_thresholds_any_nonzero(tmp_path):
    m = np.zeros((5, 6), dtype=np.uint8)
    m[1, 2], m[3, 4] = 1, 255
    out = load_mask(_save(Image.fromarray(m), tmp_path / "m.png"))
    assert out.dtype == bool and out.shape == (5, 6)
    assert out.sum() == 2 and out[1, 2] and out[3, 4]
    rgb = np.zeros((5, 6, 3), dtype=np.uint8)
    rgb[0, 0, 2] = 9
    assert load_mask(_save(Image.fromarray(rgb), tmp_path / "rgb.png")).sum() == 1
    # palette masks: index 0 may be white; the colour, not the index, decides
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 255, 255, 0, 0, 0] + [0] * (254 * 3))
    pal.putdata([0, 1])
    np.testing.assert_array_equal(load_mask(_save(pal, tmp_path / "p.png")), [[True, False]])


def test_load_mask_size_mismatch_names_both(tmp_path):
    path = _save(Image.fromarray(np.zeros((5, 6), dtype=np.uint8)), tmp_path / "m_mask.png")
    assert load_mask(path, expected_hw=(5, 6)).shape == (5, 6)
    with pytest.raises(DatasetError, match="m_mask.png") as info:
        load_mask(path, expected_hw=(10, 12), image_path=tmp_path / "m.png")
    assert "m.png" in str(info.value) and "6x5" in str(info.value) and "12x10" in str(info.value)


def test_image_size_of_reads_header(tmp_path):
    path = _save(Image.fromarray(_gradient_rgb(7, 9)), tmp_path / "a.png")
    assert image_size_of(path) == (7, 9)


def test_decode_rgb_matches_load_rgb(tmp_path):
    data = _png_bytes()
    path = tmp_path / "x.png"
    path.write_bytes(data)
    np.testing.assert_array_equal(decode_rgb(data), load_rgb(path))
    grey = io.BytesIO()
    Image.new("L", (4, 3), 77).save(grey, format="PNG")
    out = decode_rgb(grey.getvalue())
    assert out.shape == (3, 4, 3) and (out == 77).all()


def test_decode_rgb_errors():
    with pytest.raises(ImageReadError):
        decode_rgb(b"")
    with pytest.raises(ImageReadError, match="upload.bin"):
        decode_rgb(b"GIF89a garbage", name="upload.bin")
    data = _png_bytes(64, 64)
    with pytest.raises(InputError, match="4096"):
        decode_rgb(data, max_pixels=1000)
    assert decode_rgb(data, max_pixels=4096).shape == (64, 64, 3)
    # the size check runs on the header, before decoding: a truncated oversized file is an InputError
    with pytest.raises(InputError):
        decode_rgb(data[: len(data) // 2], max_pixels=1000)
    with pytest.raises(ImageReadError, match="truncated|corrupt"):
        decode_rgb(data[: len(data) // 2], max_pixels=10_000)


def test_resize_rgb_is_antialiased():
    board = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    rgb = np.repeat(board[..., None], 3, axis=2)
    small = resize_rgb(rgb, 16)
    assert small.shape == (16, 16, 3) and small.dtype == np.uint8
    # a 1-px checkerboard shrunk 4x averages to mid-grey; point sampling would give 0 or 255
    assert 100 < small.mean() < 155 and small.std() < 20
    assert resize_rgb(rgb, (8, 32)).shape == (8, 32, 3)
    with pytest.raises(InputError):
        resize_rgb(rgb.astype(np.float32), 16)


def test_resize_mask_is_nearest():
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:30, 10:30] = True
    small = resize_mask(mask, 20)
    assert small.dtype == bool and small.shape == (20, 20)
    assert small.sum() == 100 and small[5:15, 5:15].all()
    big = resize_mask(mask, 80)
    assert set(np.unique(big).tolist()) == {False, True} and big.sum() == 1600


def test_preprocess_resizes_any_size_to_a_unit_float_batch():
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)]
    batch = preprocess(images, 32)
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == torch.float32
    assert float(batch.min()) >= 0.0 and float(batch.max()) <= 1.0
    # an image already at the model's size is only converted: exactly its values / 255
    assert torch.equal(batch[1], torch.from_numpy(images[1]).permute(2, 0, 1).float() / 255.0)
    # what resize_rgb shows is the model input rounded to 8 bits
    np.testing.assert_array_equal(resize_rgb(images[0], 32), to_uint8_rgb(batch[0]))
    assert preprocess([], 32).shape == (0, 3, 32, 32)


def test_preprocess_is_antialiased_and_rejects_wrong_input():
    stripes = np.zeros((64, 64, 3), dtype=np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: aliasing would give black or white, not grey
    small = preprocess([stripes], 16)[..., 1:-1]  # the border columns see a cut filter
    assert torch.allclose(small, torch.full_like(small, 0.5), atol=1e-6)
    with pytest.raises(InputError, match="list of images"):
        preprocess(stripes, 16)
    with pytest.raises(InputError, match="uint8 RGB"):
        preprocess([stripes.astype(np.float32)], 16)
    with pytest.raises(InputError, match="uint8 RGB"):
        preprocess([stripes[..., 0]], 16)
    with pytest.raises(InputError, match="positive"):
        preprocess([stripes], 0)


# ----------------------------------------------------------------------------- aspect: squash | letterbox
def _old_squash(image: np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """The squash resize as it was before data.aspect existed (kept here as the reference)."""
    hw = (size, size) if isinstance(size, int) else size
    x = torch.from_numpy(np.array(image, order="C")).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    if tuple(x.shape[-2:]) == hw:
        return x
    return torch.nn.functional.interpolate(x, size=hw, mode="bilinear", align_corners=False,
                                           antialias=True).clamp_(0.0, 1.0)


def _old_nearest(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape == (size, size):
        return mask.astype(bool)
    return np.array(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)) > 127


def _box(nonzero: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) (exclusive ends) of the True pixels."""
    rows, cols = np.flatnonzero(nonzero.any(axis=1)), np.flatnonzero(nonzero.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def test_letterbox_geometry_keeps_the_aspect_and_centres():
    assert letterbox_geometry(100, 250, 256) == (102, 256, 77, 0)  # 100 * 256 / 250 = 102.4 -> 102
    assert letterbox_geometry(250, 100, 256) == (256, 102, 0, 77)
    assert letterbox_geometry(256, 256, 256) == (256, 256, 0, 0)
    assert letterbox_geometry(64, 160, 320) == (128, 320, 96, 0)
    assert letterbox_geometry(3, 2, 4) == (4, 3, 0, 0)  # 2.67 -> 3; odd margin: the extra pixel right
    assert letterbox_geometry(1, 5000, 16) == (1, 16, 7, 0)  # never 0 pixels high
    with pytest.raises(InputError, match="positive"):
        letterbox_geometry(0, 10, 16)


@pytest.mark.parametrize("hw", [(100, 250), (250, 100)])
def test_letterbox_keeps_the_shape_on_black(hw):
    rng = np.random.default_rng(3)
    image = rng.integers(1, 256, (*hw, 3), dtype=np.uint8)  # no 0 inside: any 0 out is padding
    out = preprocess([image], 256, "letterbox")[0]
    assert out.shape == (3, 256, 256)
    content = (out > 0).any(dim=0).numpy()
    top, bottom, left, right = _box(content)
    expected = (102, 256) if hw[0] < hw[1] else (256, 102)
    assert (bottom - top, right - left) == expected
    assert content[top:bottom, left:right].all()
    assert top == (256 - (bottom - top)) // 2 and left == (256 - (right - left)) // 2  # centred
    padding = torch.ones(256, 256, dtype=torch.bool)
    padding[top:bottom, left:right] = False
    assert (out[:, padding] == 0).all()  # the padding is exactly 0
    # the content is the same antialiased bilinear resize, to the box instead of the square
    assert torch.equal(out[:, top:bottom, left:right], preprocess([image], expected)[0])
    # what resize_rgb shows is the same picture rounded to 8 bits; crop_to_content gets the box back
    shown = resize_rgb(image, 256, "letterbox")
    np.testing.assert_array_equal(shown, to_uint8_rgb(out))
    assert crop_to_content(shown, hw, "letterbox").shape == (*expected, 3)
    assert crop_to_content(shown, hw, "squash") is shown


def test_letterbox_leaves_a_square_image_at_size_alone():
    image = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert torch.equal(preprocess([image], 32, "letterbox"), preprocess([image], 32))
    square = np.ones((48, 48), dtype=bool)
    assert resize_mask(square, 32, "letterbox").all()  # a square image fills the canvas: no padding


@pytest.mark.parametrize("hw, size", [((64, 160), 320), ((160, 64), 320), ((100, 250), 256), ((300, 120), 64)])
def test_letterboxed_mask_lines_up_with_its_image(hw, size):
    image = np.zeros((*hw, 3), dtype=np.uint8)
    mask = np.zeros(hw, dtype=bool)
    h, w = hw
    block = (slice(h * 2 // 10, h * 3 // 10), slice(w * 5 // 10, w * 7 // 10))
    image[block] = 255
    mask[block] = True
    lit = preprocess([image], size, "letterbox")[0, 0].numpy() > 0.5
    small = resize_mask(mask, size, "letterbox")
    assert small.dtype == bool and small.shape == (size, size)
    new_h, new_w, top, left = letterbox_geometry(h, w, size)
    outside = np.ones((size, size), dtype=bool)
    outside[top:top + new_h, left:left + new_w] = False
    assert not small[outside].any()  # padded with False
    if size % max(hw) == 0:  # an integer scale: nearest and bilinear-at-0.5 pick the same pixels
        np.testing.assert_array_equal(small, lit)
    else:  # any scale: the block lands at the same place, to the pixel
        assert np.abs(np.subtract(_box(small), _box(lit))).max() <= 1
    assert np.array_equal(crop_to_content(small, hw, "letterbox"), small[top:top + new_h, left:left + new_w])


def test_squash_is_unchanged_and_the_default():
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, hw, dtype=np.uint8) for hw in [(70, 90, 3), (32, 32, 3), (300, 120, 3), (7, 5, 3)]]
    batch, explicit = preprocess(images, 32), preprocess(images, 32, "squash")
    assert torch.equal(batch, explicit)
    for image, got in zip(images, batch):
        assert torch.equal(got, _old_squash(image, 32)[0])  # bit-identical to the old resize
        np.testing.assert_array_equal(resize_rgb(image, 32, "squash"), to_uint8_rgb(_old_squash(image, 32)[0]))
    assert torch.equal(preprocess([images[0]], (16, 48))[0], _old_squash(images[0], (16, 48))[0])
    mask = rng.random((40, 100)) > 0.7
    for size in (20, 40, 100, 128):
        np.testing.assert_array_equal(resize_mask(mask, size), _old_nearest(mask, size))
        np.testing.assert_array_equal(resize_mask(mask, size, "squash"), _old_nearest(mask, size))


def test_unknown_aspect_is_refused_with_the_allowed_values():
    image = np.zeros((10, 20, 3), dtype=np.uint8)
    for call in (lambda: preprocess([image], 16, "pad"), lambda: resize_rgb(image, 16, "fit"),
                 lambda: resize_mask(image[..., 0] > 0, 16, "Letterbox"),
                 lambda: crop_to_content(np.zeros((16, 16)), (10, 20), "crop")):
        with pytest.raises(InputError, match=r"aspect must be one of \('squash', 'letterbox', 'native'\).*data\.aspect"):
            call()
    with pytest.raises(InputError, match="square size"):
        preprocess([image], (16, 32), "letterbox")
    with pytest.raises(InputError, match="square size"):
        resize_mask(image[..., 0] > 0, (16, 32), "letterbox")


def _nonsquare_line(root: Path, hw: tuple[int, int] = (32, 80)) -> Path:
    """A tiny MVTec-layout line of 32x80 images: grey parts, the defect a white block with its mask."""
    for split, name in [("train/good", "000"), ("train/good", "001"), ("test/good", "000"), ("test/crack", "000")]:
        rgb = np.full((*hw, 3), 100, dtype=np.uint8)
        if split == "test/crack":
            rgb[10:20, 30:50] = 255
            mask = np.zeros(hw, dtype=np.uint8)
            mask[10:20, 30:50] = 255
            (root / "ground_truth" / "crack").mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / "ground_truth" / "crack" / f"{name}_mask.png")
        (root / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(root / split / f"{name}.png")
    return root


def test_load_images_and_masks_letterbox_line_up(tmp_path):
    from redi.data.dataset import ImageDataset, load_images, load_masks, load_sample
    from redi.data.mvtec import MVTecCategory

    category = MVTecCategory(_nonsquare_line(tmp_path / "strips"))
    test = category.test
    images = load_images(test, 160, "letterbox")
    masks = load_masks(test, 160, "letterbox")
    assert images.shape == (2, 3, 160, 160) and masks.shape == (2, 1, 160, 160)
    # 32x80 -> 64x160 at rows 48..112: black bars above and below, the part between
    assert (images[:, :, :48] == 0).all() and (images[:, :, 112:] == 0).all()
    assert (images[:, :, 48:112] >= 100 / 255.0 - 1e-6).all()  # no black inside the part
    defect = [i for i, s in enumerate(test) if s.label == 1][0]
    good = 1 - defect
    assert masks[good].sum() == 0
    expected = np.zeros((160, 160), dtype=bool)
    expected[48 + 20:48 + 40, 60:100] = True  # the block, scaled 2x, moved down by the bar
    np.testing.assert_array_equal(masks[defect, 0].numpy().astype(bool), expected)
    # the white block is exactly where the mask is (bilinear at an integer scale, cut half-way)
    np.testing.assert_array_equal(images[defect, 0].numpy() > (100 + 255) / 2 / 255, expected)
    # every loader gives the same pixels; squash stays the default
    image, mask = load_sample(test[defect], 160, "letterbox")
    assert torch.equal(image, images[defect]) and torch.equal(mask, masks[defect])
    item = ImageDataset(test, 160, aspect="letterbox")[defect]
    assert torch.equal(item["image"], images[defect]) and torch.equal(item["mask"], masks[defect])
    assert not torch.equal(load_images(test, 160), images)
    assert masks[defect].sum() != load_masks(test, 160)[defect].sum()
    with pytest.raises(InputError, match="aspect must be one of"):
        load_masks(test, 160, "pad")
    with pytest.raises(InputError, match="aspect must be one of"):
        ImageDataset(test, 160, aspect="pad")


def test_make_nonsquare_crops_images_and_masks_alike(tmp_path, capsys):
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "bench" / "make_nonsquare.py"
    spec = importlib.util.spec_from_file_location("make_nonsquare", script)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.crop_box(512, 512) == (153, 0, 205, 512)  # full width, height 512 / 2.5 = 204.8 -> 205
    assert tool.crop_box(512, 512, orientation="tall") == (0, 153, 512, 205)
    src = tmp_path / "square"
    for split in ("train/good", "test/good", "test/crack"):
        for i in range(2):
            (src / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((50, 50, 3), 90 + i, dtype=np.uint8)).save(src / split / f"{i:03d}.png")
    (src / "ground_truth" / "crack").mkdir(parents=True)
    for i, rows in enumerate([slice(22, 28), slice(0, 5)]):  # the second defect lies outside the 50x20 crop
        mask = np.zeros((50, 50), dtype=np.uint8)
        mask[rows, 10:20] = 255
        Image.fromarray(mask).save(src / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    out = tmp_path / "runs" / "wide"
    assert tool.main([str(src), "--out", str(out)]) == 0
    assert "dropped 1 defective test image" in capsys.readouterr().out
    assert load_rgb(out / "train" / "good" / "000.png").shape == (20, 50, 3)
    kept = load_mask(out / "ground_truth" / "crack" / "000_mask.png", expected_hw=(20, 50))
    assert kept[7:13, 10:20].all() and kept.sum() == 60  # rows 22..28 of 50, cut at 15..35
    assert not (out / "test" / "crack" / "001.png").exists()
    with pytest.raises(SystemExit, match="not empty"):
        tool.main([str(src), "--out", str(out)])
    assert tool.main([str(src), "--out", str(out), "--overwrite", "--orientation", "tall"]) == 0
    assert load_rgb(out / "train" / "good" / "000.png").shape == (50, 20, 3)
    assert tool.main([str(src), "--out", str(out), "--overwrite", "--grey"]) == 0  # the grey strips of issue 17
    with Image.open(out / "train" / "good" / "001.png") as grey:
        assert grey.mode == "L" and grey.size == (50, 20) and np.asarray(grey).max() == 91
    with pytest.raises(SystemExit, match="inside"):
        tool.main([str(src), "--out", str(src / "cropped")])
    with pytest.raises(SystemExit, match="shared data"):
        tool.main([str(src), "--out", str(tool.SHARED / "data" / "x")])
