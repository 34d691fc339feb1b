"""Pictures: heat-map overlays with the explained box."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw


def normalise(heatmap: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1]; a constant or non-finite map becomes all zeros."""
    h = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(h.min(initial=0.0)), float(h.max(initial=0.0))
    return (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)


def overlay(
    image: np.ndarray,
    heatmap: np.ndarray,
    box: np.ndarray | None = None,
    caption: str = "",
    alpha: float = 0.5,
    colormap: str = "jet",
) -> np.ndarray:
    """The image (uint8 RGB, H x W x 3) blended with the coloured, min-max normalised heat map
    (H, W), with ``box`` (xyxy, original pixels) drawn and ``caption`` above it."""
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
    return np.asarray(canvas)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 RGB array as PNG, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path
