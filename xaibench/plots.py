"""Plots as PNG: metric curves (one line per series, mean over rows, with its 95% confidence
band), metric bars with given confidence intervals, seconds per explanation, and colour bars
for heat-map panels of matplotlib figures."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    first = series[0][1] if series else Curve(np.zeros(0), np.zeros((0, 0)))
    return plot_curve_frame(
        curves_frame(series),
        path,
        title,
        x_label=first.x_label,
        y_label=first.y_label,
        ticks=dict(zip(np.asarray(first.x, dtype=float), first.x_names or [], strict=False)),
        zero_line=zero_line,
    )


def plot_curve_frame(
    frame: pd.DataFrame,
    path: str | Path,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    ticks: dict[float, str] | None = None,
    zero_line: bool = False,
    errorbar: tuple[str, int] | Callable[[np.ndarray], tuple[float, float]] = ("ci", 95),
) -> Path:
    """Plot a long table (series, x, y; one row per point of one curve) as one line per
    series, the mean over curves with a band (seaborn's ``errorbar``: by default its seeded
    95% bootstrap; or a function of the values at one x giving (low, high)), to a PNG at
    ``path`` (folders created). ``ticks`` names categorical x positions (steps of a sanity
    check)."""
    ticks = ticks or {}
    fig = Figure(figsize=(max(6.0, 0.45 * len(ticks) + 2), 4.5))
    ax = fig.subplots()
    if not frame.empty:
        sns.lineplot(
            frame,
            x="x",
            y="y",
            hue="series",
            marker="o",
            errorbar=errorbar,
            n_boot=300,
            seed=0,
            ax=ax,
        )
        ax.legend(fontsize=8)
    if ticks:
        ax.set_xticks(list(ticks), list(ticks.values()), rotation=60, ha="right", fontsize=7)
    if zero_line:
        ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    return _save(fig, path)


def plot_bars(bars: pd.DataFrame, path: str | Path, title: str = "", columns: int = 4) -> Path:
    """One panel per ``panel`` of a table (panel, series, mean, low, high): a bar per series
    at its mean with the interval [low, high] as error bar (none where NaN), to a PNG."""
    panels = list(dict.fromkeys(bars["panel"]))
    series = list(dict.fromkeys(bars["series"]))
    colours = dict(zip(series, sns.color_palette("colorblind", len(series)), strict=True))
    ncols = max(1, min(columns, len(panels)))
    nrows = max(1, -(-len(panels) // ncols))
    fig = Figure(figsize=(3.2 * ncols, 0.25 * len(series) + 2.6 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        part = bars[bars["panel"] == panel]
        x = np.arange(len(part))
        mean = part["mean"].to_numpy(dtype=float)
        low = np.nan_to_num(mean - part["low"].to_numpy(dtype=float))
        high = np.nan_to_num(part["high"].to_numpy(dtype=float) - mean)
        ax.bar(x, mean, color=[colours[s] for s in part["series"]])
        ax.errorbar(x, mean, yerr=[low, high], fmt="none", ecolor="black", capsize=3, lw=1)
        ax.set_xticks(x, list(part["series"]), rotation=45, ha="right", fontsize=8)
        ax.set_title(str(panel), fontsize=10)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, path)


def plot_seconds(seconds: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Box plot of seconds per explanation (a table: series, group, seconds) on a log axis,
    one box per series and group, to a PNG at ``path``."""
    groups = seconds["group"].nunique() if len(seconds) else 1
    series = seconds["series"].nunique() if len(seconds) else 1
    fig = Figure(figsize=(max(6.0, 0.5 * series * groups + 2), 4.5))
    ax = fig.subplots()
    if len(seconds):
        sns.boxplot(seconds, x="series", y="seconds", hue="group", log_scale=True, ax=ax)
        ax.tick_params(axis="x", rotation=45)
        ax.legend(fontsize=8)
    ax.set_xlabel("method")
    ax.set_ylabel("seconds per explanation (log)")
    ax.set_title(title)
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
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
