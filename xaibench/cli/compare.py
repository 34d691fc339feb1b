"""``xaibench compare``: several explanation methods side by side on one image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from xaibench.cli.errors import output_folder, user_errors
from xaibench.cli.explain import build_detector, build_method, parse_params
from xaibench.compare import compare_methods, write_comparison
from xaibench.images import load_detectable
from xaibench.registry import plugin_name
from xaibench.types import ATTRIBUTES


def method_params(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``LABEL.key=value`` pairs -> {label: {key: value}} (values read as JSON). A label is a
    method name or ``NAME@VARIANT``; ``NAME.key=value`` sets every label of method NAME, and
    a label's own setting wins over it."""
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    shared: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for key, value in parse_params(items).items():
        label, sep, name = key.partition(".")
        if not sep or not label or not name:
            raise typer.BadParameter(f"expected METHOD.key=value (e.g. drise.n=1000), got {key!r}")
        if label in out:
            out[label][name] = value
            continue
        owners = [m for m in methods if plugin_name(m) == label]
        if not owners:
            raise typer.BadParameter(
                f"--method-param {key!r} names method {label!r}, which is not in --methods "
                f"({', '.join(methods)})"
            )
        for m in owners:
            shared[m][name] = value
    return {m: {**shared[m], **out[m]} for m in methods}


def compare(
    image: Path = typer.Argument(..., help="image file (any format Pillow reads)"),
    methods: str = typer.Option(
        ...,
        "--methods",
        "-m",
        help="comma-separated methods, e.g. odam,gradcam,drise; NAME@VARIANT lists a method "
        "again under its own label (odam@p3,odam@p5 with -p odam@p3.layer=p3)",
    ),
    detector: str = typer.Option(..., "--detector", "-d", help="registered detector name"),
    attribute: str = typer.Option("score", "--attribute", "-a", help="score, x1..y2, combined"),
    top_k: int | None = typer.Option(None, "--top-k", help="explain the k best detections"),
    score_thresh: float | None = typer.Option(
        None, "--score-thresh", help="explain detections scoring above this"
    ),
    weights: str | None = typer.Option(None, help="detector weights: DEFAULT or a file"),
    detector_param: list[str] = typer.Option(
        [], "--detector-param", help="extra detector argument key=value (repeatable)"
    ),
    method_param: list[str] = typer.Option(
        [], "--method-param", "-p", help="LABEL.key=value, e.g. drise.n=1000 (repeatable)"
    ),
    out: Path = typer.Option(Path("outputs/compare"), "--out", "-o", help="output folder"),
    debug: bool = typer.Option(False, "--debug", help="tracebacks (also XAIBENCH_DEBUG=1)"),
) -> None:
    """Explain the detections of IMAGE with several methods: one figure (a row per explained
    detection, a column per method label), the maps and <image>.detections.json as
    ``explain`` writes them."""
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names or len(set(names)) != len(names):
        raise typer.BadParameter(
            f"--methods must list distinct labels (NAME or NAME@VARIANT), got {methods!r}"
        )
    if attribute not in (*ATTRIBUTES, "combined"):
        raise typer.BadParameter(
            f"unknown attribute {attribute!r}; expected one of "
            f"{', '.join((*ATTRIBUTES, 'combined'))}"
        )
    if top_k is None and score_thresh is None:
        top_k = 3
    params = method_params(method_param, names)
    with user_errors("--methods", debug):
        for name in names:
            plugin_name(name)
    explainers = {name: build_method(name, params[name], debug, f"{name}.") for name in names}
    with user_errors("--out", debug):
        output_folder(out)
    with user_errors("IMAGE", debug):
        picture = load_detectable(image)
    wrapped = build_detector(detector, weights, detector_param, debug)
    console = Console()
    status = console.status(f"explaining {image.name} on {detector}")
    with user_errors("--method-param", debug), status:
        result = compare_methods(
            wrapped,
            explainers,
            picture,
            attribute,
            top_k,
            score_thresh,
            on_method=lambda name: status.update(f"explaining {image.name} with {name}"),
        )
    if not result.explained:
        console.print(f"{len(result.detections)} detections, none selected: nothing to compare")
        raise typer.Exit(1)
    with user_errors("--out", debug):
        figure, json_path = write_comparison(
            out, picture, result, wrapped.class_names, wrapped.feature_levels, image.stem
        )
    table = Table("method", "maps", "seconds per map")
    for name, maps in result.saliencies.items():
        table.add_row(name, str(len(maps)), f"{maps[0].seconds:.4g}")
    console.print(table)
    console.print(f"figure -> {figure}\nmaps and detections -> {json_path}")
