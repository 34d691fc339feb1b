"""Overlays normalise each map to its own range and carry a colour bar of its real values."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from xaibench.plots import add_colour_bar
from xaibench.visualize import BAR_WIDTH, normalise, overlay


def drise_like_map() -> np.ndarray:
    """Values in 179-217, as D-RISE weights sums are: the low corner 179, the high one 217."""
    ramp = np.linspace(179.0, 217.0, 40, dtype=np.float32)
    return np.tile(ramp, (30, 1))


def test_a_map_is_normalised_to_its_own_range() -> None:
    scaled = normalise(drise_like_map())
    assert scaled.min() == 0.0 and scaled.max() == 1.0
    signed = normalise(np.array([[-2.0, 0.0, 2.0]]))
    np.testing.assert_allclose(signed, [[0.0, 0.5, 1.0]])
    assert (normalise(np.full((3, 3), 5.0)) == 0).all()
    assert normalise(np.array([[np.nan, 1.0, 3.0]])).tolist() == [[0.0, 0.0, 1.0]]


def test_the_overlay_spans_the_whole_colour_map() -> None:
    heat = drise_like_map()
    picture = overlay(np.zeros((30, 40, 3), np.uint8), heat, alpha=1.0)
    jet = colormaps["jet"]
    low, high = (np.round(np.array(jet(v)[:3]) * 255) for v in (0.0, 1.0))
    np.testing.assert_allclose(picture[0, 0], low, atol=1)  # the minimum: bottom colour
    np.testing.assert_allclose(picture[0, -1], high, atol=1)  # the maximum: top colour


def test_the_colour_bar_is_beside_the_overlay() -> None:
    image = np.full((30, 40, 3), 100, np.uint8)
    heat = drise_like_map()
    picture = overlay(image, heat, with_bar=True)
    assert picture.shape[0] == 30 and picture.shape[1] > 40 + BAR_WIDTH
    np.testing.assert_array_equal(picture[:, :40], overlay(image, heat))
    jet = colormaps["jet"]
    top, bottom = picture[0, 40 + BAR_WIDTH // 2], picture[-1, 40 + BAR_WIDTH // 2]
    np.testing.assert_allclose(top, np.array(jet(1.0)[:3]) * 255, atol=1)
    np.testing.assert_allclose(bottom, np.array(jet(0.0)[:3]) * 255, atol=1)


def test_figure_colour_bars_show_the_real_values() -> None:
    ax = Figure().subplots()
    add_colour_bar(ax, drise_like_map())
    bar = ax.figure.axes[1]
    labels = [t.get_text() for t in bar.get_yticklabels()]
    assert labels == ["179", "217"]
