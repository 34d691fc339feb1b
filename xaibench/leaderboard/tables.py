"""Leaderboard tables as text: one table per section (dataset x detector x attribute), a row
per method, a column per metric column marked ↑ (higher is better) or ↓, cells ``mean [CI]``
with the best mean in bold and † where a method is significantly better than every other
(Holm-corrected Wilcoxon, 0.05); published figures from the suite beside the measured
column. The same cells are rendered as Markdown, LaTeX (booktabs), HTML and rich console
markup through a ``Markup``."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich import box
from rich.console import Console
from rich.markup import escape as rich_escape
from rich.table import Table
from rich.text import Text

from xaibench.leaderboard.board import SECTION, Leaderboard, section_references

Section = tuple[str, str, str]


@dataclass(frozen=True)
class Markup:
    """How one output format escapes text and marks bold, small and ↑/↓; ``interval``:
    whether cells show the CI after the mean."""

    escape: Callable[[str], str]
    bold: Callable[[str], str]
    small: Callable[[str], str]
    dagger: str
    up: str
    down: str
    interval: bool = True


_TEX = {c: "\\" + c for c in "&%$#_{}"} | {
    "\\": r"\textbackslash{}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}

MARKDOWN = Markup(
    lambda s: s.replace("|", r"\|"), lambda s: f"**{s}**", lambda s: s, " †", "↑", "↓"
)
LATEX = Markup(
    lambda s: "".join(_TEX.get(c, c) for c in s),
    lambda s: rf"\textbf{{{s}}}",
    lambda s: rf"{{\scriptsize {s}}}",
    r"$^\dagger$",
    r"$\uparrow$",
    r"$\downarrow$",
)
HTML = Markup(
    html.escape, lambda s: f"<b>{s}</b>", lambda s: f"<br><small>{s}</small>", " †", *"↑↓"
)
CONSOLE = Markup(rich_escape, lambda s: f"[bold]{s}[/bold]", lambda s: s, "†", *"↑↓", False)

MARKS = (
    "↑ higher is better, ↓ lower is better; best mean in bold; † significantly better than "
    "every other method (paired Wilcoxon signed-rank on shared instances, Holm-corrected per "
    "column, p < 0.05)"
)
LEGEND = f"mean [95% percentile-bootstrap CI]; {MARKS}"


def decimals(value: float) -> int:
    """Decimals that show three significant digits of ``value`` (0 to 4)."""
    if not math.isfinite(value) or value == 0:
        return 3
    return max(0, min(4, 2 - math.floor(math.log10(abs(value)))))


def cell(row: pd.Series, markup: Markup) -> str:
    """``mean [low, high]`` of a summary row, bold where best, † where it beats all."""
    if not row["n"]:
        return "-"
    d = decimals(row["mean"])
    mean = f"{row['mean']:.{d}f}"
    text = markup.bold(mean) if row["best"] else mean
    if markup.interval and math.isfinite(row["ci_low"]):
        text += " " + markup.small(f"[{row['ci_low']:.{d}f}, {row['ci_high']:.{d}f}]")
    return text + (markup.dagger if row["beats_all"] else "")


def header(column: str, up: bool, markup: Markup) -> str:
    return f"{markup.escape(column)} {markup.up if up else markup.down}"


def section_title(section: Section) -> str:
    dataset, detector, attribute = section
    return f"{dataset} / {detector} (attribute: {attribute})"


def section_rows(board: Leaderboard, section: Section) -> pd.DataFrame:
    keys = board.summary[["dataset", "detector", "attribute"]].astype(str)
    return board.summary[(keys == list(section)).all(axis=1)]


def wide_cells(
    board: Leaderboard, section: Section, markup: Markup
) -> tuple[pd.DataFrame, list[str]]:
    """The section's table (a ``method`` column, then a column per metric column and per
    published source of it) and its footnotes (``[k] source``)."""
    rows = section_rows(board, section)
    refs = section_references(board.references, section[0], section[1])
    sources = list(dict.fromkeys(refs["source"]))
    methods = list(dict.fromkeys(rows["method"]))
    table: dict[str, list[str]] = {"method": [markup.escape(m) for m in methods]}
    for (column, up), part in rows.groupby(["column", "higher_is_better"], sort=False):
        by_method = part.set_index("method")
        name = header(str(column), bool(up), markup)
        table[name] = [
            cell(by_method.loc[m], markup) if m in by_method.index else "-" for m in methods
        ]
        for k, source in enumerate(sources, start=1):
            published = refs[(refs["source"] == source) & (refs["column"] == column)]
            if len(published):
                values = published.set_index("method")["value"]
                table[f"{name} [{k}]"] = [
                    f"{values[m]:.{decimals(values[m])}f}" if m in values.index else "-"
                    for m in methods
                ]
    notes = [f"[{k}] published: {markup.escape(s)}" for k, s in enumerate(sources, start=1)]
    return pd.DataFrame(table), notes + convention_notes(rows, markup)


def convention_notes(rows: pd.DataFrame, markup: Markup) -> list[str]:
    """One note per convention of a section's summary rows that records one, naming the
    columns (and the methods, where not all of the section's share it)."""
    if "convention" not in rows:
        return []
    notes = []
    marked = rows[rows["convention"].fillna("") != ""]
    for convention, part in marked.groupby("convention", sort=False):
        columns = list(dict.fromkeys(part["column"].astype(str)))
        who = list(dict.fromkeys(part["method"].astype(str)))
        sharing = set(rows.loc[rows["column"].isin(columns), "method"].astype(str))
        scope = "" if sharing <= set(who) else f" ({', '.join(who)})"
        notes.append(markup.escape(f"conventions of {', '.join(columns)}{scope}: {convention}"))
    return notes


def rank_cells(board: Leaderboard, section: Section, markup: Markup) -> pd.DataFrame:
    """The section's ranks: ``rank (+wins/−losses)`` (significant pairwise results)."""
    rows = section_rows(board, section)
    rows = rows[rows["rank"].notna()]
    text = [
        f"{r:.0f} (+{w}/−{lo})"
        for r, w, lo in zip(rows["rank"], rows["wins"], rows["losses"], strict=True)
    ]
    ranks = rows.assign(
        text=text,
        head=[
            header(str(c), bool(u), markup)
            for c, u in zip(rows["column"], rows["higher_is_better"], strict=True)
        ],
    )
    wide = ranks.pivot(index="method", columns="head", values="text")
    wide = wide.reindex(
        index=list(dict.fromkeys(ranks["method"])), columns=list(dict.fromkeys(ranks["head"]))
    )
    wide.index = [markup.escape(str(m)) for m in wide.index]
    return wide.fillna("-").rename_axis(index="method", columns=None).reset_index()


def markdown_table(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, disable_numparse=True)


def latex_table(frame: pd.DataFrame, caption: str, notes: list[str]) -> str:
    """A booktabs ``table`` of already-escaped cells."""
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{caption}}}",
        r"\begin{tabular}{l" + "c" * (len(frame.columns) - 1) + "}",
        r"\toprule",
        " & ".join(frame.columns) + r" \\",
        r"\midrule",
        *(" & ".join(map(str, row)) + r" \\" for row in frame.itertuples(index=False)),
        r"\bottomrule",
        r"\end{tabular}",
        *([r"\par\smallskip{\footnotesize " + "; ".join(notes) + "}"] if notes else []),
        r"\end{table}",
    ]
    return "\n".join(lines)


def print_leaderboard(board: Leaderboard, console: Console | None = None) -> None:
    """One compact table per section on ``console`` (default: a new rich Console): method
    rows, the means of the metric columns (best in bold, † beats every other method), split
    over several tables where they do not fit the console's width."""
    console = console or Console()
    console.print(f"[bold]{rich_escape(board.name)}[/bold] (run {rich_escape(board.run_id)})")
    console.print(rich_escape(f"mean (CIs and tests in the files); {MARKS}"), style="dim")
    for section in board.sections():
        frame, notes = wide_cells(board, section, CONSOLE)
        title = rich_escape(section_title(section))
        for chunk in _fit(frame, title, console):
            console.print(chunk)
        for note in notes:
            console.print(note, style="dim")


def _table(frame: pd.DataFrame, title: str) -> Table:
    """A rich table of the rows of ``frame`` that have a value after its first column."""
    frame = frame[(frame.iloc[:, 1:] != "-").any(axis=1)]
    table = Table(title=title, box=box.SIMPLE_HEAD, min_width=len(title))
    for name in frame.columns:
        table.add_column(Text.from_markup(name), no_wrap=True)
    for row in frame.itertuples(index=False):
        table.add_row(*(Text.from_markup(str(v)) for v in row))
    return table


def _fit(frame: pd.DataFrame, title: str, console: Console) -> list[Table]:
    """Tables of the first column and as many of the next as fit the console's width."""
    first, rest = frame.columns[0], list(frame.columns[1:])
    unbounded = console.options.update_width(10_000)
    tables: list[Table] = []
    chunk: list[str] = []
    for name in rest:
        wider = _table(frame[[first, *chunk, name]], title)
        if chunk and console.measure(wider, options=unbounded).maximum > console.width:
            tables.append(_table(frame[[first, *chunk]], title))
            chunk = []
        chunk.append(name)
    return [*tables, _table(frame[[first, *chunk]], title)]


def slug(*parts: str) -> str:
    """A file name stem from parts (characters other than letters, digits, ``.-`` become -)."""
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", p) for p in parts)


def plots_of(section: Section, plots: dict[str, Path]) -> list[str]:
    """Names of the plots that belong to a section: its bars and its detector's curves."""
    dataset, detector, _ = section
    bars = slug(*section, "bars")
    prefix = slug(dataset, detector) + "_"
    return [n for n in plots if n == bars or (n.startswith(prefix) and not n.endswith("_bars"))]


def section_nan(board: Leaderboard, section: Section) -> pd.DataFrame:
    nan = board.nan_reasons
    nan = nan[(nan[SECTION].astype(str) == list(section)).all(axis=1)]
    return nan[["method", "column", "reason", "count"]].astype(str)
