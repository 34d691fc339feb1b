"""Metric curves as PNG (one line per series, mean over rows, with its 95% confidence band),
and colour bars for heat-map panels of matplotlib figures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from xaibench.metric import Curve
from xaibench.visualize import value_range


def curves_frame(series: Sequence[tuple[str, Curve]]) -> pd.DataFrame:
    """Long table (series, row, x, y) of every finite point of the curves."""
    frames = []
    for label, curve in series:
        y = np.asarray(curve.y, dtype=np.float64).reshape(-1, len(curve.x))
        rows, cols = np.nonzero(np.isfinite(y))
        frames.append(
            pd.DataFrame(
                {"series": label, "row": rows, "x": np.asarray(curve.x)[cols], "y": y[rows, cols]}
            )
        )
    columns = ["series", "row", "x", "y"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def plot_curves(
    series: Sequence[tuple[str, Curve]], path: str | Path, title: str = "", zero_line: bool = False
) -> Path:
    """Plot (label, curve) pairs, mean and 95% CI over each curve's rows, to a PNG at ``path``
    (folders created). Axis labels and categorical ticks come from the first curve."""
    frame = curves_frame(series)
    first = series[0][1] if series else Curve(np.zeros(0), np.zeros((0, 0)))
    names = first.x_names or []
    fig = Figure(figsize=(max(6.0, 0.45 * len(names) + 2), 4.5))
    ax = fig.subplots()
    if not frame.empty:
        sns.lineplot(
            frame,
            x="x",
            y="y",
            hue="series",
            marker="o",
            errorbar=("ci", 95),
            n_boot=300,
            seed=0,
            ax=ax,
        )
        ax.legend(fontsize=8)
    if names:
        ax.set_xticks(np.asarray(first.x, dtype=float), names, rotation=60, ha="right", fontsize=7)
    if zero_line:
        ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel(first.x_label)
    ax.set_ylabel(first.y_label)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def add_colour_bar(ax: Axes, heatmap: np.ndarray, colormap: str = "jet") -> None:
    """A colour bar beside ``ax`` for an overlay of ``heatmap`` (``xaibench.visualize``
    normalises each map to its own range): ticks at the map's real minimum and maximum."""
    lo, hi = value_range(heatmap)
    norm = Normalize(lo, hi) if hi > lo else Normalize(lo - 0.5, lo + 0.5)
    bar = ax.figure.colorbar(
        ScalarMappable(norm, colormaps[colormap]), ax=ax, fraction=0.046, pad=0.02
    )
    ticks = [lo, hi] if hi > lo else [lo]
    bar.set_ticks(ticks, labels=[f"{v:.3g}" for v in ticks])
    bar.ax.tick_params(labelsize=7)
