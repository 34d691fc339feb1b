"""Feature-map positions land on the right original-image pixels, padding cropped first."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from conftest import build

from xaibench.detector import FeatureWindows
from xaibench.geometry import InputGeometry

# 100 x 170 original, resized by 1.28 to 128 x 217, padded (to a multiple of 32) to 128 x 224
GEOMETRY = InputGeometry(original=(100, 170), resized=(128, 217), padded=(128, 224))


def impulse(h: int, w: int, y: int, x: int) -> torch.Tensor:
    m = torch.zeros(1, h, w)
    m[0, y, x] = 1.0
    return m


def test_impulse_lands_on_the_cell_centre() -> None:
    # stride-8 level of the padded input: 16 x 28 cells; cell (5, 20) has its centre at
    # resized pixel (5.5 * 8, 20.5 * 8) = (44, 164), i.e. original (44 / 1.28, 164 * 170 / 217)
    out = GEOMETRY.layer_to_original(impulse(16, 28, 5, 20))[0]
    y, x = np.unravel_index(int(out.argmax()), out.shape)
    expected_y, expected_x = 44 / 1.28 - 0.5, 164 * 170 / 217 - 0.5  # pixel-centre indices
    assert abs(y - expected_y) <= 1 and abs(x - expected_x) <= 1


def test_padding_is_cropped_not_stretched() -> None:
    """Resizing the padded map to the image (as the official ODAM code does) shifts maps
    towards the top-left by up to the padding; the geometry does not."""
    layer = impulse(16, 28, 8, 24)
    ours = GEOMETRY.layer_to_original(layer)[0]
    naive = F.interpolate(layer[None], size=(100, 170), mode="bilinear")[0, 0]
    x_ours = int(ours.sum(0).argmax())
    x_naive = int(naive.sum(0).argmax())
    expected_x = 24.5 * 8 * 170 / 217 - 0.5
    assert abs(x_ours - expected_x) <= 1
    assert x_naive < expected_x - 4  # the naive map is off by several pixels


def test_trace_places_a_feature_impulse(random_image: np.ndarray) -> None:
    """Through a real trace (FCOS at 160 px: the 150 x 200 image is resized to 160 x 213 and
    padded to 160 x 224): a one-cell map on p4 lands where that cell sees the image."""
    _, detector = build("fcos")
    trace = detector.trace(random_image)
    h, w = (int(s) for s in trace.levels[1].shape[-2:])
    window = FeatureWindows(
        layer="p4",
        target_index=torch.tensor([0]),
        activations=torch.zeros(1, 1, 3, 3),
        gradients=torch.zeros(1, 1, 3, 3),
        origin=torch.tensor([[3, 6]]),  # a 3 x 3 window whose centre is cell (4, 7)
        layer_size=(h, w),
        boxes_on_layer=torch.zeros(1, 4),
    )
    out = trace.to_image(window, impulse(3, 3, 1, 1))[0]
    y, x = np.unravel_index(int(out.argmax()), out.shape)
    sy, sx = 150 / 160, 200 / 213
    assert abs(y - (4.5 * 16 * sy - 0.5)) <= 1 and abs(x - (7.5 * 16 * sx - 0.5)) <= 1
    assert out.shape == random_image.shape[:2]


def test_roi_grid_spreads_over_its_box() -> None:
    grid = torch.ones(1, 7, 7)
    out = GEOMETRY.boxes_grid_to_original(grid, torch.tensor([[20.0, 10.0, 60.0, 50.0]]))[0]
    inside = torch.zeros_like(out, dtype=torch.bool)
    inside[10:50, 20:60] = True
    assert torch.allclose(out[inside], torch.ones(())) and bool((out[~inside] == 0.0).all())


def test_windows_sample_like_grid_sample_on_the_whole_layer() -> None:
    """Windows that run past the layer's edges, placed on the layer and sampled with
    grid_sample (align_corners=False, border), give the same image maps."""
    torch.manual_seed(0)
    h, w = 16, 28
    maps = torch.rand(3, 5, 7)
    origin = torch.tensor([[-2, -3], [6, 10], [13, 24]])
    placed = torch.zeros(3, h, w)
    for i, (y0, x0) in enumerate(origin.tolist()):
        for dy in range(5):
            for dx in range(7):
                if 0 <= y0 + dy < h and 0 <= x0 + dx < w:
                    placed[i, y0 + dy, x0 + dx] = maps[i, dy, dx]
    # original pixel centres in normalised layer coordinates (the padding is cropped)
    ys = (torch.arange(100) + 0.5) * (128 / 100 / 128) * 2 - 1
    xs = (torch.arange(170) + 0.5) * (217 / 170 / 224) * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)[None].expand(3, -1, -1, -1)
    reference = F.grid_sample(placed[:, None], grid, align_corners=False, padding_mode="border")
    ours = GEOMETRY.windows_to_original(maps, origin, (h, w))
    assert torch.allclose(ours, reference[:, 0], atol=1e-6)
