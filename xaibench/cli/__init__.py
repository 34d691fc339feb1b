"""The ``xaibench`` command line: ``list``, ``data``, ``explain``, ``compare``, ``evaluate``,
``run``, ``leaderboard``, ``nms``, ``demo``, ``train``."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from xaibench.cli.compare import compare
from xaibench.cli.data import app as data_app
from xaibench.cli.demo import demo
from xaibench.cli.evaluate import evaluate
from xaibench.cli.explain import explain
from xaibench.cli.leaderboard import leaderboard
from xaibench.cli.nms import nms
from xaibench.cli.run import run
from xaibench.cli.train import train
from xaibench.registry import ALL_REGISTRIES, PRESETS

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.add_typer(data_app, name="data")
app.command()(explain)
app.command()(compare)
app.command()(evaluate)
app.command()(run)
app.command()(nms)
app.command()(demo)
app.command()(leaderboard)
app.command()(train)


@app.command("list")
def list_plugins(
    pattern: str = typer.Argument("*", help="shell-style filter, e.g. '*fcos*'"),
    kind: str = typer.Option("", help="only this registry (detectors, methods, ...)"),
) -> None:
    """Show what every registry holds (and the metric presets, ``--preset``)."""
    table = Table("kind", "names")
    for name, registry in {**ALL_REGISTRIES, PRESETS.kind: PRESETS}.items():
        if kind and kind != name:
            continue
        table.add_row(name, ", ".join(registry.names(pattern)) or "-")
    Console().print(table)


def main() -> None:
    app()
