"""The interface between the harness and a detector: a black-box view (batched inference) and
a white-box view (one image with its feature layers, and gradients of any ``Target``).

Methods and metrics depend only on this module; wrappers in ``detectors/`` implement it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from xaibench.types import ATTRIBUTES, Detections, Target

GradientMode = Literal["fast", "exact"]


@dataclass
class FeatureWindows:
    """Activations and gradients of a group of targets on windows of one feature layer.

    A window is a crop of the layer's map (``activations``/``gradients`` are (T, C, h, w)):
    for spatial layers ``origin`` (T, 2) holds the (row, col) of the window's top-left cell
    on the layer (it may be negative or run past the edge, where activations are zero); for
    RoI layers (``roi_boxes`` set) each window is the RoI's pooled grid, spread over the RoI
    box (T, 4) xyxy in original pixels. ``target_index`` (T,) says which of the requested
    targets each row belongs to. ``boxes_on_layer`` (T, 4) is each target's predicted box in
    layer cells (xyxy), used by size-adaptive smoothing. ``layer_size`` is the full layer's
    (h, w): gradients outside the window are zero on the fast path. ``layer_activations``
    (C, h, w) is the whole spatial layer the windows are cut from, where the trace provides
    it (methods that weight the whole layer, such as Grad-CAM, need it).
    """

    layer: str
    target_index: torch.Tensor
    activations: torch.Tensor
    gradients: torch.Tensor
    origin: torch.Tensor
    layer_size: tuple[int, int]
    boxes_on_layer: torch.Tensor
    roi_boxes: torch.Tensor | None = None
    layer_activations: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.target_index.shape[0])


class WhiteBoxTrace(ABC):
    """One image run through the detector with its feature layers exposed.

    ``detections`` are the detector's final detections of the image, with provenance.
    Layer names: the feature levels (e.g. ``"p3"``), ``"fpn"`` (for each target, the level
    that produced it), backbone stages (``"backbone.layer2"``), ``"roi"`` for two-stage
    detectors, and any module as ``"module:<dotted.name>"``.
    """

    detections: Detections
    image_size: tuple[int, int]

    @abstractmethod
    def layer_names(self) -> list[str]:
        """The layers this trace can explain from."""

    @abstractmethod
    def gradients(
        self,
        targets: Sequence[Target],
        layer: str = "fpn",
        mode: GradientMode = "fast",
        margin: int | Callable[[torch.Tensor], int] = 0,
    ) -> list[FeatureWindows]:
        """Activations and d(target)/d(activations) for all ``targets`` at once.

        ``mode="fast"`` uses the detector's structure (one pass for all targets);
        ``mode="exact"`` is one full autograd backward per target (the reference).
        ``margin`` widens fast-path windows by that many cells (zero gradient there), so
        that smoothing the gradient does not clip at the window edge; it may be a function
        of the targets' predicted boxes on the layer ((T, 4) cells, xyxy) giving cells.
        """

    @abstractmethod
    def to_image(self, windows: FeatureWindows, maps: torch.Tensor) -> torch.Tensor:
        """Place per-target maps (T, h, w) on ``windows``' layer into original-image pixels
        (T, H, W): padding added by the detector's input transform is cropped first."""

    @abstractmethod
    def target_values(self, targets: Sequence[Target]) -> torch.Tensor:
        """The scalar value of each target (T,), e.g. to check gradients numerically."""

    def _check(self, targets: Sequence[Target], mode: str | None = None) -> None:
        """Targets must be expanded (no ``combined``) and index existing detections; ``mode``
        (where given) must be ``fast`` or ``exact``."""
        if mode is not None and mode not in ("fast", "exact"):
            raise ValueError(f"mode must be 'fast' or 'exact', got {mode!r}")
        n = len(self.detections)
        for t in targets:
            if t.attribute == "combined":
                raise ValueError(
                    "expand 'combined' targets first (xaibench.detector.expand_targets)"
                )
            if t.index >= n:
                raise IndexError(f"target index {t.index} out of range: {n} detections")

    def detect_with_feature_masks(
        self, masks: torch.Tensor, layer: str = "fpn", batch_size: int = 8
    ) -> list[Detections]:
        """Feature-space perturbation (black box beyond ``layer``): for each mask, the
        detections (after NMS) of this image with ``layer`` multiplied by the mask and the rest
        of the network re-run, in batches of ``batch_size``. ``masks`` (N, h, w) in [0, 1]
        cover the original image at any resolution; each layer cell takes the mask's value at
        its centre, cells over the input padding stay 1 (``xaibench.feature_masks``);
        ``"fpn"`` masks every pyramid level. Wrappers that cannot re-run part of their network
        leave this unimplemented."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot re-run the network from a masked feature layer"
        )

    def _check_unit_images(self, images: torch.Tensor, indices: Sequence[int]) -> list[int]:
        """``provenance_outputs``' arguments checked: (B, 3, H, W) images of the traced
        image's size, one existing detection index per row; the indices as ints."""
        if images.dim() != 4 or images.shape[1] != 3 or len(indices) != images.shape[0]:
            raise ValueError(
                f"images must be (B, 3, H, W) with one index per row; got {tuple(images.shape)} "
                f"and {len(indices)} indices"
            )
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"images must have the traced image's size {self.image_size}, "
                f"got {tuple(images.shape[-2:])}"
            )
        indices = [int(i) for i in indices]
        self._check([Target(i) for i in indices])
        return indices

    def provenance_outputs(
        self, images: torch.Tensor, indices: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable outputs of fixed prediction units on perturbed copies of the image.

        ``images`` (B, 3, H, W) float in [0, 1], original size, may require grad; row b is
        read at the output unit that produced detection ``indices[b]`` (same level, cell,
        anchor and class; two-stage: the same proposal box). Returns its score (B,) and box
        (B, 4) xyxy in original pixels, both differentiable w.r.t. ``images`` (BBAM)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot evaluate fixed prediction units on new images"
        )


class Detector(ABC):
    """A wrapped detector. ``class_names[label]`` names a label; ``feature_levels`` names the
    levels that ``Provenance.level`` indexes."""

    name: str
    class_names: list[str]
    feature_levels: list[str]
    device: torch.device
    max_batch: int | None = None
    """The most images one forward pass may take (memory), or None for no limit: callers that
    batch perturbed images (D-RISE, deletion, insertion, feature masks) ask ``batch_limit``."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def batch_limit(self, requested: int) -> int:
        """``requested`` images per forward pass (>= 1, else ValueError naming
        ``batch_size``), capped by ``max_batch``."""
        if requested < 1:
            raise ValueError(f"batch_size must be >= 1, got {requested}")
        return requested if self.max_batch is None else max(1, min(requested, self.max_batch))

    @abstractmethod
    def detect(
        self, images: Sequence[np.ndarray], batch_size: int = 8, nms: bool = True
    ) -> list[Detections]:
        """Black box: detections of each uint8 RGB (H, W, 3) image, no graph kept.
        ``nms=False`` returns the raw candidates before non-maximum suppression. Float RGB
        images in [0, 1] are accepted too and should reach the network unrounded
        (``xaibench.images.to_rgb_float``; D-RISE's ``masking="float"``)."""

    @abstractmethod
    def trace(self, image: np.ndarray) -> WhiteBoxTrace:
        """White box: one uint8 RGB (H, W, 3) image with its layers and gradients."""

    def torch_module(self) -> torch.nn.Module:
        """The torch module that holds the detector's parameters (by convention
        ``self.model``); sanity checks re-initialise its parameters. Wrappers that keep it
        elsewhere override this."""
        model = getattr(self, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"{type(self).__name__} keeps no torch module in .model; override "
                "Detector.torch_module() to return the module holding its parameters"
            )
        return model

    def parameter_blocks(self, depth: int = 3) -> list[tuple[str, list[str]]]:
        """The blocks sanity checks re-initialise, input to head: [(label, [names of
        submodules of ``torch_module()``])]. The default groups the submodules that hold
        parameters by the first ``depth`` components of their path, in registration order
        (``parameter_blocks``); a detector whose registration order is not input to head, or
        whose parameters group otherwise, overrides this."""
        return parameter_blocks(self.torch_module(), depth)

    def trace_candidates(self, image: np.ndarray) -> WhiteBoxTrace:
        """A trace whose detections are the image's pre-NMS candidates (those of
        ``detect([image], nms=False)``), for strategies that explain every candidate
        (Odam-NMS). The default traces them as units of a separate black-box pass; wrappers
        that post-process inside their trace override it with one pass."""
        return self.trace_units(image, self.detect([image], nms=False)[0])

    def trace_units(self, image: np.ndarray, units: Detections) -> WhiteBoxTrace:
        """A trace of ``image`` whose targets index ``units`` (detections of an earlier trace
        of this image) instead of its own detections: the same output units, by provenance,
        read with the current parameters (sanity checks re-explain them after re-initialising
        layers). The default is right where provenance names a fixed unit (level, cell,
        anchor, class); it raises NotImplementedError where provenance indexes per-image
        proposals, which wrappers of two-stage detectors may override."""
        if units.provenance.proposal is not None:
            raise NotImplementedError(
                f"{type(self).__name__}: provenance indexes per-image proposals; override "
                "Detector.trace_units to re-read the same proposals"
            )
        trace = self.trace(image)
        trace.detections = units
        return trace


def parameter_blocks(module: torch.nn.Module, depth: int = 3) -> list[tuple[str, list[str]]]:
    """Blocks of modules that hold parameters, named by the first ``depth`` components of the
    module path, in registration order: [(block, [module names])]. Parameters held by
    ``module`` itself (not by a submodule) belong to no block."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    blocks: dict[str, list[str]] = {}
    for name, m in module.named_modules():
        if name and any(True for _ in m.parameters(recurse=False)):
            blocks.setdefault(".".join(name.split(".")[:depth]), []).append(name)
    return list(blocks.items())


def expand_targets(targets: Sequence[Target]) -> tuple[list[Target], list[list[int]]]:
    """Replace each ``combined`` target by its five attributes.

    Returns the flat target list and, for each input target, the rows of the flat list whose
    maps it combines (element-wise maximum).
    """
    flat: list[Target] = []
    groups: list[list[int]] = []
    for t in targets:
        attrs = ATTRIBUTES if t.attribute == "combined" else (t.attribute,)
        groups.append(list(range(len(flat), len(flat) + len(attrs))))
        flat.extend(Target(t.index, a) for a in attrs)
    return flat, groups
