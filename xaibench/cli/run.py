"""``xaibench run [SUITE]``: a whole suite into its results store, resumable."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import typer
from rich.console import Console

from xaibench.evaluate import summarise, wide_rows
from xaibench.report import print_summary
from xaibench.runner import RunReport, run_suite
from xaibench.store import (
    STORE_FILE,
    StoreError,
    export,
    load_instances,
    load_results,
    load_units,
)
from xaibench.suite import SuiteError, load_suite, suite_path


def run(
    suite: str = typer.Argument(
        None, help="suite file (YAML) or embedded suite name; default: the embedded default"
    ),
    executor: str = typer.Option(None, help="local or ray (default: the suite's)"),
    address: str = typer.Option(None, help="Ray cluster address (default: a local ray.init)"),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="compute units that failed before again"
    ),
    store: Path = typer.Option(
        None, "--store", "--out", "-o", help="output folder (default: the suite's store)"
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="override a suite field, PATH=VALUE (e.g. limits.images=2)"
    ),
    preset: str | None = typer.Option(
        None,
        help="metric preset, e.g. paper (the official ODAM evaluation conventions); "
        "replaces the suite's preset",
    ),
    progress: bool = typer.Option(True, help="show the progress bar"),
) -> None:
    """Run every unit (dataset x detector x method x image) of a suite that is not done yet
    into STORE/results.sqlite, then print a summary and export the run (Parquet, CSV)."""
    console = Console()
    extra = list(overrides)
    if executor is not None:
        extra.append(f"executor.kind={executor}")
    if address is not None:
        extra.append(f"executor.address={address}")
    if preset is not None:
        extra.append(f"preset={preset}")
    try:
        spec = load_suite(suite, extra)
        where = suite_path(suite)
        report = run_suite(
            spec, where=where, store=store, retry_failed=retry_failed, progress=progress
        )
    except (SuiteError, StoreError) as err:
        console.print(f"[red]error:[/red] {err}", markup=True, highlight=False)
        raise typer.Exit(2) from err
    print_report(console, report)
    if report.total and report.done == 0:
        raise typer.Exit(1)


def print_report(console: Console, report: RunReport) -> None:
    """The compact end-of-run summary (80 columns) and where the store and exports are."""
    path = report.store / STORE_FILE
    results, _ = load_results(path, report.run_id)
    columns = dict(zip(results["column"], results["higher_is_better"].astype(bool), strict=True))
    wide = wide_rows(
        load_instances(path, report.run_id), results, load_units(path, report.run_id), list(columns)
    )
    print_summary(console, summarise(wide, columns), results, report, "mean ± 95% CI")
    formats = ("parquet", "csv") if importlib.util.find_spec("pyarrow") else ("csv",)
    files = export(path, report.store / "export", report.run_id, formats)
    console.print(f"store: {path} (run {report.run_id})")
    console.print(f"tables ({', '.join(formats)}): {next(iter(files.values())).parent}")
