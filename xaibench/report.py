"""What ``xaibench run`` and ``xaibench evaluate`` print: tables that read at 80 columns (the
wide tables stay in the files), each failing metric column with its reason and count, and the
failed images and units, grouped by reason."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from xaibench.evaluate import DETECTOR_ROWS

WIDTH = 80
"""The terminal width the printed tables are made to fit."""


def cell(mean: float, ci95: float) -> str:
    """``mean±ci`` in three significant digits; ``-`` where there is no value."""
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.3g}±{ci95:.2g}" if math.isfinite(ci95) else f"{mean:.3g}"


def arrowed(metric: str, higher_is_better: bool) -> str:
    return f"{metric} {'↑' if higher_is_better else '↓'}"


def _chunks(
    labels: Sequence[str], first: int, widths: dict[str, int], width: int
) -> list[list[str]]:
    """Split column labels into groups whose table (first column ``first`` wide) fits."""
    out: list[list[str]] = [[]]
    used = first + 4
    for label in labels:
        need = widths[label] + 3
        if out[-1] and used + need > width:
            out.append([])
            used = first + 4
        out[-1].append(label)
        used += need
    return out


def print_tables(
    console: Console,
    summary: pd.DataFrame,
    columns: dict[str, bool],
    title: str = "mean ± 95% CI",
    width: int = WIDTH,
) -> None:
    """Per dataset and detector: one row per metric column, one column per method (split
    into several tables where they would not fit ``width``); a column without any value
    shows ``-`` (see ``print_nan_reasons``); detector-scope measures below."""
    keys = [k for k in ("dataset", "detector") if k in summary.columns]
    if summary.empty:
        return
    for group_key, group in summary.groupby(keys, sort=False):
        name = " / ".join(
            str(k) for k in (group_key if isinstance(group_key, tuple) else (group_key,))
        )
        own = group[group["method"] == DETECTOR_ROWS]
        group = group[group["method"] != DETECTOR_ROWS]
        methods = list(dict.fromkeys(group["method"]))
        index = {(r.method, r.metric): r for r in group.itertuples()}
        shown = [c for c in columns if c not in set(own["metric"])]
        rows = {c: arrowed(c, up) for c, up in columns.items() if c in shown}
        most = group.groupby("method")["n"].max().to_dict()
        cells = {
            (m, c): cell(index[m, c].mean, index[m, c].ci95) if (m, c) in index else "-"
            for m in methods
            for c in shown
        }
        widths = {m: max([len(m)] + [len(cells[m, c]) for c in shown]) for m in methods}
        first = max([len("n (instances)")] + [len(r) for r in rows.values()])
        for part in _chunks(methods, first, widths, width):
            table = Table("metric", *part, title=f"{title}: {name}", title_justify="left")
            for c in shown:
                table.add_row(rows[c], *(cells[m, c] for m in part))
            table.add_row("n (instances)", *(str(most.get(m, 0)) for m in part))
            console.print(table, width=width)
        for r in own.itertuples():
            console.print(
                f"  {name}: {arrowed(r.metric, r.higher_is_better)} {cell(r.mean, r.ci95)}"
            )


def nan_reasons(results: pd.DataFrame) -> pd.DataFrame:
    """Per dataset, detector, metric column and reason: how many rows are NaN (``count``) out
    of the column's rows (``total``) and for which methods; from the store's long rows."""
    if results.empty:
        return pd.DataFrame(
            columns=["dataset", "detector", "column", "reason", "count", "total", "methods"]
        )
    keys = ["dataset", "detector", "column"]
    totals = results.groupby(keys, sort=False).size().rename("total")
    nan = results[results["value"].isna()].assign(reason=lambda f: f["reason"].fillna("undefined"))
    grouped = nan.groupby([*keys, "reason"], sort=False).agg(
        count=("value", "size"), methods=("method", lambda m: ", ".join(dict.fromkeys(m)))
    )
    return grouped.join(totals, on=keys).reset_index()


def print_nan_reasons(console: Console, results: pd.DataFrame, width: int = WIDTH) -> None:
    """One line per reason that left metric columns NaN: the count of NaN rows out of the
    rows, the methods, the columns (lines cut at ``width``), then the reason."""
    reasons = nan_reasons(results)
    if reasons.empty:
        return
    console.print("NaN values (detector NaN rows/rows (methods): columns, then the reason):")
    grouped = reasons.groupby(["detector", "reason", "count", "total", "methods"], sort=False)
    for (detector, reason, count, total, methods), part in grouped:
        line = f"  {detector} {count}/{total} ({methods}): {', '.join(part['column'])}"
        console.print(line if len(line) <= width else line[: width - 1] + "…", markup=False)
        why = f"    {reason}"
        console.print(why if len(why) <= 2 * width else why[: 2 * width - 1] + "…", markup=False)


_VARIABLE = re.compile(r"(/[^\s:,()]+)+|\b\d+(\.\d+)?\b")


def failure_groups(failures: pd.DataFrame) -> pd.DataFrame:
    """Failed units grouped by stage and reason (paths and numbers taken out): ``units``,
    ``images`` (distinct dataset, detector, image), one ``example`` reason."""
    columns = ["stage", "pattern", "units", "images", "example"]
    if failures.empty:
        return pd.DataFrame(columns=columns)
    frame = failures.assign(
        pattern=[_VARIABLE.sub("…", str(r or "unknown")) for r in failures["reason"]],
        image=[f"{d}/{t}/{i}" for d, t, i in zip(
            failures["dataset"], failures["detector"], failures["image_id"], strict=True
        )],
    )  # fmt: skip
    grouped = frame.groupby(["stage", "pattern"], sort=False).agg(
        units=("reason", "size"), images=("image", "nunique"), example=("reason", "first")
    )
    return grouped.reset_index()[columns]


def print_failures(console: Console, failures: pd.DataFrame, images: int, limit: int = 400) -> None:
    """How many images and units failed and why, grouped by reason."""
    if failures.empty:
        return
    bad_images = failures[failures["stage"] == "image"]
    lost = bad_images[["dataset", "detector", "image_id"]].drop_duplicates().shape[0]
    console.print(
        f"[red]{len(failures)} unit(s) failed[/red]; {lost} of {images} image(s) could not be "
        "evaluated:"
    )
    for g in failure_groups(failures).itertuples():
        example = g.example if len(g.example) <= limit else g.example[: limit - 1] + "…"
        what = "image" if g.stage == "image" else "method"
        console.print(
            f"  {g.units} unit(s) on {g.images} image(s), {what} failed: {example}", markup=False
        )


def with_empty_groups(summary: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """``summary`` plus a row (n 0, mean NaN) for each dataset, detector and method of
    ``results`` without any value, so that a method whose every value is NaN keeps its
    column (``-``) in the printed tables."""
    keys = [k for k in ("dataset", "detector", "method") if k in summary.columns]
    if results.empty or not keys:
        return summary
    groups = results.groupby(keys, sort=False)[["column", "higher_is_better"]].first()
    present = pd.MultiIndex.from_frame(summary[keys]) if len(keys) > 1 else summary[keys[0]]
    empty = groups[~groups.index.isin(present)].reset_index()
    if empty.empty:
        return summary
    empty = empty.rename(columns={"column": "metric"}).assign(
        n=0, mean=np.nan, ci95=np.nan, higher_is_better=lambda f: f["higher_is_better"] == 1
    )
    return pd.concat([summary, empty[summary.columns]], ignore_index=True)


def print_summary(
    console: Console,
    summary: pd.DataFrame,
    results: pd.DataFrame,
    report: Any,
    title: str,
    notes: Sequence[str] = (),
) -> None:
    """Tables, NaN reasons, failed images and units, the metrics' notes and the unit counts
    of a run (``report``: a ``RunReport``)."""
    columns = dict(zip(results["column"], results["higher_is_better"].astype(bool), strict=True))
    print_tables(console, with_empty_groups(summary, results), columns, title)
    print_nan_reasons(console, results)
    print_failures(console, report.failures, report.images)
    for note in notes:
        console.print(f"- {note}")
    console.print(
        f"units: {report.total} in the plan, {report.done} done ({report.computed} now, "
        f"{report.skipped} before), {report.failed} failed; {report.seconds:.1f} s"
    )
    if report.failed:
        console.print("failed units stay failed on resume; --retry-failed runs them again")
