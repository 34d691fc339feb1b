"""``xaibench compare``: several explanation methods side by side on one image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from xaibench.cli.explain import parse_params
from xaibench.compare import compare_methods, write_comparison
from xaibench.images import load_image
from xaibench.registry import DETECTORS, METHODS
from xaibench.types import ATTRIBUTES


def method_params(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``METHOD.key=value`` pairs -> {method: {key: value}} (values read as JSON)."""
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for key, value in parse_params(items).items():
        method, sep, name = key.partition(".")
        if not sep or not name:
            raise typer.BadParameter(f"expected METHOD.key=value (e.g. drise.n=1000), got {key!r}")
        if method not in out:
            raise typer.BadParameter(
                f"--method-param {key!r} names method {method!r}, which is not in --methods "
                f"({', '.join(methods)})"
            )
        out[method][name] = value
    return out


def compare(
    image: Path = typer.Argument(..., help="image file (any format Pillow reads)"),
    methods: str = typer.Option(
        ..., "--methods", "-m", help="comma-separated method names, e.g. odam,gradcam,drise"
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
        [], "--method-param", "-p", help="METHOD.key=value, e.g. drise.n=1000 (repeatable)"
    ),
    out: Path = typer.Option(Path("outputs/compare"), "--out", "-o", help="output folder"),
) -> None:
    """Explain the detections of IMAGE with several methods: one figure (a row per explained
    detection, a column per method), the maps and detections.json as ``explain`` writes them."""
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names or len(set(names)) != len(names):
        raise typer.BadParameter(f"--methods must list distinct method names, got {methods!r}")
    if attribute not in (*ATTRIBUTES, "combined"):
        raise typer.BadParameter(
            f"unknown attribute {attribute!r}; expected one of "
            f"{', '.join((*ATTRIBUTES, 'combined'))}"
        )
    if top_k is None and score_thresh is None:
        top_k = 3
    params = method_params(method_param, names)
    explainers = {name: METHODS.build(name, **params[name]) for name in names}
    det_kwargs = parse_params(detector_param)
    if weights is not None:
        det_kwargs["weights"] = weights
    wrapped = DETECTORS.build(detector, **det_kwargs)
    picture = load_image(image)
    console = Console()
    with console.status(f"explaining {image.name} on {detector}") as status:
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
    figure, json_path = write_comparison(
        out, picture, result, wrapped.class_names, wrapped.feature_levels, image_name=image.stem
    )
    table = Table("method", "maps", "seconds per map")
    for name, maps in result.saliencies.items():
        table.add_row(name, str(len(maps)), f"{maps[0].seconds:.4g}")
    console.print(table)
    console.print(f"figure -> {figure}\nmaps and detections.json -> {json_path}")
