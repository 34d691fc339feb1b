"""``xaibench leaderboard``: tables, tests and plots of one run of a results store."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from xaibench.leaderboard import build_leaderboard, print_leaderboard, write_leaderboard
from xaibench.store import StoreError


def leaderboard(
    store: Path = typer.Argument(..., help="results store: OUT/results.sqlite or its folder"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder, e.g. leaderboards/NAME"),
    run: str | None = typer.Option(None, "--run", help="run id (default: the latest run)"),
    seed: int = typer.Option(0, help="seed of the bootstrap resamples"),
    resamples: int = typer.Option(9999, min=1, help="bootstrap resamples per CI"),
) -> None:
    """Per dataset x detector x method x metric column: mean and seeded 95% bootstrap CI;
    per column: ranks and Holm-corrected paired Wilcoxon tests. Writes leaderboard.md,
    leaderboard.tex, summary/wide/tests/nan_reasons/references/comparison CSVs, plots/*.png,
    suite.yaml and a self-contained index.html under OUT, and prints the tables."""
    console = Console()
    if not store.exists():
        console.print(f"[red]error:[/red] STORE {store} does not exist")
        raise typer.Exit(2)
    try:
        board = build_leaderboard(store, run, seed=seed, resamples=resamples, progress=True)
    except (StoreError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    with console.status("writing tables and plots"):
        files = write_leaderboard(board, out)
    print_leaderboard(board, console)
    console.print(f"{len(files)} files under {out}; open {files['html']} in a browser")
