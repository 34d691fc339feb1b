"""Reading images into the one in-memory format of the harness: uint8 RGB, (H, W, 3).

Conversions (the same in ``load_image`` and ``to_rgb_uint8``):

- grayscale (``L``, 1-bit ``1``, bool) is repeated over the three channels (1-bit: 0 or 255);
- an alpha channel (``RGBA``, ``LA``, palette images with transparency) is dropped by
  compositing on black: ``rgb * alpha / 255``, so fully transparent pixels become black;
- 16-bit data (``I;16`` PNGs, uint16 arrays) is scaled over the full 16-bit range,
  ``round(value * 255 / 65535)``; 32-bit ``I`` images are clipped to [0, 65535] first;
- float data must lie in [0, 1] and becomes ``round(value * 255)``;
- palette, CMYK, YCbCr, LAB and HSV images go through Pillow's own RGB conversion.

Pixels are returned as stored: the EXIF orientation tag is not applied, so coordinates agree
with annotation files written for the stored pixels (as pycocotools assumes). A missing,
truncated or undecodable file raises ``ImageLoadError``; a half-decoded image is never
returned (Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its default, False).

``check_detectable`` refuses images a detector cannot see, with an ``ImageLoadError`` naming
the image and its size: a side under ``MIN_SIDE`` (8 px: the finest feature level of an FPN
detector has stride 8, so the image would be one cell or less), or an aspect ratio above
``MAX_ASPECT`` (20: resizing the long side to torchvision's max_size of 1333 px leaves the
short side under 67 px; at 10000 x 10 px it leaves one pixel). The datasets and
``explain``/``compare`` call it on every image they read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

_AS_ARRAY = {"1", "L", "RGB", "RGBA", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_WITH_ALPHA = {"LA", "La", "PA", "RGBa"}


MIN_SIDE = 8
"""Smallest height or width (px) that ``check_detectable`` accepts."""
MAX_ASPECT = 20.0
"""Largest ratio of the long side to the short side that ``check_detectable`` accepts."""


class ImageLoadError(ValueError):
    """An image file is missing, truncated, not an image, in a form we cannot convert, or of
    a size no detector can see (``check_detectable``)."""


def check_detectable(image: np.ndarray, name: str) -> None:
    """Raise ``ImageLoadError`` naming ``name`` when the image (H, W, ...) has a side under
    ``MIN_SIDE`` px or an aspect ratio above ``MAX_ASPECT`` (module docstring)."""
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise ImageLoadError(
            f"{name} is {height}x{width} px (H x W); a detector needs at least {MIN_SIDE} px "
            "on each side"
        )
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ImageLoadError(
            f"{name} is {height}x{width} px (H x W), an aspect ratio of "
            f"{max(height, width) / min(height, width):.0f}:1; at most {MAX_ASPECT:.0f}:1 is "
            "accepted (resized to the detector's max_size, its short side would vanish)"
        )


def load_image(path: str | Path) -> np.ndarray:
    """Read ``path`` as a uint8 RGB array (H, W, 3); raise ``ImageLoadError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image file {path} does not exist (or is not a regular file)")
    try:
        with Image.open(path) as image:
            image.load()
            array = _pil_to_array(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"cannot read image file {path}: {err}") from err
    try:
        return to_rgb_uint8(array, name=f"pixels of {path}")
    except ValueError as err:
        raise ImageLoadError(f"cannot convert image file {path} to RGB: {err}") from err


def load_detectable(path: str | Path) -> np.ndarray:
    """``load_image`` followed by ``check_detectable``: uint8 RGB (H, W, 3)."""
    image = load_image(path)
    check_detectable(image, f"image file {path}")
    return image


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """The pixels of a loaded Pillow image as an array that ``to_rgb_uint8`` accepts."""
    mode = image.mode
    if mode == "I":
        return np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
    if mode in _WITH_ALPHA or (mode == "P" and "transparency" in image.info):
        return np.asarray(image.convert("RGBA"))
    if mode in _AS_ARRAY:
        return np.asarray(image)
    return np.asarray(image.convert("RGB"))


def to_rgb_uint8(array: np.ndarray, name: str = "array") -> np.ndarray:
    """Convert an image array to uint8 RGB (H, W, 3); ``name`` is used in error messages.

    Accepts shapes (H, W), (H, W, 1), (H, W, 3) and (H, W, 4) (alpha composited on black)
    with dtype uint8, uint16 (scaled by 255/65535), bool (0/255) or float in [0, 1].
    """
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape[:2]:
        raise ValueError(
            f"{name} must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) with H, W > 0; "
            f"got shape {array.shape} (dtype {array.dtype})"
        )
    array = _to_uint8(array, name)
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:
        rgb = array[:, :, :3].astype(np.uint16)
        alpha = array[:, :, 3:].astype(np.uint16)
        return ((rgb * alpha + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def to_rgb_float(array: np.ndarray, name: str = "array") -> np.ndarray:
    """Convert an image array to float32 RGB (H, W, 3) in [0, 1] for a network's input.

    Float arrays in [0, 1] are kept as they are (not rounded to 255 levels: D-RISE's float
    masked images); every other input goes through ``to_rgb_uint8`` and is divided by 255,
    which gives exactly the values a uint8 image gives.
    """
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        return to_rgb_uint8(array, name).astype(np.float32) / np.float32(255.0)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3) or 0 in array.shape[:2]:
        raise ValueError(
            f"{name} must have shape (H, W), (H, W, 1) or (H, W, 3) with H, W > 0 as a float "
            f"image; got shape {array.shape} (dtype {array.dtype})"
        )
    _check_unit_range(array, name)
    array = array.astype(np.float32)
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else np.ascontiguousarray(array)


def to_chw_tensor(array: np.ndarray, name: str = "array") -> torch.Tensor:
    """``to_rgb_float`` as a (3, H, W) float32 tensor in [0, 1] (sharing its memory)."""
    return torch.from_numpy(to_rgb_float(array, name)).permute(2, 0, 1)


def _check_unit_range(array: np.ndarray, name: str) -> None:
    """A float image must be finite and lie in [0, 1]; a ValueError names ``name``."""
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has dtype {array.dtype} and contains NaN or inf")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"{name} has dtype {array.dtype} with values in [{low:g}, {high:g}]; "
            "float images must lie in [0, 1]"
        )


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        _check_unit_range(array, name)
        return np.round(array * 255.0).astype(np.uint8)
    raise ValueError(
        f"{name} has dtype {array.dtype} (shape {array.shape}); "
        "expected uint8, uint16, bool or float in [0, 1]"
    )
