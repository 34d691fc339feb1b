"""Join a detector the harness has never seen, in a few lines (README, "A new detector").

Two ways in:

- ``PredictDetector``: black box only. A ``predict(images)`` function returning, per image,
  ``(boxes, scores, labels, class_probs)`` becomes a ``Detector``: D-RISE, deletion,
  insertion and the map metrics work.
- ``DenseModel`` + ``DenseDetector``: white box too, for a dense (one-stage) detector that
  predicts at every cell of one feature layer (the *head layer*) a score per class and a box.
  Subclass ``DenseModel`` (an ``nn.Module``, so its parameters are the ones sanity checks
  re-initialise, in its registration order) with ``features``, ``head`` and ``decode``;
  ODAM, Grad-CAM, Grad-CAM++, BBAM, feature-space D-RISE and the sanity checks work, through
  one autograd backward per target (``mode="exact"``), and through one backward for all
  targets where the model declares its head's ``window`` (``mode="fast"``).

Conventions (as for every wrapper of the harness):

- labels are 1..K, 0 is the background; ``class_names[0]`` names the background.
- ``class_probs`` (N, K + 1): column k is the probability of label k, column 0 the background
  (0 for a sigmoid head that has none); D-RISE compares these rows.
- boxes are xyxy in pixels of the original image; detections are clipped to the image,
  targets (``x1``..``y2``, ``xaibench.targets``) read the decoded box unclipped.
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
from torchvision.ops import batched_nms

from xaibench.detector import Detector, FeatureWindows, GradientMode, WhiteBoxTrace
from xaibench.feature_masks import check_masks, masks_to_layer
from xaibench.geometry import InputGeometry
from xaibench.images import to_rgb_float
from xaibench.targets import UnitOutputs, target_values
from xaibench.types import Detections, Provenance, Target, checked_detections

Prediction = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""One image's ``(boxes (N, 4) xyxy original pixels, scores (N,), labels (N,) in 1..K,
class_probs (N, K + 1))``."""

PREDICTION_LAYER = "fpn"
"""The layer name every trace reads as "the layer that produced each prediction" (the methods'
default); a ``DenseDetector`` resolves it to its head layer."""


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
    - ``decode(cells, yx, geometry, layer_size)``: from each row's head outputs at its cell
      ({name: (T, C_k)}), the cell ``yx`` (T, 2) (row, col) on the head layer of
      ``layer_size`` (h, w) and the image's ``InputGeometry``, its ``class_probs`` (T, K + 1)
      (column 0 the background) and decoded box (T, 4) xyxy in original pixels, unclipped.
      It must be differentiable in ``cells``.

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
        self,
        cells: dict[str, torch.Tensor],
        yx: torch.Tensor,
        geometry: InputGeometry,
        layer_size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(class_probs (T, K + 1), boxes (T, 4) xyxy original pixels) of head outputs at
        cells ``yx`` (T, 2)."""

    def preprocess(self, images: torch.Tensor) -> tuple[torch.Tensor, InputGeometry]:
        """(B, 3, H, W) RGB in [0, 1] -> network input (B, 3, H_pad, W_pad) and geometry;
        differentiable (BBAM optimises through it)."""
        height, width = int(images.shape[-2]), int(images.shape[-1])
        s = self.input_stride
        padded = (math.ceil(height / s) * s, math.ceil(width / s) * s)
        x = F.pad(images, (0, padded[1] - width, 0, padded[0] - height))
        return x, InputGeometry((height, width), (height, width), padded)


class DenseDetector(Detector):
    """A ``DenseModel`` behind the harness's two views (conventions: module docstring).
    ``max_batch``: images per forward pass (D-RISE, deletion and feature masks chunk by it)."""

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
        if len(class_names) < 2:
            raise ValueError("class_names must name the background (index 0) and >= 1 class")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.class_names = list(class_names)
        self.name, self.max_batch = name, max_batch
        self.feature_levels = [model.head_layer]

    def inputs(self, images: torch.Tensor) -> tuple[torch.Tensor, InputGeometry]:
        """``model.preprocess`` of (B, 3, H, W) images in [0, 1], checked."""
        x, geometry = self.model.preprocess(images.to(self.device))
        if tuple(x.shape[-2:]) != geometry.padded:
            raise ValueError(
                f"{type(self.model).__name__}.preprocess: input {tuple(x.shape[-2:])} is not "
                f"the geometry's padded size {geometry.padded}"
            )
        return x, geometry

    def layers(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``model.features(x)``, checked to hold the head layer."""
        feats = self.model.features(x)
        if self.model.head_layer not in feats:
            raise KeyError(
                f"{type(self.model).__name__}.features gave {', '.join(feats)}; "
                f"head_layer {self.model.head_layer!r} is missing"
            )
        return feats

    def head_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The head's outputs {name: (B, C_k, h, w)} of the network input ``x``."""
        return self.model.head(self.layers(x)[self.model.head_layer])

    def outputs_at(
        self,
        raw: dict[str, torch.Tensor],
        at: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        yx: torch.Tensor,
        geometry: InputGeometry,
        layer_size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded (class_probs, boxes) of head outputs ``raw`` ({name: (B, C_k, h_r, w_r)})
        read at ``at`` = (image, row, col) (T,) each, for the head layer's cells ``yx``
        (T, 2) (``raw`` may be crops of the layer, read at the cells' places in them)."""
        batch, row, col = at
        cells = {k: v[batch, :, row, col] for k, v in raw.items()}
        probs, boxes = self.model.decode(cells, yx, geometry, layer_size)
        if probs.shape != (len(yx), self.num_classes) or boxes.shape != (len(yx), 4):
            raise ValueError(
                f"{type(self.model).__name__}.decode must give class_probs (T, "
                f"{self.num_classes}) and boxes (T, 4); got {tuple(probs.shape)} and "
                f"{tuple(boxes.shape)}"
            )
        return probs, boxes

    def postprocess(
        self, raw: dict[str, torch.Tensor], geometry: InputGeometry, nms: bool = True
    ) -> list[Detections]:
        """Detections of each image of head outputs ``raw`` ({name: (B, C_k, h, w)})."""
        m = self.model
        b, _, h, w = next(iter(raw.values())).shape
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        yx = torch.stack((ys.flatten(), xs.flatten()), 1).to(self.device)
        out = []
        for i in range(b):
            batch = torch.full((h * w,), i, dtype=torch.long, device=self.device)
            probs, boxes = self.outputs_at(raw, (batch, yx[:, 0], yx[:, 1]), yx, geometry, (h, w))
            scores = probs[:, 1:].flatten()
            keep = torch.where(scores > m.score_thresh)[0]
            keep = keep[scores[keep].topk(min(m.topk_candidates, len(keep))).indices]
            cell = torch.div(keep, self.num_classes - 1, rounding_mode="floor")
            labels = keep % (self.num_classes - 1) + 1
            height, width = geometry.original
            edge = boxes.new_tensor([width, height, width, height])
            clipped = torch.minimum(boxes[cell].clamp(min=0), edge)  # to the original image
            order = torch.arange(len(keep), device=self.device)
            if nms:
                order = batched_nms(clipped, scores[keep], labels, m.nms_thresh)
                order = order[: m.detections_per_img]
            cell, labels, chosen = cell[order], labels[order], keep[order]
            out.append(
                Detections(
                    boxes=clipped[order],
                    scores=scores[chosen],
                    labels=labels,
                    class_probs=probs[cell],
                    provenance=Provenance(
                        level=torch.zeros_like(labels),
                        y=yx[cell, 0],
                        x=yx[cell, 1],
                        anchor=torch.zeros_like(labels),
                        class_index=labels,
                    ),
                    image_size=geometry.original,
                )
            )
        return out

    @torch.no_grad()
    def detect(
        self, images: Sequence[np.ndarray], batch_size: int = 8, nms: bool = True
    ) -> list[Detections]:
        step = self.batch_limit(batch_size)
        pixels = [torch.from_numpy(im).permute(2, 0, 1) for im in _float_images(images)]
        out: list[Detections] = []
        start = 0
        while start < len(pixels):  # runs of same-size images, at most ``step`` at a time
            stop = start + 1
            while stop < min(start + step, len(pixels)) and (
                pixels[stop].shape == pixels[start].shape
            ):
                stop += 1
            x, geometry = self.inputs(torch.stack(pixels[start:stop]))
            out.extend(self.postprocess(self.head_outputs(x), geometry, nms))
            start = stop
        return out

    def trace(self, image: np.ndarray) -> DenseTrace:
        return DenseTrace(self, image)


class DenseTrace(WhiteBoxTrace):
    """One image through a ``DenseDetector``. Layers: ``fpn`` (= the head layer, where every
    prediction comes from) and the names of ``DenseModel.features``. Exact mode: one autograd
    backward per target to the whole layer; fast mode (head layer, ``window`` declared): all
    targets back-propagated at once through the head on crops of (2(R + margin) + 1)^2 cells
    around their cells, kept inside the layer."""

    def __init__(self, detector: DenseDetector, image: np.ndarray) -> None:
        self.detector = detector
        (pixels,) = _float_images([image])
        self.pixels = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(detector.device)
        with torch.no_grad():
            self.input, self.geometry = detector.inputs(self.pixels)
            self.layers = detector.layers(self.input)
            self.raw = detector.model.head(self.layers[detector.model.head_layer])
            (self.detections,) = detector.postprocess(self.raw, self.geometry)
        self.image_size = self.geometry.original

    def layer_names(self) -> list[str]:
        return [PREDICTION_LAYER, *self.layers]

    def _layer(self, layer: str) -> str:
        name = self.detector.model.head_layer if layer == PREDICTION_LAYER else layer
        if name not in self.layers:
            raise KeyError(f"unknown layer {layer!r}; known: {', '.join(self.layer_names())}")
        return name

    def _outputs(
        self,
        raw: dict[str, torch.Tensor],
        targets: Sequence[Target],
        batch: torch.Tensor | None = None,
        origin: torch.Tensor | None = None,
    ) -> UnitOutputs:
        """Target t's unit outputs from head outputs ``raw``: on image ``batch[t]`` (default
        0), or, where ``raw`` holds one crop per target with its top-left cell at
        ``origin[t]`` (T, 2), on crop t."""
        p = self.detections.provenance
        det = torch.tensor([t.index for t in targets], dtype=torch.long)
        device = self.detector.device
        yx = torch.stack((p.y[det], p.x[det]), 1).to(device)
        cls = p.class_index[det].to(device)
        rows = torch.arange(len(targets), device=device)
        if batch is None:
            batch = rows if origin is not None else torch.zeros_like(rows)
        local = yx if origin is None else yx - origin.to(device)
        size = tuple(self.layers[self.detector.model.head_layer].shape[-2:])
        at = (batch.to(device), local[:, 0], local[:, 1])
        probs, boxes = self.detector.outputs_at(raw, at, yx, self.geometry, size)
        return UnitOutputs(probs[rows, cls], boxes, probs)

    def target_values(self, targets: Sequence[Target]) -> torch.Tensor:
        self._check(targets)
        return target_values(targets, self._outputs(self.raw, targets))

    def gradients(
        self,
        targets: Sequence[Target],
        layer: str = PREDICTION_LAYER,
        mode: GradientMode = "fast",
        margin: int | Callable[[torch.Tensor], int] = 0,
    ) -> list[FeatureWindows]:
        self._check(targets, mode)
        name = self._layer(layer)
        if not targets:
            return []
        model = self.detector.model
        if mode == "fast" and name == model.head_layer and model.window is not None:
            return [self._fast(targets, name, margin)]
        return [self._exact(targets, name)]

    def _exact(self, targets: Sequence[Target], name: str) -> FeatureWindows:
        with torch.enable_grad():
            layers = self.detector.layers(self.input.detach().requires_grad_(True))
            raw = self.detector.model.head(layers[self.detector.model.head_layer])
            values = target_values(targets, self._outputs(raw, targets))
            a = layers[name]
            grads = [
                torch.autograd.grad(values[i], a, retain_graph=True, allow_unused=True)[0]
                for i in range(len(targets))
            ]
        grads = [torch.zeros_like(a) if g is None else g for g in grads]
        act = a.detach()[0]
        origin = torch.zeros(len(targets), 2, dtype=torch.long)
        windows = act[None].expand(len(targets), -1, -1, -1)
        return self._windows(targets, name, act, windows, torch.cat(grads), origin)

    def _fast(
        self,
        targets: Sequence[Target],
        name: str,
        margin: int | Callable[[torch.Tensor], int],
    ) -> FeatureWindows:
        act = self.layers[name][0]
        h, w = act.shape[-2:]
        if callable(margin):
            margin = margin(self.geometry.boxes_to_layer(self._boxes(targets), (h, w)))
        reach = int(self.detector.model.window) + int(margin)
        kh, kw = min(2 * reach + 1, h), min(2 * reach + 1, w)
        p = self.detections.provenance
        det = [t.index for t in targets]
        y, x = p.y[det].to(act.device), p.x[det].to(act.device)
        y0 = (y - reach).clamp(min=0).clamp(max=h - kh)
        x0 = (x - reach).clamp(min=0).clamp(max=w - kw)
        rows = (y0[:, None] + torch.arange(kh, device=y0.device))[:, :, None]
        cols = (x0[:, None] + torch.arange(kw, device=x0.device))[:, None, :]
        crops = act[:, rows, cols].transpose(0, 1).contiguous().requires_grad_(True)
        with torch.enable_grad():
            raw = self.detector.model.head(crops)  # crop t: target t's window
            origin = torch.stack((y0, x0), 1)
            values = target_values(targets, self._outputs(raw, targets, origin=origin))
            (grads,) = torch.autograd.grad(values.sum(), crops)
        return self._windows(targets, name, act, crops.detach(), grads, origin.cpu())

    def _boxes(self, targets: Sequence[Target]) -> torch.Tensor:
        return self.detections.boxes[[t.index for t in targets]]

    def _windows(self, targets, name, act, windows, grads, origin) -> FeatureWindows:
        layer_size = (int(act.shape[-2]), int(act.shape[-1]))
        return FeatureWindows(
            layer=name,
            target_index=torch.arange(len(targets)),
            activations=windows,
            gradients=grads.detach(),
            origin=origin,
            layer_size=layer_size,
            boxes_on_layer=self.geometry.boxes_to_layer(self._boxes(targets), layer_size),
            layer_activations=act,
        )

    def to_image(self, windows: FeatureWindows, maps: torch.Tensor) -> torch.Tensor:
        return self.geometry.windows_to_original(maps, windows.origin, windows.layer_size)

    @torch.no_grad()
    def detect_with_feature_masks(
        self, masks: torch.Tensor, layer: str = PREDICTION_LAYER, batch_size: int = 8
    ) -> list[Detections]:
        """The head layer (``fpn`` or its name) times each mask, the head and
        post-processing re-run; other layers cannot be masked (the model gives no way to
        re-run the network from them)."""
        name = self._layer(layer)
        if name != self.detector.model.head_layer:
            raise KeyError(
                f"feature masks apply to the head layer {self.detector.model.head_layer!r} "
                f"(or {PREDICTION_LAYER!r}); got layer {layer!r}"
            )
        step = self.detector.batch_limit(batch_size)
        masks = check_masks(masks).to(self.detector.device)
        act = self.layers[name]
        out: list[Detections] = []
        for start in range(0, masks.shape[0], step):
            on_layer = masks_to_layer(masks[start : start + step], self.geometry, act.shape[-2:])
            raw = self.detector.model.head(act * on_layer[:, None])
            out.extend(self.detector.postprocess(raw, self.geometry))
        return out

    def provenance_outputs(
        self, images: torch.Tensor, indices: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``preprocess``, features, head and decode on ``images`` (B, 3, H, W) in [0, 1],
        read at detection ``indices[b]``'s cell and class on image b (differentiable)."""
        targets = [Target(i) for i in self._check_unit_images(images, indices)]
        x, _ = self.detector.inputs(images)
        raw = self.detector.head_outputs(x)
        outputs = self._outputs(raw, targets, batch=torch.arange(len(targets)))
        return outputs.score, outputs.box
