"""redi.images: every file mode becomes uint8 RGB, bad files raise errors that name them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from redi.errors import DatasetError, ImageReadError, InputError
from redi.images import (decode_rgb, image_size_of, load_mask, load_rgb, preprocess, resize_mask, resize_rgb,
                         to_uint8_rgb)


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
