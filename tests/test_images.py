"""load_image and to_rgb_uint8: every input becomes uint8 RGB (H, W, 3), or a clear error."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from xaibench.images import ImageLoadError, load_image, to_rgb_uint8


def save(tmp_path: Path, image: Image.Image, name: str) -> Path:
    path = tmp_path / name
    image.save(path)
    return path


def test_rgb_png_is_returned_unchanged(tmp_path):
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    out = load_image(save(tmp_path, Image.fromarray(pixels), "rgb.png"))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out, pixels)


def test_grayscale_is_repeated_over_channels(tmp_path):
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    out = load_image(save(tmp_path, Image.fromarray(gray, mode="L"), "gray.png"))
    assert out.shape == (2, 2, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)


def test_one_bit_image_becomes_black_and_white(tmp_path):
    bits = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).convert("1")
    out = load_image(save(tmp_path, bits, "bits.png"))
    np.testing.assert_array_equal(out[:, :, 0], [[0, 255], [255, 0]])


def test_alpha_is_composited_on_black(tmp_path):
    rgba = np.array([[[200, 100, 50, 128], [10, 20, 30, 0]]], dtype=np.uint8)
    out = load_image(save(tmp_path, Image.fromarray(rgba, mode="RGBA"), "rgba.png"))
    # round(200 * 128 / 255) = 100, round(100 * 128 / 255) = 50, round(50 * 128 / 255) = 25
    np.testing.assert_array_equal(out, [[[100, 50, 25], [0, 0, 0]]])


def test_gray_with_alpha(tmp_path):
    la = Image.fromarray(np.array([[[255, 255], [255, 51]]], dtype=np.uint8), mode="LA")
    out = load_image(save(tmp_path, la, "la.png"))
    np.testing.assert_array_equal(out[0, :, 0], [255, 51])


def test_16_bit_png_uses_the_full_16_bit_range(tmp_path):
    values = np.array([[0, 65535, 257 * 100, 32768]], dtype=np.uint16)
    path = save(tmp_path, Image.fromarray(values), "deep.png")
    assert Image.open(path).mode.startswith("I")  # really stored as 16-bit
    out = load_image(path)
    # value * 255 / 65535: 32768 -> 127.502 -> 128
    np.testing.assert_array_equal(out[0, :, 1], [0, 255, 100, 128])


def test_palette_image_with_and_without_transparency(tmp_path):
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    palette_image.putdata([0, 1])
    out = load_image(save(tmp_path, palette_image, "palette.png"))
    np.testing.assert_array_equal(out, [[[255, 0, 0], [0, 0, 255]]])

    palette_image.info["transparency"] = 1  # index 1 fully transparent -> black
    out = load_image(save(tmp_path, palette_image, "palette_alpha.png"))
    np.testing.assert_array_equal(out, [[[255, 0, 0], [0, 0, 0]]])


def test_cmyk_goes_through_pillow_rgb_conversion(tmp_path):
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0)])  # white, pure cyan
    out = load_image(save(tmp_path, cmyk, "cmyk.tif"))
    np.testing.assert_array_equal(out, [[[255, 255, 255], [0, 255, 255]]])


def test_truncated_file_raises_and_names_the_path(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    path = save(tmp_path, Image.fromarray(noise), "cut.png")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageLoadError, match=re.escape(str(path))):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_non_image_and_missing_files_raise_image_load_error(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageLoadError, match=re.escape(str(text))):
        load_image(text)
    with pytest.raises(ImageLoadError, match=r"nothing\.png.*does not exist"):
        load_image(tmp_path / "nothing.png")
    assert issubclass(ImageLoadError, ValueError)


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.array([[0.0, 1.0]]), [0, 255]),
        (np.array([[0.5]], dtype=np.float32), [128]),
        (np.array([[True, False]]), [255, 0]),
        (np.array([[[7], [9]]], dtype=np.uint8), [7, 9]),
        (np.array([[65535, 0]], dtype=np.uint16), [255, 0]),
    ],
)
def test_to_rgb_uint8_known_answers(array, expected):
    out = to_rgb_uint8(array)
    assert out.dtype == np.uint8 and out.shape == (*array.shape[:2], 3)
    np.testing.assert_array_equal(out[0, :, 2], expected)


def test_to_rgb_uint8_rgba_drops_alpha():
    rgba = np.array([[[255, 255, 255, 255], [255, 255, 255, 0]]], dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb_uint8(rgba)[0, :, 0], [255, 0])


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 4, 2), dtype=np.uint8), r"image must have shape .* got shape \(4, 4, 2\)"),
        (np.zeros((4,), dtype=np.uint8), r"got shape \(4,\)"),
        (np.full((2, 2), 1.5), r"values in \[1.5, 1.5\].*\[0, 1\]"),
        (np.zeros((2, 2), dtype=np.int32), "dtype int32"),
    ],
)
def test_to_rgb_uint8_errors_name_argument_shape_and_dtype(array, message):
    with pytest.raises(ValueError, match=message):
        to_rgb_uint8(array, name="image")
