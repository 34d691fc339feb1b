"""``xaibench evaluate``: methods x metrics over a COCO-format dataset for some detectors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import typer
from pydantic import ValidationError
from rich.console import Console

from xaibench.cli.explain import parse_params
from xaibench.datasets.coco import CocoDataset
from xaibench.evaluate import EvaluationResult, EvaluationSettings, run_evaluation
from xaibench.labels import rename_categories
from xaibench.registry import METHODS, METRICS
from xaibench.report import print_summary
from xaibench.suite import load_suite


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
    """Per detector, tables of mean ± 95% CI that read at 80 columns (one row per metric,
    one column per method), each NaN column with its reason and count, the failed images
    and units grouped by reason, and the metrics' notes."""
    results = result.results if result.results is not None else pd.DataFrame()
    print_summary(console, result.summary, results, result.report, title, result.notes)


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
    preset: str | None = typer.Option(
        None,
        help="metric preset, e.g. paper (the official ODAM evaluation conventions); "
        "--metric-param and -p values override it",
    ),
    selection: str = typer.Option("paper", help="instances to explain: paper, all or top-k"),
    selection_param: list[str] = typer.Option(
        [], "--selection-param", help="e.g. match_iou=0.5, top_k=3, score_thresh=0.3"
    ),
    attribute: str = typer.Option("score", help="explained attribute (score, x1, ..., combined)"),
    max_images: int | None = typer.Option(None, min=1, help="evaluate the first N images"),
    max_instances: int | None = typer.Option(None, min=1, help="explain at most N per image"),
    resume: bool = typer.Option(
        True, help="skip units already in OUT/results.sqlite (--no-resume: compute them again)"
    ),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="compute units that failed before again"
    ),
    out: Path = typer.Option(Path("outputs/evaluate"), "--out", "-o", help="output folder"),
    label_map: Path | None = typer.Option(
        None, help="JSON/YAML object renaming dataset categories to detector classes (null: ignore)"
    ),
) -> None:
    """Explain the selected instances of every image with every method and score them with
    every metric. Stores every unit (method x image) in OUT/results.sqlite as it finishes;
    writes OUT/instances.csv, curves.csv, summary.csv, summary.md and plots/*.png, and prints
    mean ± 95% CI. A method may be listed twice as NAME@VARIANT (-m odam@p3 -m odam@p5
    -p odam@p3.layer=p3). Exit code 1 when no image could be evaluated."""
    console = Console()
    try:
        settings = EvaluationSettings(
            detectors=detector,
            methods=method or METHODS.names(),
            metrics=metric or default_metrics(),
            detector_params=scoped_params(detector_param, "--detector-param"),
            method_params=scoped_params(method_param, "--method-param"),
            metric_params=scoped_params(metric_param, "--metric-param"),
            preset=preset,
            attribute=attribute,
            selection=selection,
            selection_params=parse_params(selection_param),
            max_images=max_images,
            max_instances=max_instances,
            resume=resume,
        )
    except ValidationError as err:
        raise typer.BadParameter(str(err)) from err
    try:
        dataset = CocoDataset(annotations, images)
        dataset.class_names = rename_categories(dataset.class_names, label_map)
        result = run_evaluation(dataset, settings, out, retry_failed=retry_failed)
    except (ValueError, TypeError, KeyError, OSError) as err:  # bad data, names, settings
        console.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(2) from err
    print_table(result, console, title=f"{annotations.name} mean ± 95% CI")
    console.print(f"per-instance rows, summary (CSV, Markdown) and plots are under {out}")
    report = result.report
    if report.images and report.images_failed == report.images:
        console.print("[red]no image could be evaluated[/red]")
        raise typer.Exit(1)


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


def demo_settings(detectors: list[str], num_images: int) -> EvaluationSettings:
    """The demo's evaluation as ``EvaluationSettings``: the methods, metrics, parameters and
    selection of the embedded default suite (every registered method, every metric, scaled
    down), on ``detectors`` and ``num_images`` images."""
    suite = load_suite()
    return EvaluationSettings(
        detectors=detectors,
        methods=[m.name for m in suite.methods],
        metrics=[m.name for m in suite.metrics],
        method_params={m.name: m.params for m in suite.methods if m.params},
        metric_params={m.name: m.params for m in suite.metrics if m.params},
        preset=suite.preset,
        selection=suite.selection.mode,
        selection_params=suite.selection.params,
        max_images=num_images,
        max_instances=suite.limits.instances,
        seed=suite.seed,
        resume=False,
    )
