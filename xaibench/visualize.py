"""Pictures: heat-map overlays with the explained box and a colour bar.

Every overlay normalises its map to the map's own range: the map's minimum gets the bottom
colour of the colour map and its maximum the top one, whatever the method's units (D-RISE
weights in the hundreds, gradient maps near zero, signed maps below zero). The colour bar
beside the overlay is labelled with the map's real values (minimum, middle, maximum), so two
overlays are compared by their bars, not by their colours. A constant map is drawn in the
bottom colour, its bar labelled with the one value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

BAR_WIDTH = 12
"""Width (px) of the colour bar strip; its labels take the space to the right of it."""


def value_range(heatmap: np.ndarray) -> tuple[float, float]:
    """(minimum, maximum) of the finite values of ``heatmap``; (0, 0) when none is finite."""
    h = np.asarray(heatmap, dtype=np.float32)
    finite = h[np.isfinite(h)]
    if finite.size == 0:
        return 0.0, 0.0
    return float(finite.min()), float(finite.max())


def normalise(heatmap: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] by the map's own finite range; a constant map becomes all
    zeros, non-finite values 0."""
    lo, hi = value_range(heatmap)
    h = np.asarray(heatmap, dtype=np.float32)
    scaled = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
    return np.nan_to_num(scaled, nan=0.0, posinf=0.0, neginf=0.0)


def overlay(
    image: np.ndarray,
    heatmap: np.ndarray,
    box: np.ndarray | None = None,
    caption: str = "",
    alpha: float = 0.5,
    colormap: str = "jet",
    with_bar: bool = False,
) -> np.ndarray:
    """The image (uint8 RGB, H x W x 3) blended with the coloured heat map (H, W), normalised
    to its own range (module docstring), with ``box`` (xyxy, original pixels) drawn and
    ``caption`` above it. ``with_bar`` appends ``colour_bar`` on the right: (H, W + bar, 3),
    the overlay in the first W columns."""
    if heatmap.shape != image.shape[:2]:
        raise ValueError(
            f"heat map shape {heatmap.shape} does not match image shape {image.shape[:2]}"
        )
    colours = colormaps[colormap](normalise(heatmap))[..., :3] * 255
    blended = np.clip(image * (1 - alpha) + colours * alpha, 0, 255).astype(np.uint8)
    canvas = Image.fromarray(blended)
    if box is not None:
        draw = ImageDraw.Draw(canvas)
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle((x1, y1, x2, y2), outline=(255, 255, 255), width=2)
        if caption:
            draw.text((x1 + 2, max(y1 - 12, 0)), caption, fill=(255, 255, 255))
    picture = np.asarray(canvas)
    if with_bar:
        return np.concatenate([picture, colour_bar(heatmap, picture.shape[0], colormap)], axis=1)
    return picture


def colour_bar(heatmap: np.ndarray, height: int, colormap: str = "jet") -> np.ndarray:
    """A vertical colour bar (uint8 RGB, ``height`` x width x 3) for ``heatmap``: the colour
    map from the maximum (top) to the minimum (bottom), labelled with the real values."""
    lo, hi = value_range(heatmap)
    labels = [f"{v:.3g}" for v in ((hi, (lo + hi) / 2, lo) if hi > lo else (lo,))]
    text_width = 6 * max(len(t) for t in labels) + 6
    strip = Image.new("RGB", (BAR_WIDTH + text_width, height), (255, 255, 255))
    ramp = np.linspace(1.0, 0.0, height)[:, None].repeat(BAR_WIDTH, axis=1)
    if hi <= lo:
        ramp[:] = 0.0
    strip.paste(Image.fromarray((colormaps[colormap](ramp)[..., :3] * 255).astype(np.uint8)))
    draw = ImageDraw.Draw(strip)
    rows = (0, height // 2 - 5, height - 11) if len(labels) == 3 else (height - 11,)
    for row, text in zip(rows, labels, strict=True):
        draw.text((BAR_WIDTH + 3, max(row, 0)), text, fill=(0, 0, 0))
    return np.asarray(strip)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 RGB array as PNG, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path
