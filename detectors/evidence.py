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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xaibench.detector import Detector, FeatureWindows, GradientMode, WhiteBoxTrace
from xaibench.feature_masks import check_masks, masks_to_layer
from xaibench.geometry import InputGeometry
from xaibench.images import to_rgb_float
from xaibench.registry import DETECTORS
from xaibench.targets import UnitOutputs, target_values
from xaibench.types import Detections, Provenance, Target

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

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H_pad, W_pad) in [0, 1] -> (p1, logits (B, N))."""
        p1 = self.p1(images)
        return p1, self.head(p1)


class EvidenceDetector(Detector):
    """The hand-built detector (see the module docstring for the exact score formula)."""

    def __init__(
        self,
        objects: Sequence[EvidenceObject],
        class_names: Sequence[str] | None = None,
        stride: int = 4,
        name: str = "evidence-toy",
        device: torch.device | str = "cpu",
    ) -> None:
        if not objects:
            raise ValueError("objects must hold at least one EvidenceObject")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        num_classes = max(o.label for o in objects) + 1
        if class_names is None:
            class_names = ["__background__", *(f"class{i}" for i in range(1, num_classes))]
        for k, o in enumerate(objects):
            _check_object(k, o, stride, len(class_names))
        self.objects = list(objects)
        self.class_names = list(class_names)
        self.stride = stride
        self.name = name
        self.device = torch.device(device)
        self.feature_levels = [LEVEL]
        self.net = EvidenceNet(self.objects, stride).to(self.device).eval()

    # geometry -------------------------------------------------------------------------
    def geometry(self, image_size: tuple[int, int]) -> InputGeometry:
        """No resizing; padded at the bottom and right to a multiple of the stride."""
        s = self.stride
        padded = (math.ceil(image_size[0] / s) * s, math.ceil(image_size[1] / s) * s)
        return InputGeometry(image_size, image_size, padded)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> zero-padded network input (B, 3, H_pad, W_pad)."""
        height, width = int(images.shape[-2]), int(images.shape[-1])
        self._check_fits((height, width))
        hp, wp = self.geometry((height, width)).padded
        return F.pad(images, (0, wp - width, 0, hp - height))

    def _check_fits(self, image_size: tuple[int, int]) -> None:
        height, width = image_size
        for k, o in enumerate(self.objects):
            if o.region[2] > width or o.region[3] > height:
                raise ValueError(
                    f"object {k}: evidence region {o.region} (xyxy px) does not fit in an image "
                    f"of {height} x {width} px"
                )

    def _tensor(self, image: np.ndarray, name: str) -> torch.Tensor:
        # to_rgb_float: uint8 and other images / 255, float images in [0, 1] unrounded
        return torch.from_numpy(to_rgb_float(image, name=name)).permute(2, 0, 1)

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

    @torch.no_grad()
    def detect(
        self, images: Sequence[np.ndarray], batch_size: int = 8, nms: bool = True
    ) -> list[Detections]:
        """Every object of every image with its current score; ``nms`` changes nothing (the
        objects are fixed, none is suppressed)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out: list[Detections] = []
        for start in range(0, len(images), batch_size):
            chunk = [
                self._tensor(im, f"images[{start + i}]")
                for i, im in enumerate(images[start : start + batch_size])
            ]
            # same-size images run as one batch; others one at a time
            sizes = {tuple(t.shape[-2:]) for t in chunk}
            groups = [torch.stack(chunk)] if len(sizes) == 1 else [t[None] for t in chunk]
            for batch in groups:
                size = (int(batch.shape[-2]), int(batch.shape[-1]))
                _, logits = self.net(self.to_input(batch.to(self.device)))
                out.extend(self.detections(torch.sigmoid(row), size) for row in logits)
        return out

    def trace(self, image: np.ndarray) -> EvidenceTrace:
        return EvidenceTrace(self, image)

    def torch_module(self) -> nn.Module:
        """``EvidenceNet``: its parameters are the objects' gains and biases."""
        return self.net


class EvidenceTrace(WhiteBoxTrace):
    """One image through the evidence detector. Layers: ``fpn`` and ``p1`` (the same layer)
    and any module of ``EvidenceNet`` as ``module:<name>`` (``module:p1``). Gradients are
    exact autograd in both modes, each window being the whole layer."""

    def __init__(self, detector: EvidenceDetector, image: np.ndarray) -> None:
        self.detector = detector
        pixels = detector._tensor(image, "image")
        self.image_size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        self.geometry = detector.geometry(self.image_size)
        self.input = detector.to_input(pixels[None].to(detector.device))
        with torch.no_grad():
            self.p1, logits = detector.net(self.input)
        self.detections = detector.detections(torch.sigmoid(logits[0]), self.image_size)

    def layer_names(self) -> list[str]:
        return ["fpn", LEVEL, *(f"module:{n}" for n, _ in self.detector.net.named_children())]

    def _layer(self, layer: str, image: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
        """(name, layer activation (1, C, h, w) in the graph, logits (1, N)) for the network
        input ``image`` (1, 3, H_pad, W_pad)."""
        if layer in ("fpn", LEVEL):
            p1, logits = self.detector.net(image)
            return LEVEL, p1, logits
        if not layer.startswith("module:"):
            raise KeyError(f"unknown layer {layer!r}; known: {', '.join(self.layer_names())}")
        path = layer.removeprefix("module:")
        try:
            module = self.detector.net.get_submodule(path)
        except AttributeError as err:
            raise KeyError(f"layer {layer!r}: EvidenceNet has no module {path!r}") from err
        captured: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            _, logits = self.detector.net(image)
        finally:
            handle.remove()
        a = captured[0]
        if not isinstance(a, torch.Tensor) or a.dim() != 4:
            raise ValueError(f"layer {layer!r} does not output a (1, C, h, w) tensor")
        return layer, a, logits

    def _values(self, logits: torch.Tensor, targets: Sequence[Target]) -> torch.Tensor:
        """Target values (T,) from logits (1, N) (``xaibench.targets``)."""
        index = torch.tensor([t.index for t in targets], dtype=torch.long)
        scores = torch.sigmoid(logits[0])[index.to(logits.device)]
        labels = torch.tensor([self.detector.objects[i].label for i in index.tolist()])
        boxes = self.detector.boxes().to(scores)[index.to(scores.device)]
        probs = self.detector.class_probs(scores, labels)
        return target_values(targets, UnitOutputs(scores, boxes, probs))

    def gradients(
        self,
        targets: Sequence[Target],
        layer: str = "fpn",
        mode: GradientMode = "fast",
        margin: int | Callable[[torch.Tensor], int] = 0,
    ) -> list[FeatureWindows]:
        """Exact gradients on the whole layer for both modes; ``margin`` is not needed (the
        window is the whole layer, zero-padded by nothing)."""
        self._check(targets, mode)
        if not targets:
            return []
        with torch.enable_grad():
            # the input requires grad only so that the graph reaches the layer
            name, a, logits = self._layer(layer, self.input.detach().requires_grad_(True))
            values = self._values(logits, targets)
            grads = [
                torch.autograd.grad(values[i], a, retain_graph=True, allow_unused=True)[0]
                for i in range(len(targets))
            ]
        grads = [torch.zeros_like(a) if g is None else g for g in grads]
        act = a.detach()[0]
        layer_size = (int(act.shape[-2]), int(act.shape[-1]))
        det = torch.tensor([t.index for t in targets], dtype=torch.long)
        return [
            FeatureWindows(
                layer=name,
                target_index=torch.arange(len(targets)),
                activations=act[None].expand(len(targets), -1, -1, -1),
                gradients=torch.cat(grads).detach(),
                origin=torch.zeros(len(targets), 2, dtype=torch.long),
                layer_size=layer_size,
                boxes_on_layer=self.geometry.boxes_to_layer(self.detections.boxes[det], layer_size),
                layer_activations=act,
            )
        ]

    def to_image(self, windows: FeatureWindows, maps: torch.Tensor) -> torch.Tensor:
        return self.geometry.windows_to_original(maps, windows.origin, windows.layer_size)

    def target_values(self, targets: Sequence[Target]) -> torch.Tensor:
        self._check(targets)
        with torch.no_grad():
            _, logits = self.detector.net(self.input)
            return self._values(logits, targets)

    @torch.no_grad()
    def detect_with_feature_masks(
        self, masks: torch.Tensor, layer: str = "fpn", batch_size: int = 8
    ) -> list[Detections]:
        if layer not in ("fpn", LEVEL):
            raise KeyError(f"feature masks apply to 'fpn' or {LEVEL!r}; got layer {layer!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        masks = check_masks(masks).to(self.p1.device)
        out: list[Detections] = []
        for start in range(0, masks.shape[0], batch_size):
            on_layer = masks_to_layer(
                masks[start : start + batch_size], self.geometry, tuple(self.p1.shape[-2:])
            )
            logits = self.detector.net.head(self.p1 * on_layer[:, None])
            out.extend(self.detector.detections(torch.sigmoid(r), self.image_size) for r in logits)
        return out

    def provenance_outputs(
        self, images: torch.Tensor, indices: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        indices = self._check_unit_images(images, indices)
        _, logits = self.detector.net(self.detector.to_input(images))
        rows = torch.arange(len(indices))
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        boxes = self.detector.boxes().to(images)[idx]
        return torch.sigmoid(logits[rows, idx]), boxes


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
