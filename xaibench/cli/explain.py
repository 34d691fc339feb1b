"""``xaibench explain``: heat maps for the detections of one image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from xaibench.explain import explain_image, write_explanation
from xaibench.images import load_image
from xaibench.registry import DETECTORS, METHODS
from xaibench.types import ATTRIBUTES


def parse_params(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are read as JSON where they parse (numbers, true, null)."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def explain(
    image: Path = typer.Argument(..., help="image file (any format Pillow reads)"),
    detector: str = typer.Option(..., "--detector", "-d", help="registered detector name"),
    method: str = typer.Option("odam", "--method", "-m", help="registered method name"),
    attribute: list[str] = typer.Option(
        ["score"], "--attribute", "-a", help="score, x1, y1, x2, y2 or combined (repeatable)"
    ),
    top_k: int | None = typer.Option(None, "--top-k", help="explain the k best detections"),
    score_thresh: float | None = typer.Option(
        None, "--score-thresh", help="explain detections scoring above this"
    ),
    weights: str | None = typer.Option(None, help="detector weights: DEFAULT or a file"),
    detector_param: list[str] = typer.Option(
        [], "--detector-param", help="extra detector argument key=value (repeatable)"
    ),
    method_param: list[str] = typer.Option(
        [], "--method-param", "-p", help="method argument key=value, e.g. layer=roi"
    ),
    out: Path = typer.Option(Path("outputs/explain"), "--out", "-o", help="output folder"),
) -> None:
    """Explain the detections of IMAGE: an overlay PNG and a .npy map per explained
    detection, and detections.json (boxes, scores, labels, provenance, map files)."""
    for a in attribute:
        if a not in (*ATTRIBUTES, "combined"):
            raise typer.BadParameter(
                f"unknown attribute {a!r}; expected one of {', '.join((*ATTRIBUTES, 'combined'))}"
            )
    if top_k is None and score_thresh is None:
        top_k = 5
    console = Console()
    picture = load_image(image)
    det_kwargs = parse_params(detector_param)
    if weights is not None:
        det_kwargs["weights"] = weights
    wrapped = DETECTORS.build(detector, **det_kwargs)
    explainer = METHODS.build(method, **parse_params(method_param))
    with console.status(f"explaining {image.name} with {method} on {detector}"):
        result = explain_image(wrapped, explainer, picture, attribute, top_k, score_thresh)
    path = write_explanation(
        out,
        picture,
        result,
        wrapped.class_names,
        wrapped.feature_levels,
        image_name=image.stem,
    )
    console.print(
        f"{len(result.detections)} detections, {len(result.explained)} explained "
        f"({len(result.saliencies)} maps) -> {path}"
    )
