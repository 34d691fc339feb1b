"""``xaibench explain``: heat maps for the detections of one image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from xaibench.cli.errors import output_folder, shown_warnings, typed_params, user_errors
from xaibench.detector import Detector
from xaibench.explain import explain_image, write_explanation
from xaibench.images import load_detectable
from xaibench.method import ExplanationMethod
from xaibench.registry import DETECTORS, METHODS, plugin_name
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
    images: list[Path] = typer.Argument(
        ..., help="image files (any format Pillow reads); outputs are named after each file"
    ),
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
    debug: bool = typer.Option(False, "--debug", help="tracebacks (also XAIBENCH_DEBUG=1)"),
) -> None:
    """Explain the detections of each IMAGE: an overlay PNG (with a colour bar) and a .npy map
    per explained detection, and <image>.detections.json (boxes, scores, labels, provenance,
    map files), all named after the image so that several images share one folder."""
    for a in attribute:
        if a not in (*ATTRIBUTES, "combined"):
            raise typer.BadParameter(
                f"unknown attribute {a!r}; expected one of {', '.join((*ATTRIBUTES, 'combined'))}"
            )
    if top_k is None and score_thresh is None:
        top_k = 5
    check_stems(images)
    console = Console()
    with user_errors("--out", debug):
        output_folder(out)
    with user_errors("IMAGE", debug):
        pictures = [load_detectable(path) for path in images]
    wrapped = build_detector(detector, weights, detector_param, debug)
    explainer = build_method(method, parse_params(method_param), debug)
    for path, picture in zip(images, pictures, strict=True):
        status = console.status(f"explaining {path.name} with {method} on {detector}")
        with user_errors("--method-param", debug), status:
            result = explain_image(wrapped, explainer, picture, attribute, top_k, score_thresh)
        with user_errors("--out", debug):
            written = write_explanation(
                out,
                picture,
                result,
                wrapped.class_names,
                wrapped.feature_levels,
                image_name=path.stem,
            )
        console.print(
            f"{path.name}: {len(result.detections)} detections, {len(result.explained)} "
            f"explained ({len(result.saliencies)} maps) -> {written}"
        )


def build_detector(name: str, weights: str | None, params: list[str], debug: bool) -> Detector:
    """The detector ``name`` built with the ``--detector-param`` items ``params`` and, only
    where the user gave ``--weights``, ``weights`` (a factory without that setting is refused
    naming --weights); a mistake ends the command in one line."""
    kwargs = parse_params(params)
    with user_errors("--detector", debug), shown_warnings():
        factory = DETECTORS.get(name)
        typed_params(factory, kwargs, "--detector-param")
        if weights is not None:
            kwargs.update(typed_params(factory, {"weights": weights}, "--weights"))
        return DETECTORS.build(name, **kwargs)


def build_method(
    label: str, params: dict[str, Any], debug: bool = False, prefix: str = ""
) -> ExplanationMethod:
    """The method of ``label`` (a name or NAME@VARIANT) built with ``params`` (checked by
    ``typed_params``); a mistake ends the command in one line naming --method or -p."""
    with user_errors("--method", debug):
        factory = METHODS.get(plugin_name(label))
    params = typed_params(factory, params, "--method-param", prefix)
    with user_errors("--method-param", debug):
        return factory(**params)


def check_stems(images: list[Path]) -> None:
    """Refuse images whose outputs would overwrite each other (one file name stem twice)."""
    seen: dict[str, Path] = {}
    for path in images:
        if path.stem in seen and seen[path.stem] != path:
            raise typer.BadParameter(
                f"IMAGE {seen[path.stem]} and {path} would write the same files (name "
                f"{path.stem!r}) into --out; explain them into separate --out folders"
            )
        seen[path.stem] = path
