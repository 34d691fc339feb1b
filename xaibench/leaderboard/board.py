"""Leaderboard tables from one run of a results store (``build_leaderboard``): summary,
pairwise tests, NaN reasons, published references."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.progress import track

from xaibench.evaluate import DETECTOR_ROWS
from xaibench.leaderboard.stats import bootstrap_ci, holm, paired_wilcoxon
from xaibench.store import connect, latest_run, load_results

SECTION = ["dataset", "detector", "attribute"]
"""The keys of one leaderboard section (one table)."""
INSTANCE = ["image_id", "detection"]
"""Within a section, the keys of one explained instance."""
FAMILY = [*SECTION, "metric", "column"]
"""The keys of one family of pairwise tests (one column of one section)."""
TIME_METRIC, TIME_COLUMN = "time", "seconds"
ALPHA = 0.05
NO_REASON = "(no reason recorded)"

SUMMARY_COLUMNS = [
    *SECTION, "method", "method_name", "metric", "column", "higher_is_better", "n", "mean",
    "ci_low", "ci_high", "n_nan", "rank", "wins", "losses", "best", "beats_all", "convention",
]  # fmt: skip
TEST_COLUMNS = [
    *SECTION, "metric", "column", "higher_is_better", "method_a", "method_b", "n", "statistic",
    "p", "p_holm", "mean_difference", "better", "significant", "reason",
]  # fmt: skip
REFERENCE_COLUMNS = ["source", "dataset", "detector", "method", "column", "value"]
COMPARISON_COLUMNS = [
    *SECTION, "method", "metric", "column", "higher_is_better", "n", "mean", "ci_low",
    "ci_high", "source", "published",
]  # fmt: skip


@dataclass
class Leaderboard:
    """The tables of one run's leaderboard.

    ``summary``: one row per section, method and column (``SUMMARY_COLUMNS``): n finite
    values, their mean and 95% percentile-bootstrap CI (``ci_low``, ``ci_high``), ``n_nan``,
    ``rank`` (1 = best, ties share the lower rank), significant pairwise ``wins`` / ``losses``,
    ``best`` (best mean of the column), ``beats_all`` (significantly better than every other
    method) and ``convention`` (the stored ``results.convention`` of its numbers: one per
    column and method, or the leaderboard refuses to build). ``tests``: one row per pair of
    methods and column (``TEST_COLUMNS``), ``better``
    the method with the better mean paired difference, ``significant`` = Holm p < 0.05.
    ``nan_reasons``: counts of NaN values per section, method, column and reason.
    ``references``: published figures from the suite (``REFERENCE_COLUMNS``). ``curves``: the
    run's curve points; ``seconds``: seconds per explanation, one row per instance and method.
    """

    store: Path
    run_id: str
    suite: dict[str, Any]
    summary: pd.DataFrame
    tests: pd.DataFrame
    nan_reasons: pd.DataFrame
    references: pd.DataFrame
    curves: pd.DataFrame
    seconds: pd.DataFrame
    seed: int
    resamples: int

    @property
    def name(self) -> str:
        return str(self.suite.get("name") or self.run_id)

    def sections(self) -> list[tuple[str, str, str]]:
        """(dataset, detector, attribute) of every section, in the store's order."""
        keys = self.summary[SECTION].drop_duplicates()
        return [tuple(map(str, row)) for row in keys.itertuples(index=False)]


def load_suite(path: str | Path, run_id: str | None = None) -> tuple[str, dict[str, Any]]:
    """(run id, suite) of a run of the store at ``path`` (the latest by default); the suite is
    the ``runs.suite`` JSON."""
    conn = connect(path)
    try:
        run_id = run_id or latest_run(conn)
        row = None if run_id is None else _suite_row(conn, run_id)
    finally:
        conn.close()
    if row is None:
        raise ValueError(f"{path} has no run {run_id!r}" if run_id else f"{path} holds no run")
    try:
        suite = json.loads(row[0])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: runs.suite of run {run_id!r} is not JSON: {err}") from err
    if not isinstance(suite, dict):
        raise ValueError(f"{path}: runs.suite of run {run_id!r} is not a JSON object")
    return run_id, suite


def _suite_row(conn: sqlite3.Connection, run_id: str) -> tuple[str] | None:
    return conn.execute("SELECT suite FROM runs WHERE run_id = ?", (run_id,)).fetchone()


def references_frame(suite: Mapping[str, Any], where: str = "suite") -> pd.DataFrame:
    """The suite's ``references`` ([{source, dataset, detector, scale, values: {method:
    {column: value}}}]) as a long table (``REFERENCE_COLUMNS``): ``value`` = published value x
    ``scale`` (default 1), ``dataset``/``detector`` None where the entry names none (it applies
    to every one); a malformed entry fails naming its field."""
    records = []
    entries = suite.get("references") or []
    if not isinstance(entries, list):
        raise ValueError(f"{where}: references must be a list, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        field = f"{where}: references[{i}]"
        if not isinstance(entry, Mapping) or not {"source", "values"} <= set(entry):
            raise ValueError(f"{field} must be a mapping with source and values")
        if not isinstance(entry["values"], Mapping):
            raise ValueError(f"{field}.values must map method labels to {{column: value}}")
        scale = entry.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"{field}.scale must be a positive number, got {scale!r}")
        labels = [entry.get(k) for k in ("dataset", "detector")]
        labels = [None if v is None else str(v) for v in labels]
        for method, columns in entry["values"].items():
            if not isinstance(columns, Mapping):
                raise ValueError(f"{field}.values.{method} must map columns to numbers")
            for column, value in columns.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(
                        f"{field}.values.{method}.{column} must be a number, got {value!r}"
                    )
                records.append(
                    [str(entry["source"]), *labels, method, column, float(value) * float(scale)]
                )
    return pd.DataFrame(records, columns=REFERENCE_COLUMNS)


def section_references(references: pd.DataFrame, dataset: str, detector: str) -> pd.DataFrame:
    """The references that apply to a dataset and detector (their labels, or none named)."""
    applies = (references["dataset"].isna() | (references["dataset"] == dataset)) & (
        references["detector"].isna() | (references["detector"] == detector)
    )
    return references[applies]


def comparison(board: Leaderboard) -> pd.DataFrame:
    """Measured beside published: one row per summary row (section, method, column) and
    reference source that has a figure for it (``COMPARISON_COLUMNS``)."""
    parts = []
    for section in board.sections():
        rows = board.summary[(board.summary[SECTION].astype(str) == list(section)).all(axis=1)]
        refs = section_references(board.references, section[0], section[1])
        refs = refs[["method", "column", "source", "value"]].rename(columns={"value": "published"})
        parts.append(rows.merge(refs, on=["method", "column"], sort=False))
    frames = [p[COMPARISON_COLUMNS] for p in parts if len(p)]
    if not frames:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def build_leaderboard(
    store: str | Path,
    run_id: str | None = None,
    seed: int = 0,
    resamples: int = 9999,
    progress: bool = False,
) -> Leaderboard:
    """The leaderboard of one run of the store at ``store`` (the latest by default): only
    rows of finished units in the run's plan (``load_results``). Bootstrap CIs draw
    ``resamples`` resamples with ``numpy.random.default_rng(seed)``, afresh for every group,
    from its values in instance order (``image_id`` as text, then ``detection``), so that
    they do not depend on the order in which units were stored. ``progress`` shows a rich
    progress bar over the columns."""
    if resamples < 1:
        raise ValueError(f"resamples must be a positive number, got {resamples}")
    run_id, suite = load_suite(store, run_id)
    results, curves = load_results(store, run_id)
    values = _values(results, store)
    seconds = _seconds(results)
    values = pd.concat([values, seconds], ignore_index=True) if len(seconds) else values
    summaries, tests = [], []
    families = [f for _, f in values.groupby(FAMILY, sort=False)]
    for family in track(families, "statistics per column", disable=not progress, transient=True):
        summary, test = _family(family, seed, resamples)
        summaries.append(summary)
        tests.append(test)
    return Leaderboard(
        store=Path(store),
        run_id=run_id,
        suite=suite,
        summary=_concat(summaries, SUMMARY_COLUMNS),
        tests=_concat(tests, TEST_COLUMNS),
        nan_reasons=_nan_reasons(values),
        references=references_frame(suite, f"{store}: runs.suite of run {run_id!r}"),
        curves=curves,
        seconds=seconds.rename(columns={"value": "seconds"}),
        seed=seed,
        resamples=resamples,
    )


def _concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _values(results: pd.DataFrame, store: str | Path) -> pd.DataFrame:
    """One row per section, method, instance and column: value (NaN where undefined) and the
    reason of a NaN. A doubled row is a broken store, never averaged away."""
    keys = [*SECTION, "method", *INSTANCE, "metric", "column"]
    doubled = results.duplicated(keys)
    if doubled.any():
        row = results.loc[doubled, keys].iloc[0].to_dict()
        raise ValueError(f"{store} holds {int(doubled.sum())} doubled result rows, e.g. {row}")
    out = results[[*keys, "method_name", "higher_is_better", "value", "reason"]].copy()
    out["convention"] = results["convention"].fillna("").astype(str)
    mixed = out.groupby([*SECTION, "method", "metric", "column"], sort=False)["convention"]
    counts = mixed.nunique()
    if (counts > 1).any():
        key = counts[counts > 1].index[0]
        seen = sorted(mixed.get_group(key).unique())
        raise ValueError(
            f"{store}: {dict(zip([*SECTION, 'method', 'metric', 'column'], key, strict=True))} "
            f"mixes numbers of different conventions {seen}; a table must hold one convention "
            "per column (rerun with one metric setting)"
        )
    value = pd.to_numeric(out["value"], errors="coerce").astype(np.float64)
    nan = ~np.isfinite(value)
    out["value"] = value.where(~nan)
    reason = out["reason"].where(out["reason"].notna() & (out["reason"] != ""), NO_REASON)
    out["reason"] = reason.where(nan, "")
    out["higher_is_better"] = out["higher_is_better"].astype(bool)
    return out


def _seconds(results: pd.DataFrame) -> pd.DataFrame:
    """Seconds per explanation as one more metric column: one row per section, method and
    instance with a finite time (a map's time is repeated on its metric rows)."""
    timed = results[np.isfinite(pd.to_numeric(results["seconds"], errors="coerce"))]
    timed = timed.drop_duplicates([*SECTION, "method", *INSTANCE])
    out = timed[[*SECTION, "method", "method_name", *INSTANCE]].copy()
    out["metric"], out["column"], out["higher_is_better"] = TIME_METRIC, TIME_COLUMN, False
    out["value"], out["reason"] = timed["seconds"].astype(np.float64).to_numpy(), ""
    out["convention"] = ""
    return out


def _nan_reasons(values: pd.DataFrame) -> pd.DataFrame:
    nan = values[values["reason"] != ""]
    keys = [*SECTION, "method", "metric", "column", "reason"]
    return nan.groupby(keys, sort=False).size().rename("count").reset_index()


def _family(family: pd.DataFrame, seed: int, resamples: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Summary rows and pairwise tests of one column of one section."""
    first = family.iloc[0]
    up = bool(first["higher_is_better"])
    wide = family.pivot(index=INSTANCE, columns="method", values="value").sort_index()
    methods = list(dict.fromkeys(family["method"]))
    names = dict(zip(family["method"], family["method_name"], strict=True))
    conventions = dict(zip(family["method"], family["convention"], strict=True))
    records = []
    for method in methods:
        v = wide[method].to_numpy()
        n = int(np.isfinite(v).sum())
        low, high = bootstrap_ci(v, seed, resamples)
        records.append(
            {
                **{k: first[k] for k in SECTION},
                "method": method,
                "method_name": names[method],
                "metric": first["metric"],
                "column": first["column"],
                "higher_is_better": up,
                "n": n,
                "mean": float(np.nanmean(v)) if n else math.nan,
                "ci_low": low,
                "ci_high": high,
                "n_nan": int((family["method"] == method).sum()) - n,
                "convention": conventions[method],
            }
        )
    summary = pd.DataFrame(records)
    ranked = summary["method"] != DETECTOR_ROWS
    summary["rank"] = summary["mean"].where(ranked).rank(method="min", ascending=not up)
    summary["best"] = summary["rank"] == 1
    compared = [m for m in methods if m != DETECTOR_ROWS]
    tests = _pairwise(wide, compared, up)
    tests = tests.assign(**{k: first[k] for k in [*SECTION, "metric", "column"]})
    tests["higher_is_better"] = up
    won = tests[tests["significant"]]
    lost = np.where(won["better"] == won["method_a"], won["method_b"], won["method_a"])
    wins = won["better"].value_counts()
    losses = pd.Series(lost, dtype=object).value_counts()
    summary["wins"] = [int(wins.get(m, 0)) for m in methods]
    summary["losses"] = [int(losses.get(m, 0)) for m in methods]
    others = len(compared) - 1
    summary["beats_all"] = ranked & (others > 0) & (summary["wins"] == others)
    return summary[SUMMARY_COLUMNS], tests[TEST_COLUMNS]


def _pairwise(wide: pd.DataFrame, methods: list[str], up: bool) -> pd.DataFrame:
    """Wilcoxon signed-rank tests of every pair (in method order), Holm-corrected together."""
    records = []
    for a, b in combinations(methods, 2):
        test = paired_wilcoxon(wide[a].to_numpy(), wide[b].to_numpy())
        gain = test.mean_difference if up else -test.mean_difference
        better = a if gain > 0 else b if gain < 0 else ""
        records.append(
            {
                "method_a": a,
                "method_b": b,
                "n": test.n,
                "statistic": test.statistic,
                "p": test.p,
                "mean_difference": test.mean_difference,
                "better": better,
                "reason": test.reason,
            }
        )
    columns = ["method_a", "method_b", "n", "statistic", "p", "mean_difference", "better"]
    tests = pd.DataFrame(records, columns=[*columns, "reason"])
    tests["p_holm"] = holm(tests["p"].to_numpy(dtype=np.float64))
    tests["significant"] = (tests["p_holm"] < ALPHA) & (tests["better"] != "")
    return tests
