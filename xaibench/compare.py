"""Several explanation methods on the same detections of one image, and one figure of them."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from xaibench.detector import Detector
from xaibench.explain import Explanation, select_detections, write_explanation
from xaibench.method import ExplanationMethod
from xaibench.plots import add_colour_bar
from xaibench.types import Detections, Saliency, Target
from xaibench.visualize import overlay


@dataclass
class Comparison:
    """The detections of an image, those explained, and per method label (its key in
    ``methods``: a name, or ``NAME@VARIANT`` for a method listed more than once) one map per
    explained detection, in the order of ``explained``."""

    detections: Detections
    explained: list[int]
    saliencies: dict[str, list[Saliency]]


def compare_methods(
    detector: Detector,
    methods: Mapping[str, ExplanationMethod],
    image: np.ndarray,
    attribute: str = "score",
    top_k: int | None = None,
    score_thresh: float | None = None,
    on_method: Callable[[str], None] | None = None,
) -> Comparison:
    """Explain the same detections with every method. One trace serves all white-box methods
    (and gives black-box ones the detections, so that indices agree); ``on_method(name)`` is
    called before each method runs (progress)."""
    if not methods:
        raise ValueError("methods must name at least one explanation method")
    white_box = any(m.access == "white-box" for m in methods.values())
    trace = detector.trace(image) if white_box else None
    detections = trace.detections if trace is not None else detector.detect([image])[0]
    explained = select_detections(detections, top_k, score_thresh)
    targets = [Target(i, attribute) for i in explained]  # type: ignore[arg-type]
    saliencies: dict[str, list[Saliency]] = {}
    for name, method in methods.items():
        if on_method is not None:
            on_method(name)
        saliencies[name] = method.explain(detector, image, targets, trace=trace) if targets else []
    return Comparison(detections, explained, saliencies)


def draw_comparison(
    image: np.ndarray,
    comparison: Comparison,
    class_names: Sequence[str],
    path: str | Path,
) -> Path:
    """One PNG: a row per explained detection, a column per method; each panel the image with
    the map normalised to its own range with a colour bar of its real values, the detection's
    box and the method's time per map."""
    rows, names = comparison.explained, list(comparison.saliencies)
    if not rows:
        raise ValueError("nothing to draw: no detection was explained")
    det = comparison.detections
    fig = Figure(figsize=(2.6 * len(names), 2.6 * len(rows)))
    axes = fig.subplots(len(rows), len(names), squeeze=False)
    for r, index in enumerate(rows):
        box = det.boxes[index].cpu().numpy()
        for c, name in enumerate(names):
            saliency = comparison.saliencies[name][r]
            ax = axes[r][c]
            ax.imshow(overlay(image, saliency.map, box))
            add_colour_bar(ax, saliency.map)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{name}\n{saliency.seconds:.3g} s/map", fontsize=9)
            if c == 0:
                label = class_names[int(det.labels[index])]
                ax.set_ylabel(f"#{index} {label} {float(det.scores[index]):.2f}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def write_comparison(
    out_dir: str | Path,
    image: np.ndarray,
    comparison: Comparison,
    class_names: Sequence[str],
    level_names: Sequence[str] = (),
    image_name: str = "image",
) -> tuple[Path, Path]:
    """The figure ``<image_name>_comparison.png`` plus, as ``explain`` writes them, an overlay
    PNG and a .npy map per method label and detection and ``<image_name>.detections.json``
    (maps keyed ``LABEL:attribute``), which records each label's method and parameters under
    ``methods``. Returns (figure, json) paths."""
    flat = [  # files and map keys by label, so that one method listed twice keeps both
        replace(s, method=label) for label, maps in comparison.saliencies.items() for s in maps
    ]
    explanation = Explanation(comparison.detections, comparison.explained, flat)
    json_path = write_explanation(out_dir, image, explanation, class_names, level_names, image_name)
    payload = json.loads(json_path.read_text())
    payload["methods"] = {
        name: {"method": maps[0].method, "params": maps[0].params}
        for name, maps in comparison.saliencies.items()
        if maps
    }
    json_path.write_text(json.dumps(payload, indent=2))
    figure = draw_comparison(
        image, comparison, class_names, Path(out_dir) / f"{image_name}_comparison.png"
    )
    return figure, json_path
