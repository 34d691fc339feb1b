"""The interface of an explanation method, and the base class of gradient-based ones."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from xaibench.detector import (
    Detector,
    FeatureWindows,
    GradientMode,
    WhiteBoxTrace,
    expand_targets,
)
from xaibench.types import Saliency, Target


class ExplanationMethod(ABC):
    """Explains several targets of one image in one call.

    ``access`` says what the method needs from the detector: ``"white-box"`` (layers and
    gradients, through ``Detector.trace``) or ``"black-box"`` (``Detector.detect`` only).
    """

    name: ClassVar[str] = "method"
    access: ClassVar[Literal["white-box", "black-box"]] = "white-box"

    @abstractmethod
    def explain(
        self,
        detector: Detector,
        image: np.ndarray,
        targets: Sequence[Target],
        trace: WhiteBoxTrace | None = None,
    ) -> list[Saliency]:
        """One ``Saliency`` (original-image pixels) per target, in order. A white-box method
        reuses ``trace`` when given (it must be ``detector.trace(image)``)."""

    def params(self) -> dict[str, Any]:
        """The settings recorded with every map."""
        return {}

    def conventions(self) -> dict[str, str]:
        """The settings among ``params()`` that choose between published conventions (e.g.
        how D-RISE rounds its masked images), stored with every result row of the method's
        maps; none by default."""
        return {}

    def saliencies(
        self,
        targets: Sequence[Target],
        maps: Sequence[np.ndarray],
        start: float,
        params: dict[str, Any] | None = None,
    ) -> list[Saliency]:
        """One ``Saliency`` per target from its map, with ``params`` (default: ``params()``)
        and the wall time since ``start`` (``time.perf_counter()``) shared among the targets."""
        seconds = (time.perf_counter() - start) / max(len(targets), 1)
        params = self.params() if params is None else params
        return [
            Saliency(map=m, method=self.name, target=t, params=params, seconds=seconds)
            for t, m in zip(targets, maps, strict=True)
        ]


def detection_indices(targets: Sequence[Target], detections: int) -> list[int]:
    """The distinct detection indices of ``targets``, ascending; an ``IndexError`` names an
    index beyond the image's ``detections``."""
    indices = sorted({t.index for t in targets})
    for i in indices:
        if i >= detections:
            raise IndexError(f"target index {i} out of range: {detections} detections")
    return indices


class GradientCAMBase(ExplanationMethod):
    """Template for CAM-style methods: H = post(sum_c w_c * A_c) on one feature layer.

    Subclasses define ``weights`` (how gradients become per-channel or per-pixel weights);
    this class runs the trace, asks for all targets' gradients at once, places the maps in
    the original image and takes the element-wise maximum for ``combined`` targets.
    """

    def __init__(self, layer: str = "fpn", mode: GradientMode = "fast") -> None:
        self.layer = layer
        self.mode = mode

    @abstractmethod
    def weights(self, windows: FeatureWindows) -> torch.Tensor:
        """(T, C, h, w) or (T, C, 1, 1) weights for ``windows.activations``."""

    def combine(self, weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        """Per-target layer maps (T, h, w) from weights and activations."""
        return torch.relu((weights * activations).sum(dim=1))

    def layer_maps(self, windows: FeatureWindows) -> tuple[FeatureWindows, torch.Tensor]:
        """Per-target layer maps (T, h, w) and the windows that place them on the image."""
        return windows, self.combine(self.weights(windows), windows.activations)

    def margin(self, boxes_on_layer: torch.Tensor) -> int:
        """Extra cells around fast-path windows that ``weights`` needs, given the targets'
        predicted boxes on the layer ((T, 4) cells)."""
        return 0

    def params(self) -> dict[str, Any]:
        return {"layer": self.layer, "mode": self.mode}

    def explain(
        self,
        detector: Detector,
        image: np.ndarray,
        targets: Sequence[Target],
        trace: WhiteBoxTrace | None = None,
    ) -> list[Saliency]:
        start = time.perf_counter()
        trace = trace if trace is not None else detector.trace(image)
        flat, groups = expand_targets(targets)
        windows = trace.gradients(flat, self.layer, self.mode, self.margin)
        maps: list[np.ndarray] = [np.empty(0)] * len(flat)
        for w in windows:
            placed, layer_maps = self.layer_maps(w)
            image_maps = trace.to_image(placed, layer_maps).float().cpu().numpy()
            for row, image_map in zip(w.target_index.tolist(), image_maps, strict=True):
                maps[row] = image_map
        combined = [
            maps[rows[0]] if len(rows) == 1 else np.max([maps[r] for r in rows], axis=0)
            for rows in groups
        ]
        return self.saliencies(targets, combined, start)
