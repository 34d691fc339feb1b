"""Join a detector the harness has never seen, in a few lines (README, "A new detector").

Two ways in:

- ``PredictDetector``: black box only. A ``predict(images)`` function returning, per image,
  ``(boxes, scores, labels, class_probs)`` becomes a ``Detector``: D-RISE, deletion,
  insertion and the map metrics work.
- ``DenseModel`` + ``DenseDetector``: white box too, for a dense (one-stage) detector that
  predicts at every cell of one feature layer (the *head layer*) a score per class and a box.
  Subclass ``DenseModel`` (an ``nn.Module``, so its parameters are the ones sanity checks
  re-initialise, in its registration order) with ``features``, ``head`` and ``decode``;
  ODAM, Grad-CAM, Grad-CAM++, BBAM, feature-space D-RISE, Odam-NMS and the sanity checks
  work, through one autograd backward per target (``mode="exact"``), and through one
  backward for all targets where the model declares its head's ``window`` (``mode="fast"``).
  It is explained by the trace every one-stage detector has (``detectors/dense.py``).

Conventions (as for every wrapper of the harness):

- labels are 1..K, 0 is the background; ``class_names[0]`` names the background.
- ``class_probs`` (N, K + 1): column k is the probability of label k, column 0 the background
  (0 for a sigmoid head that has none); D-RISE compares these rows.
- boxes are xyxy in pixels of the original image (a ``DenseModel`` decodes them in
  network-input pixels, mapped back by its ``InputGeometry``); detections are clipped to
  the image, targets (``x1``..``y2``, ``xaibench.targets``) read the decoded box unclipped.
- ``detect(..., nms=False)`` returns every candidate above the score threshold before
  non-maximum suppression (deletion and insertion score the best of them).
- provenance of a dense detection: level 0 (the head layer), the cell (y, x) on it, anchor 0
  and ``class_index`` = the label (the column of ``class_probs`` that is its score).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xaibench.detector import Detector, WhiteBoxTrace
from xaibench.detectors.dense import DenseNetwork, DenseUnits, dense_detections
from xaibench.detectors.network import suppress
from xaibench.geometry import InputGeometry
from xaibench.images import to_chw_tensor, to_rgb_float
from xaibench.types import Detections, checked_detections

Prediction = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""One image's ``(boxes (N, 4) xyxy original pixels, scores (N,), labels (N,) in 1..K,
class_probs (N, K + 1))``."""


def _float_images(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [to_rgb_float(image, name=f"images[{i}]") for i, image in enumerate(images)]


class PredictDetector(Detector):
    """A black-box detector from ``predict(images) -> [Prediction per image]``.

    ``predict`` receives at most ``max_batch`` float RGB images (H, W, 3) in [0, 1] (uint8
    inputs are divided by 255) and returns one ``Prediction`` per image after its own
    non-maximum suppression; ``raw_predict`` (same form) returns the candidates before it and
    serves ``detect(..., nms=False)`` (``predict`` serves it when not given). Predictions are
    checked (``checked_detections``): a wrong shape, label or box unit is named."""

    def __init__(
        self,
        predict: Callable[[list[np.ndarray]], Sequence[Prediction]],
        class_names: Sequence[str],
        name: str = "outside",
        max_batch: int = 8,
        raw_predict: Callable[[list[np.ndarray]], Sequence[Prediction]] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if len(class_names) < 2:
            raise ValueError("class_names must name the background (index 0) and >= 1 class")
        self.predict, self.raw_predict = predict, raw_predict
        self.class_names = list(class_names)
        self.name, self.max_batch, self.device = name, max_batch, torch.device(device)
        self.feature_levels: list[str] = []

    @torch.no_grad()
    def detect(
        self, images: Sequence[np.ndarray], batch_size: int = 8, nms: bool = True
    ) -> list[Detections]:
        run = self.predict if nms or self.raw_predict is None else self.raw_predict
        step = self.batch_limit(batch_size)
        out: list[Detections] = []
        for start in range(0, len(images), step):
            chunk = _float_images(images[start : start + step])
            predictions = list(run(chunk))
            if len(predictions) != len(chunk):
                raise ValueError(
                    f"{self.name}: predict returned {len(predictions)} results for "
                    f"{len(chunk)} images"
                )
            for k, (image, p) in enumerate(zip(chunk, predictions, strict=True)):
                out.append(
                    checked_detections(
                        *p,
                        num_classes=self.num_classes,
                        image_size=(int(image.shape[0]), int(image.shape[1])),
                        where=f"{self.name}: prediction for image {start + k}",
                    )
                )
        return out

    def trace(self, image: np.ndarray) -> WhiteBoxTrace:
        raise NotImplementedError(
            f"{self.name} is a black box (PredictDetector): white-box methods need a "
            "DenseDetector (xaibench.adapter)"
        )

    def torch_module(self) -> nn.Module:
        raise TypeError(f"{self.name} is a black box (PredictDetector): it has no parameters")


class DenseModel(nn.Module, ABC):
    """A dense detector described for the harness. Subclasses set ``head_layer`` (the
    feature layer the head reads), optionally ``window`` and ``input_stride``, and define:

    - ``features(x)``: {name: (B, C, h, w)} of the network input ``x`` (B, 3, H_pad, W_pad),
      in input-to-head order; the names are the layers methods can explain from, and must
      hold ``head_layer``;
    - ``head(feature)``: {output name: (B, C_k, h, w)} per-cell outputs of the head layer;
    - ``decode(cells, yx)``: from each row's head outputs at its cell ({name: (T, C_k)}) and
      the cell ``yx`` (T, 2) (row, col) on the head layer, its ``class_probs`` (T, K + 1)
      (column 0 the background) and decoded box (T, 4) xyxy in network-input pixels,
      unclipped (the harness maps it to the original image). It must be differentiable in
      ``cells``.

    ``window`` R (cells): the head's output at a cell depends only on the (2R+1)^2 cells of
    the head layer around it, and the head is made of stride-1 convolutions with zero "same"
    padding and point-wise layers (no normalisation over space), so that running it on a
    crop gives the same outputs at the crop's inner cells. A 3 x 3 conv tower of n layers has
    R = n. With ``window`` set, ``mode="fast"`` takes all targets' gradients in one backward
    pass on crops; ``None`` makes every mode exact.

    ``preprocess`` (override to resize or normalise differently): RGB in [0, 1] to the
    network input, zero-padded at the bottom and right to a multiple of ``input_stride``.
    Post-processing: candidates (cell, class) scoring above ``score_thresh``, the best
    ``topk_candidates``, per-class NMS at ``nms_thresh``, at most ``detections_per_img``.
    """

    head_layer: str
    window: int | None = None
    input_stride: int = 1
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    topk_candidates: int = 1000
    detections_per_img: int = 100

    @abstractmethod
    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named feature layers (B, C, h, w) of the network input (B, 3, H_pad, W_pad)."""

    @abstractmethod
    def head(self, feature: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-cell outputs {name: (B, C_k, h, w)} of the head layer (B, C, h, w)."""

    @abstractmethod
    def decode(
        self, cells: dict[str, torch.Tensor], yx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(class_probs (T, K + 1), boxes (T, 4) xyxy network-input pixels) of head outputs
        at cells ``yx`` (T, 2)."""

    def preprocess(self, images: torch.Tensor) -> tuple[torch.Tensor, InputGeometry]:
        """(B, 3, H, W) RGB in [0, 1] -> network input (B, 3, H_pad, W_pad) and geometry;
        differentiable (BBAM optimises through it)."""
        height, width = int(images.shape[-2]), int(images.shape[-1])
        s = self.input_stride
        padded = (math.ceil(height / s) * s, math.ceil(width / s) * s)
        x = F.pad(images, (0, padded[1] - width, 0, padded[0] - height))
        return x, InputGeometry((height, width), (height, width), padded)


class DenseDetector(DenseNetwork):
    """A ``DenseModel`` as a one-stage detector of the harness (conventions: module
    docstring), explained by the dense architecture's trace (``detectors/dense.py``): its
    one level is the head layer, the other names of ``features`` are layers too (exact
    gradients, from the image). ``max_batch``: images per forward pass (D-RISE, deletion and
    feature masks chunk by it)."""

    framework = "outside"
    num_anchors = 1
    local_head = None

    def __init__(
        self,
        model: DenseModel,
        class_names: Sequence[str],
        name: str = "outside",
        max_batch: int = 8,
        device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(model, DenseModel):
            raise TypeError(f"model must be a DenseModel, got {type(model).__name__}")
        if not isinstance(getattr(model, "head_layer", None), str):
            raise ValueError(f"{type(model).__name__}.head_layer must name a feature layer")
        if model.window is not None and model.window < 0:
            raise ValueError(f"{type(model).__name__}.window must be >= 0 or None")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        super().__init__(model, class_names, name, device)
        self.max_batch, self.window = max_batch, model.window
        self.feature_levels = [model.head_layer]

    def _class_names(self, given: Sequence[str] | None) -> list[str]:
        if given is None or len(given) < 2:
            raise ValueError("class_names must name the background (index 0) and >= 1 class")
        return list(given)

    # pre-processing and features ------------------------------------------------------
    def inputs(self, images: torch.Tensor) -> tuple[torch.Tensor, InputGeometry]:
        """``model.preprocess`` of (B, 3, H, W) images in [0, 1], checked."""
        x, geometry = self.model.preprocess(images.to(self.device))
        if tuple(x.shape[-2:]) != geometry.padded:
            raise ValueError(
                f"{type(self.model).__name__}.preprocess: input {tuple(x.shape[-2:])} is not "
                f"the geometry's padded size {geometry.padded}"
            )
        return x, geometry

    def prepare(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[InputGeometry]]:
        """The network input of images of one size (``detect`` passes runs of them)."""
        pixels = [to_chw_tensor(im, f"images[{i}]") for i, im in enumerate(images)]
        if len({p.shape for p in pixels}) > 1:
            raise ValueError(f"{self.name}: one batch input takes images of one size")
        x, geometry = self.inputs(torch.stack(pixels))
        return x, [geometry] * len(pixels)

    def prepare_differentiable(self, images: torch.Tensor, geometry: InputGeometry) -> torch.Tensor:
        return self.inputs(images)[0]

    def repeat_input(self, inputs: torch.Tensor, copies: int) -> torch.Tensor:
        return inputs.expand(copies, -1, -1, -1)

    def features(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """``model.features``, checked to hold the head layer."""
        feats = self.model.features(inputs)
        if self.model.head_layer not in feats:
            raise KeyError(
                f"{type(self.model).__name__}.features gave {', '.join(feats)}; "
                f"head_layer {self.model.head_layer!r} is missing"
            )
        return feats

    @torch.no_grad()
    def detect(
        self, images: Sequence[np.ndarray], batch_size: int = 8, nms: bool = True
    ) -> list[Detections]:
        step = self.batch_limit(batch_size)
        out: list[Detections] = []
        start = 0
        while start < len(images):  # runs of same-size images, at most ``step`` at a time
            stop = start + 1
            while stop < min(start + step, len(images)) and (
                images[stop].shape[:2] == images[start].shape[:2]
            ):
                stop += 1
            x, geometry = self.prepare(images[start:stop])
            out.extend(self.detect_from_features(x, self.features(x), geometry, nms))
            start = stop
        return out

    # the dense adapter ---------------------------------------------------------------
    def head_outputs(self, levels: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [self.model.head(levels[0])]

    def anchors(self, inputs: torch.Tensor, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each cell's rectangle of the network input, split evenly over the cells (the
        model decodes from the cell, not from these)."""
        (h, w), (height, width) = levels[0].shape[-2:], inputs.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        corners = torch.stack((xs * width / w, ys * height / h), -1).reshape(-1, 2)
        step = torch.tensor([width / w, height / h])
        return [torch.cat((corners, corners + step), 1).to(self.device)]

    def unit_outputs(self, cells: dict[str, torch.Tensor], units: DenseUnits):
        probs, boxes = self._decoded(cells, torch.stack((units.y, units.x), 1))
        rows = torch.arange(len(units.y), device=probs.device)
        return probs[rows, units.class_index], boxes, probs

    def _decoded(
        self, cells: dict[str, torch.Tensor], yx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``model.decode``, checked: class_probs (T, K + 1) and boxes (T, 4)."""
        probs, boxes = self.model.decode(cells, yx)
        if probs.shape != (len(yx), self.num_classes) or boxes.shape != (len(yx), 4):
            raise ValueError(
                f"{type(self.model).__name__}.decode must give class_probs (T, "
                f"{self.num_classes}) and boxes (T, 4); got {tuple(probs.shape)} and "
                f"{tuple(boxes.shape)}"
            )
        return probs, boxes

    def postprocess(self, raw, anchors, geometry, index, nms=True) -> Detections:
        """Candidates (cell, class) above ``score_thresh``, the best ``topk_candidates``,
        per-class NMS at ``nms_thresh`` (``nms``), at most ``detections_per_img``."""
        m = self.model
        (level,) = raw
        h, w = next(iter(level.values())).shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        yx = torch.stack((ys.flatten(), xs.flatten()), 1).to(self.device)
        probs, boxes = self._decoded({k: v[index].flatten(1).T for k, v in level.items()}, yx)
        scores = probs[:, 1:].flatten()
        keep = torch.where(scores > m.score_thresh)[0]
        keep = keep[scores[keep].topk(min(m.topk_candidates, len(keep))).indices]
        cell = torch.div(keep, self.num_classes - 1, rounding_mode="floor")
        labels = keep % (self.num_classes - 1) + 1
        height, width = geometry.original
        edge = boxes.new_tensor([width, height, width, height])
        original = geometry.boxes_to_original(boxes[cell])
        clipped = torch.minimum(original.clamp(min=0), edge)
        order = suppress(clipped, scores[keep], labels, m.nms_thresh, m.detections_per_img, nms)
        cell, labels = cell[order], labels[order]
        units = self.level_units(0, cell, w)
        return dense_detections(
            clipped[order], scores[keep[order]], labels, probs[cell], units, geometry.original
        )
