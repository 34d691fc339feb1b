"""``xaibench evaluate``: methods x metrics over a COCO-format dataset for some detectors."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from xaibench.cli.explain import parse_params
from xaibench.datasets.coco import CocoDataset
from xaibench.evaluate import (
    DETECTOR_ROWS,
    EvaluationResult,
    EvaluationSettings,
    run_evaluation,
)
from xaibench.labels import rename_categories
from xaibench.registry import METHODS, METRICS


def scoped_params(items: list[str], option: str) -> dict[str, dict[str, Any]]:
    """``name.key=value`` items -> {name: {key: value}} (values parsed as JSON where they
    parse)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        left, sep, value = item.partition("=")
        name, dot, key = left.rpartition(".")
        if not sep or not dot or not name or not key:
            raise typer.BadParameter(f"{option} expects name.key=value, got {item!r}")
        out.setdefault(name, {}).update(parse_params([f"{key}={value}"]))
    return out


def print_table(result: EvaluationResult, console: Console, title: str = "evaluation") -> None:
    """Per detector, a table of mean ± 95% CI (one row per metric, one column per method)
    and the detector-scope measures below it; then the metrics' notes."""
    summary = result.summary
    for detector, group in summary.groupby("detector", sort=False):
        own = group[group["method"] == DETECTOR_ROWS]
        group = group[group["method"] != DETECTOR_ROWS]
        methods = list(dict.fromkeys(group["method"]))
        table = Table("metric", *methods, title=f"{title}: {detector}")
        most = group.groupby("method")["n"].max()
        for metric, rows in group.groupby("metric", sort=False):
            cells = {
                r.method: _cell(r.mean, r.ci95, r.n, most[r.method]) for r in rows.itertuples()
            }
            table.add_row(_arrowed(metric, rows), *(cells.get(m, "-") for m in methods))
        table.add_row("n (instances)", *(str(most[m]) for m in methods))
        console.print(table)
        for r in own.itertuples():
            cell = _cell(r.mean, r.ci95, r.n, -1)
            console.print(f"  {detector} {_arrowed(r.metric, own[own.metric == r.metric])} {cell}")
    for note in result.notes:
        console.print(f"- {note}")


def _arrowed(metric: str, rows) -> str:
    return f"{metric} {'↑' if bool(rows['higher_is_better'].iloc[0]) else '↓'}"


def _cell(mean: float, ci95: float, n: int, most: int) -> str:
    text = f"{mean:.3g} ± {ci95:.2g}" if math.isfinite(ci95) else f"{mean:.3g}"
    return text if n == most else f"{text} (n={n})"


def evaluate(
    annotations: Path = typer.Option(..., "--annotations", "-a", help="COCO json file"),
    images: Path = typer.Option(..., "--images", "-i", help="folder of the json's file_names"),
    detector: list[str] = typer.Option(..., "--detector", "-d", help="detector (repeatable)"),
    method: list[str] = typer.Option(
        [], "--method", "-m", help="method (repeatable; default: every registered method)"
    ),
    metric: list[str] = typer.Option(
        [], "--metric", help="metric (repeatable; default: all but sanity and feature-drift)"
    ),
    detector_param: list[str] = typer.Option(
        [], "--detector-param", help="detector argument name.key=value (repeatable)"
    ),
    method_param: list[str] = typer.Option(
        [], "--method-param", "-p", help="method argument, e.g. odam.smoothing=gaussian"
    ),
    metric_param: list[str] = typer.Option(
        [], "--metric-param", help="metric argument, e.g. deletion.protocol=whole-image"
    ),
    selection: str = typer.Option("paper", help="instances to explain: paper, all or top-k"),
    selection_param: list[str] = typer.Option(
        [], "--selection-param", help="e.g. match_iou=0.5, top_k=3, score_thresh=0.3"
    ),
    attribute: str = typer.Option("score", help="explained attribute (score, x1, ..., combined)"),
    max_images: int | None = typer.Option(None, min=1, help="evaluate the first N images"),
    max_instances: int | None = typer.Option(None, min=1, help="explain at most N per image"),
    resume: bool = typer.Option(True, help="skip images already in OUT/instances.csv"),
    out: Path = typer.Option(Path("outputs/evaluate"), "--out", "-o", help="output folder"),
    label_map: Path | None = typer.Option(
        None, help="JSON/YAML object renaming dataset categories to detector classes (null: ignore)"
    ),
) -> None:
    """Explain the selected instances of every image with every method and score them with
    every metric. Writes OUT/instances.csv (per instance, appended image by image),
    curves.csv, summary.csv, summary.md and plots/*.png, and prints mean ± 95% CI."""
    console = Console()
    try:
        settings = EvaluationSettings(
            detectors=detector,
            methods=method or METHODS.names(),
            metrics=metric or default_metrics(),
            detector_params=scoped_params(detector_param, "--detector-param"),
            method_params=scoped_params(method_param, "--method-param"),
            metric_params=scoped_params(metric_param, "--metric-param"),
            attribute=attribute,
            selection=selection,
            selection_params=parse_params(selection_param),
            max_images=max_images,
            max_instances=max_instances,
            resume=resume,
        )
    except ValidationError as err:
        raise typer.BadParameter(str(err)) from err
    dataset = CocoDataset(annotations, images)
    try:
        dataset.class_names = rename_categories(dataset.class_names, label_map)
        result = run_evaluation(dataset, settings, out)
    except (ValueError, TypeError, KeyError) as err:  # other stored settings, unknown names
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    print_table(result, console, title=f"{annotations.name} mean ± 95% CI")
    console.print(f"per-instance rows, summary (CSV, Markdown) and plots are under {out}")


def default_metrics() -> list[str]:
    """Every registered metric that scores explanations without re-running the method
    (``needs`` map or model, ``scope`` explanation): sanity checks and feature drift are
    opt-in, being many times slower."""
    out = []
    for name in METRICS.names():
        plugin = METRICS.get(name)
        if getattr(plugin, "needs", "") in ("map", "model") and (
            getattr(plugin, "scope", "") == "explanation"
        ):
            out.append(name)
    return out


DEMO_METHOD_SETTINGS: dict[str, Any] = {
    "n": 100,
    "iterations": 20,
    "batch_size": 32,
    "progress": False,
}
"""Scaled-down settings of the demo's evaluation, given to each registered method that takes
them (D-RISE: 100 masks instead of 5000; BBAM: 20 iterations instead of 300)."""
DEMO_SANITY_METHODS = ["odam", "gradcam", "gradcampp"]
"""The methods the demo's sanity checks re-explain (cheap gradient methods)."""


def demo_settings(detectors: list[str], num_images: int) -> EvaluationSettings:
    """The demo's evaluation: every registered method, every metric (sanity checks of the
    gradient methods with 4 to 5 blocks; feature drift with 100 masks), the paper's
    instance selection, at most 2 instances per image."""
    method_params = {
        name: {k: v for k, v in DEMO_METHOD_SETTINGS.items() if _accepts(METHODS.get(name), k)}
        for name in METHODS.names()
    }
    metric_params: dict[str, dict[str, Any]] = {
        "sanity": {"depth": 2, "methods": DEMO_SANITY_METHODS},
        "feature-drift": {"params": {"n": 100, "batch_size": 32}},
    }
    metrics = METRICS.names()
    return EvaluationSettings(
        detectors=detectors,
        methods=METHODS.names(),
        metrics=metrics,
        method_params=method_params,
        metric_params={k: v for k, v in metric_params.items() if k in metrics},
        selection="paper",
        max_images=num_images,
        max_instances=2,
        resume=False,
    )


def _accepts(factory: Any, key: str) -> bool:
    """Whether ``factory`` (a class or function) takes keyword ``key``, also through the
    ``**kwargs`` a subclass passes to its bases."""
    owners = [k for k in getattr(factory, "__mro__", ()) if "__init__" in vars(k)] or [factory]
    for owner in owners:
        params = inspect.signature(owner).parameters
        if key in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return False
