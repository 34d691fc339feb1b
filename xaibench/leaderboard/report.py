"""Every file of a leaderboard under one folder:

- ``leaderboard.md``: per section the table (mean [CI]), the ranks with significant wins and
  losses, the NaN counts with their reasons, and the plots;
- ``leaderboard.tex``: one booktabs table per section, best mean in bold;
- ``summary.csv`` (long: one row per section, method and column), ``wide.csv`` (one row per
  section and method; ``COLUMN ↑``, ``COLUMN ↑ low``, ``COLUMN ↑ high``), ``tests.csv``
  (every pairwise test), ``nan_reasons.csv``, ``references.csv`` (published figures),
  ``comparison.csv`` (measured mean and CI beside each published figure);
- ``plots/``: per section the metric bars with CIs, per dataset and detector every curve
  (deletion, insertion, VEA, sanity) with 95% bands, and ``seconds.png``;
- ``suite.yaml``: the run's suite; ``index.html``: all of it in one self-contained page.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from xaibench.leaderboard.board import SECTION, Leaderboard, comparison
from xaibench.leaderboard.html import write_index
from xaibench.leaderboard.stats import bootstrap_ci
from xaibench.leaderboard.tables import (
    LATEX,
    LEGEND,
    MARKDOWN,
    latex_table,
    markdown_table,
    plots_of,
    rank_cells,
    section_nan,
    section_rows,
    section_title,
    slug,
    wide_cells,
)
from xaibench.plots import plot_bars, plot_curve_frame, plot_seconds


def write_leaderboard(board: Leaderboard, out: str | Path) -> dict[str, Path]:
    """Write every file (module docstring) under ``out``; returns {name: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "summary_csv": _csv(board.summary, out / "summary.csv"),
        "wide_csv": _csv(wide_numbers(board), out / "wide.csv"),
        "tests_csv": _csv(board.tests, out / "tests.csv"),
        "nan_reasons_csv": _csv(board.nan_reasons, out / "nan_reasons.csv"),
        "references_csv": _csv(board.references, out / "references.csv"),
        "comparison_csv": _csv(comparison(board), out / "comparison.csv"),
    }
    plots = write_plots(board, out / "plots")
    files |= {f"plot_{k}": p for k, p in plots.items()}
    suite = out / "suite.yaml"
    suite.write_text(yaml.safe_dump(board.suite, sort_keys=False, allow_unicode=True))
    files["suite_yaml"] = suite
    files["markdown"] = _write(out / "leaderboard.md", markdown_document(board, plots, out))
    files["latex"] = _write(out / "leaderboard.tex", latex_document(board))
    files["html"] = write_index(board, plots, out / "index.html")
    return files


def _csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def wide_numbers(board: Leaderboard) -> pd.DataFrame:
    """One row per section and method, three numbers per column: ``COLUMN ↑`` (mean),
    ``COLUMN ↑ low`` and ``COLUMN ↑ high`` (95% CI)."""
    summary = board.summary.assign(
        head=[
            f"{c} {'↑' if u else '↓'}"
            for c, u in zip(board.summary["column"], board.summary["higher_is_better"], strict=True)
        ]
    )
    keys = [*SECTION, "method"]
    parts = []
    for field, suffix in (("mean", ""), ("ci_low", " low"), ("ci_high", " high")):
        part = summary.pivot(index=keys, columns="head", values=field)
        parts.append(part.rename(columns=lambda h, s=suffix: h + s))
    wide = pd.concat(parts, axis=1)
    heads = list(dict.fromkeys(summary["head"]))
    order = [h + s for h in heads for s in ("", " low", " high")]
    rows = summary[keys].drop_duplicates()
    return wide.reindex(index=pd.MultiIndex.from_frame(rows), columns=order).reset_index()


def write_plots(board: Leaderboard, folder: Path) -> dict[str, Path]:
    """Metric bars per section, curves per dataset and detector, seconds per explanation."""
    plots: dict[str, Path] = {}
    for section in board.sections():
        rows = section_rows(board, section)
        rows = rows[(rows["n"] > 0) & (rows["column"] != "seconds")]
        bars = pd.DataFrame(
            {
                "panel": [
                    f"{c} {'↑' if u else '↓'}"
                    for c, u in zip(rows["column"], rows["higher_is_better"], strict=True)
                ],
                "series": rows["method"],
                "mean": rows["mean"],
                "low": rows["ci_low"],
                "high": rows["ci_high"],
            }
        )
        if len(bars):
            name = slug(*section, "bars")
            title = f"{section_title(section)}: mean, 95% bootstrap CI"
            plots[name] = plot_bars(bars, folder / f"{name}.png", title)
    curves = board.curves
    for (dataset, detector, curve), part in curves.groupby(
        ["dataset", "detector", "curve"], sort=False
    ):
        points = part[pd.to_numeric(part["y"], errors="coerce").notna()]
        first = part.drop_duplicates("point").sort_values("point")
        names = first["x_name"].fillna("").astype(str)
        ticks = dict(zip(first["x"].astype(float), names, strict=True)) if names.any() else {}
        name = slug(dataset, detector, curve)
        plots[name] = plot_curve_frame(
            pd.DataFrame(
                {"series": points["method"], "x": points["x"].astype(float), "y": points["y"]}
            ),
            folder / f"{name}.png",
            title=f"{curve}: {dataset} / {detector} (mean, 95% CI)",
            x_label=str(first["x_label"].iloc[0] or ""),
            y_label=str(first["y_label"].iloc[0] or ""),
            ticks=ticks,
            zero_line=bool(ticks),
            errorbar=lambda v: bootstrap_ci(v, board.seed, board.resamples),
        )
    if len(board.seconds):
        seconds = pd.DataFrame(
            {
                "series": board.seconds["method"],
                "group": board.seconds["dataset"] + " / " + board.seconds["detector"],
                "seconds": board.seconds["seconds"],
            }
        )
        title = "seconds per explanation"
        plots["seconds"] = plot_seconds(seconds, folder / "seconds.png", title)
    return plots


def markdown_document(board: Leaderboard, plots: dict[str, Path], out: Path) -> str:
    """The whole leaderboard as Markdown (plots linked relative to ``out``)."""
    lines = [
        f"# Leaderboard: {board.name}",
        "",
        f"Run `{board.run_id}` of `{board.store}`; bootstrap {board.resamples} resamples, "
        f"seed {board.seed}. {LEGEND}.",
        "",
    ]
    for section in board.sections():
        frame, notes = wide_cells(board, section, MARKDOWN)
        lines += [f"## {section_title(section)}", "", markdown_table(frame), ""]
        lines += [*(f"{n}  " for n in notes), ""] if notes else []
        ranks = rank_cells(board, section, MARKDOWN)
        if len(ranks):
            lines += ["Ranks (+significant wins/−losses):", "", markdown_table(ranks), ""]
        nan = section_nan(board, section)
        if len(nan):
            lines += ["NaN values and their reasons:", "", markdown_table(nan), ""]
        for name in plots_of(section, plots):
            lines += [f"![{name}]({plots[name].relative_to(out).as_posix()})", ""]
    if "seconds" in plots:
        lines += ["## Seconds per explanation", "", "![seconds](plots/seconds.png)", ""]
    return "\n".join(lines)


def latex_document(board: Leaderboard) -> str:
    """One booktabs table per section (needs ``\\usepackage{booktabs}``)."""
    tables = ["% xaibench leaderboard: needs \\usepackage{booktabs}"]
    for section in board.sections():
        frame, notes = wide_cells(board, section, LATEX)
        caption = LATEX.escape(f"{board.name}: {section_title(section)}. ") + (
            r"Mean [95\% bootstrap CI]; $\uparrow$ higher is better, $\downarrow$ lower is "
            r"better; best in bold; $^\dagger$ significantly better than every other method "
            r"(Wilcoxon, Holm, $p<0.05$)."
        )
        tables.append(latex_table(frame, caption, notes))
    return "\n\n".join(tables) + "\n"
