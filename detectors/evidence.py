"""A hand-built detector whose evidence is known: the ground truth for explanation tests.

The detector is built from a list of ``EvidenceObject``s. It always returns every object, in
the order given, with its fixed box and a score that depends only on the pixels inside that
object's evidence region:

    e_k     = mean over the pixels (x, y) of region_k of  sum_c colour_k[c] * I[y, x, c] / 255
    score_k = sigmoid(gain_k * e_k + bias_k)

I is the uint8 RGB image (a float image F in [0, 1] counts as I = 255 F, unrounded), c runs
over R, G, B and regions are xyxy pixel boxes on the ``stride`` grid (x1 <= x < x2,
y1 <= y < y2). With the defaults (colour = (1/3, 1/3, 1/3), gain 10, bias -5) a black region
scores sigmoid(-5) = 0.0067, a white one sigmoid(5) = 0.9933.

The network is a single feature layer ``p1`` = average pooling of the image (scaled to
[0, 1], zero-padded at the bottom and right to a multiple of ``stride``) with kernel and
stride ``stride``, followed by the linear evidence read-out and the sigmoid: e_k is exactly
the mean of ``colour_k . p1`` over the region's cells, so white-box methods see the evidence
on ``p1`` and black-box methods see it in the pixels.

Detections (boxes xyxy in original pixels): labels are the objects' labels; class_probs
(N, K) has 1 - score_k in column 0 (background), score_k in column label_k and zeros
elsewhere; objectness is None; provenance: level 0 (``p1``), the ``p1`` cell holding the
region's centre, anchor 0, class_index = label. Box attributes (x1, y1, x2, y2) are constant,
so their gradients and maps are zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from xaibench.detectors.network import Features, NetworkDetector, NetworkTrace

from xaibench.geometry import InputGeometry
from xaibench.images import to_chw_tensor
from xaibench.registry import DETECTORS
from xaibench.types import Detections, Provenance

LEVEL = "p1"


@dataclass(frozen=True)
class EvidenceObject:
    """One object: predicted ``box`` (xyxy, original pixels, fixed), ``label`` (>= 1; 0 is the
    background), evidence ``region`` (xyxy pixels on the detector's stride grid) and the
    read-out score = sigmoid(gain * e + bias), e = mean of colour . RGB / 255 over the region."""

    box: tuple[float, float, float, float]
    label: int
    region: tuple[int, int, int, int]
    gain: float = 10.0
    bias: float = -5.0
    colour: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)


class EvidenceNet(nn.Module):
    """p1 = AvgPool(stride) of the image; logits_k = gain_k * <read-out_k, p1> + bias_k."""

    def __init__(self, objects: Sequence[EvidenceObject], stride: int) -> None:
        super().__init__()
        self.objects = list(objects)
        self.stride = stride
        self.p1 = nn.AvgPool2d(kernel_size=stride, stride=stride)
        # the read-out's weights: parameters (frozen) so that parameter randomisation reaches them
        self.gain = nn.Parameter(torch.tensor([o.gain for o in objects]), requires_grad=False)
        self.bias = nn.Parameter(torch.tensor([o.bias for o in objects]), requires_grad=False)

    def readout(self, layer_size: tuple[int, int]) -> torch.Tensor:
        """(N, 3, h, w): colour_k / (cells of region_k) on the region's cells, else 0."""
        h, w = layer_size
        out = torch.zeros(len(self.objects), 3, h, w, device=self.gain.device)
        for k, o in enumerate(self.objects):
            x1, y1, x2, y2 = (v // self.stride for v in o.region)
            cells = (y2 - y1) * (x2 - x1)
            colour = torch.tensor(o.colour, device=out.device)[:, None, None]
            out[k, :, y1:y2, x1:x2] = colour / cells
        return out

    def head(self, p1: torch.Tensor) -> torch.Tensor:
        """Logits (B, N) from the layer (B, 3, h, w)."""
        weights = self.readout((p1.shape[-2], p1.shape[-1]))
        return self.gain * torch.einsum("bchw,nchw->bn", p1, weights) + self.bias


class EvidenceDetector(NetworkDetector):
    """The hand-built detector (see the module docstring for the exact score formula), on the
    framework adapter of ``detectors/network.py``: its network input is the image in [0, 1]
    zero-padded to the stride, its one feature level ``p1``, its head the read-out."""

    framework = "evidence-toy"

    def __init__(
        self,
        objects: Sequence[EvidenceObject],
        class_names: Sequence[str] | None = None,
        stride: int = 4,
        name: str | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if not objects:
            raise ValueError("objects must hold at least one EvidenceObject")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.objects = list(objects)
        self.stride = stride
        self.feature_levels = [LEVEL]
        super().__init__(EvidenceNet(self.objects, stride), class_names, name, device)

    def _class_names(self, given: Sequence[str] | None) -> list[str]:
        """The names given, else ``class<i>`` up to the largest object label; the background
        first."""
        num_classes = max(o.label for o in self.objects) + 1
        default = ["__background__", *(f"class{i}" for i in range(1, num_classes))]
        names = list(given) if given is not None else default
        for k, o in enumerate(self.objects):
            _check_object(k, o, self.stride, len(names))
        return names

    @property
    def net(self) -> EvidenceNet:
        """The network (``model``): its parameters are the objects' gains and biases."""
        return self.model

    # adapter ------------------------------------------------------------------------
    def prepare(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[InputGeometry]]:
        """No resizing; each image zero-padded at the bottom and right to a multiple of the
        stride, and to the batch's largest (regions are fixed cells from the top left)."""
        tensors = [to_chw_tensor(image, f"images[{i}]") for i, image in enumerate(images)]
        for t in tensors:
            self._check_fits((int(t.shape[-2]), int(t.shape[-1])))
        s = self.stride
        padded = tuple(math.ceil(max(int(t.shape[d]) for t in tensors) / s) * s for d in (-2, -1))
        batch = torch.stack([_pad_to(t, padded) for t in tensors]).to(self.device)
        sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
        return batch, [InputGeometry(size, size, padded) for size in sizes]

    def prepare_differentiable(self, images: torch.Tensor, geometry: InputGeometry) -> torch.Tensor:
        return _pad_to(images, geometry.padded)

    def repeat_input(self, inputs: torch.Tensor, copies: int) -> torch.Tensor:
        return inputs.expand(copies, -1, -1, -1)

    def features(self, inputs: torch.Tensor) -> Features:
        return {LEVEL: self.model.p1(inputs)}

    def detect_from_features(
        self, inputs: Any, features: Features, geometry: list[InputGeometry], nms: bool = True
    ) -> list[Detections]:
        """Every object with its current score; ``nms`` changes nothing (the objects are
        fixed, none is suppressed)."""
        logits = self.model.head(features[LEVEL])
        scores = torch.sigmoid(logits)
        return [self.detections(r, g.original) for r, g in zip(scores, geometry, strict=True)]

    def trace(self, image: np.ndarray) -> EvidenceTrace:
        return EvidenceTrace(self, image)

    def _check_fits(self, image_size: tuple[int, int]) -> None:
        height, width = image_size
        for k, o in enumerate(self.objects):
            if o.region[2] > width or o.region[3] > height:
                raise ValueError(
                    f"object {k}: evidence region {o.region} (xyxy px) does not fit in an image "
                    f"of {height} x {width} px"
                )

    # outputs --------------------------------------------------------------------------
    def detections(self, scores: torch.Tensor, image_size: tuple[int, int]) -> Detections:
        """Detections of all objects given their scores (N,)."""
        n = len(self.objects)
        labels = torch.tensor([o.label for o in self.objects], dtype=torch.long)
        scores = scores.detach().float().cpu()
        probs = self.class_probs(scores, labels)
        cy = torch.tensor([(o.region[1] + o.region[3]) / 2 for o in self.objects])
        cx = torch.tensor([(o.region[0] + o.region[2]) / 2 for o in self.objects])
        return Detections(
            boxes=self.boxes(),
            scores=scores,
            labels=labels,
            class_probs=probs,
            provenance=Provenance(
                level=torch.zeros(n, dtype=torch.long),
                y=torch.div(cy, self.stride, rounding_mode="floor").long(),
                x=torch.div(cx, self.stride, rounding_mode="floor").long(),
                anchor=torch.zeros(n, dtype=torch.long),
                class_index=labels,
            ),
            image_size=image_size,
        )

    def class_probs(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, C) class distributions (differentiable in ``scores`` (N,)): 1 - score in
        column 0 (background), the score in the object's label's column, 0 elsewhere."""
        columns = F.one_hot(labels.to(scores.device), self.num_classes).to(scores)
        background = F.one_hot(torch.zeros_like(labels), self.num_classes).to(scores)
        return columns * scores[:, None] + background * (1 - scores)[:, None]

    def boxes(self) -> torch.Tensor:
        """The fixed predicted boxes (N, 4), xyxy original pixels."""
        return torch.tensor([o.box for o in self.objects], dtype=torch.float32)


class EvidenceTrace(NetworkTrace):
    """One image through the evidence detector. Layers: ``fpn`` and ``p1`` (the same layer)
    and any module of ``EvidenceNet`` as ``module:<name>`` (``module:p1``). Gradients are
    exact autograd in both modes, each window being the whole layer."""

    detector: EvidenceDetector

    def __init__(self, detector: EvidenceDetector, image: np.ndarray) -> None:
        super().__init__(detector, image)
        self.p1 = self.features[LEVEL]
        with torch.no_grad():
            (self.detections,) = detector.detect_from_features(
                self.image_list, self.features, [self.geometry]
            )

    def _values(self, features, targets, batch=None):
        index = torch.tensor([t.index for t in targets], dtype=torch.long)
        rows = torch.tensor(batch if batch is not None else [0] * len(targets))
        logits = self.detector.model.head(features[LEVEL])
        scores = torch.sigmoid(logits[rows, index])
        labels = torch.tensor([self.detector.objects[i].label for i in index.tolist()])
        boxes = self.detector.boxes().to(scores)[index]
        probs = self.detector.class_probs(scores, labels)
        return self._unit_targets(targets, scores, boxes, probs)

    def detect_with_feature_masks(
        self, masks: torch.Tensor, layer: str = "fpn", batch_size: int = 8
    ) -> list[Detections]:
        if not self._is_level(layer):
            raise KeyError(f"feature masks apply to 'fpn' or {LEVEL!r}; got layer {layer!r}")
        return super().detect_with_feature_masks(masks, layer, batch_size)


def _pad_to(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``images`` (..., H, W) zero-padded at the bottom and right to ``size`` (H_pad, W_pad)."""
    return F.pad(images, (0, size[1] - images.shape[-1], 0, size[0] - images.shape[-2]))


def _check_object(k: int, o: EvidenceObject, stride: int, num_classes: int) -> None:
    x1, y1, x2, y2 = o.region
    if not all(isinstance(v, int) for v in o.region) or any(v % stride for v in o.region):
        raise ValueError(
            f"object {k}: evidence region {o.region} must be integer pixels on the "
            f"stride-{stride} grid (multiples of {stride})"
        )
    if not (0 <= x1 < x2 and 0 <= y1 < y2):
        raise ValueError(
            f"object {k}: evidence region {o.region} must satisfy 0 <= x1 < x2, y1 < y2"
        )
    bx1, by1, bx2, by2 = o.box
    if not (bx1 < bx2 and by1 < by2):
        raise ValueError(f"object {k}: box {o.box} must satisfy x1 < x2 and y1 < y2 (xyxy px)")
    if not 1 <= o.label < num_classes:
        raise ValueError(
            f"object {k}: label {o.label} must lie in 1..{num_classes - 1} (0 is the background)"
        )
    if len(o.colour) != 3:
        raise ValueError(f"object {k}: colour must have 3 channel weights, got {o.colour}")


TOY_OBJECTS: tuple[EvidenceObject, ...] = (
    EvidenceObject(box=(16, 16, 72, 72), label=1, region=(24, 24, 64, 64)),
    EvidenceObject(box=(88, 16, 144, 72), label=1, region=(96, 24, 136, 64)),
    EvidenceObject(box=(40, 88, 120, 152), label=2, region=(64, 104, 96, 136)),
)
"""The registered toy layout for 160 x 160 images: two objects of class 1 side by side and one
of class 2 below, each with its evidence in the middle of its box."""


def evidence_image(
    objects: Sequence[EvidenceObject] = TOY_OBJECTS,
    size: tuple[int, int] = (160, 160),
    background: int = 30,
    foreground: int = 230,
    noise: float = 8.0,
    seed: int = 0,
) -> np.ndarray:
    """A uint8 RGB (H, W, 3) scene for ``objects``: a dark noisy background with each evidence
    region filled with ``foreground`` (so every object scores high)."""
    rng = np.random.default_rng(seed)
    image = background + rng.normal(0.0, noise, (*size, 3))
    for o in objects:
        x1, y1, x2, y2 = o.region
        image[y1:y2, x1:x2] = foreground + rng.normal(0.0, noise, (y2 - y1, x2 - x1, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


@DETECTORS.register("evidence-toy")
def build_evidence_toy(
    objects: Sequence[EvidenceObject] | None = None, stride: int = 4, **kwargs: Any
) -> EvidenceDetector:
    """The evidence detector; without ``objects``, the ``TOY_OBJECTS`` layout (160 x 160 px,
    classes ``object``/``other``; draw a matching scene with ``evidence_image()``)."""
    if objects is None:
        objects = TOY_OBJECTS
        kwargs.setdefault("class_names", ["__background__", "object", "other"])
    return EvidenceDetector(objects, stride=stride, **kwargs)
