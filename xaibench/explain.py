"""Explaining the detections of one image and writing the results to a folder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xaibench.detector import Detector
from xaibench.method import ExplanationMethod
from xaibench.types import Detections, Saliency, Target
from xaibench.visualize import overlay, save_png


@dataclass
class Explanation:
    """The detections of an image, which of them were explained, and the maps per target."""

    detections: Detections
    explained: list[int]
    saliencies: list[Saliency]


def select_detections(
    detections: Detections, top_k: int | None = None, score_thresh: float | None = None
) -> list[int]:
    """Indices of the detections to explain, by descending score: those above
    ``score_thresh`` (if given), then the first ``top_k`` (if given)."""
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    order = torch.argsort(detections.scores, descending=True).tolist()
    if score_thresh is not None:
        order = [i for i in order if float(detections.scores[i]) > score_thresh]
    return order[:top_k] if top_k is not None else order


def explain_image(
    detector: Detector,
    method: ExplanationMethod,
    image: np.ndarray,
    attributes: Sequence[str] = ("score",),
    top_k: int | None = None,
    score_thresh: float | None = None,
) -> Explanation:
    """Detect, pick detections, and explain each picked detection's ``attributes``."""
    trace = detector.trace(image) if method.access == "white-box" else None
    detections = trace.detections if trace is not None else detector.detect([image])[0]
    explained = select_detections(detections, top_k, score_thresh)
    targets = [Target(i, a) for i in explained for a in attributes]  # type: ignore[arg-type]
    saliencies = method.explain(detector, image, targets, trace=trace) if targets else []
    return Explanation(detections, explained, saliencies)


def write_explanation(
    out_dir: str | Path,
    image: np.ndarray,
    explanation: Explanation,
    class_names: Sequence[str],
    level_names: Sequence[str] = (),
    image_name: str = "image",
) -> Path:
    """Write an overlay PNG (with a colour bar) and a .npy map per explained target, and
    ``<image_name>.detections.json`` (boxes xyxy in original pixels, scores, labels,
    provenance, map files). Every file name starts with ``image_name``, so several images
    share one folder. Returns the json's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    det = explanation.detections
    maps: dict[int, dict[str, dict[str, str]]] = {}
    for s in explanation.saliencies:
        i, attr = s.target.index, s.target.attribute
        stem = f"{image_name}_det{i:03d}_{s.method}_{attr}"
        np.save(out / f"{stem}.npy", s.map)
        label = int(det.labels[i])
        caption = f"{class_names[label]} {float(det.scores[i]):.2f} {s.method}:{attr}"
        picture = overlay(image, s.map, det.boxes[i].cpu().numpy(), caption, with_bar=True)
        save_png(picture, out / f"{stem}.png")
        maps.setdefault(i, {})[f"{s.method}:{attr}"] = {
            "npy": f"{stem}.npy",
            "png": f"{stem}.png",
            "seconds": f"{s.seconds:.6f}",
        }
    records = []
    for i in range(len(det)):
        label = int(det.labels[i])
        records.append(
            {
                "index": i,
                "box": [round(float(v), 3) for v in det.boxes[i]],
                "score": float(det.scores[i]),
                "label": label,
                "class_name": class_names[label],
                "objectness": None if det.objectness is None else float(det.objectness[i]),
                "provenance": det.provenance.record(i, list(level_names)),
                "explained": i in explanation.explained,
                "maps": maps.get(i, {}),
            }
        )
    path = out / f"{image_name}.detections.json"
    params = explanation.saliencies[0].params if explanation.saliencies else {}
    payload = {
        "image": image_name,
        "image_size": list(det.image_size),
        "box_format": "xyxy, original-image pixels",
        "method_params": params,
        "detections": records,
    }
    path.write_text(json.dumps(payload, indent=2))
    return path
