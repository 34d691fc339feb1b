"""BBAM (Lee, Yi, Shin & Yoon, CVPR 2021): the smallest part of the image from which the
detector still gives the same box and score for a detection.

For a detection with box b0 and score s0 (read at its own output unit: the same cell and
anchor of a one-stage head, the same fixed proposal of a two-stage one), a low-resolution
mask m in [0, 1] is optimised with Adam to minimise

    l1 * sum|m| + tv * TV(m) + mean|delta(b, b0)| / 2 + |s - s0| / 2

where b, s are that unit's box and score on the perturbed image I * M + P * (1 - M), M is m
upsampled bilinearly to the image (``align_corners=True``, as ``UpsamplingBilinear2d`` in the
reference code), P the perturbation (Gaussian blur of I, or a constant colour), and m is
clamped to [0, 1] after every step. The map is the final M: float32 (H, W) in [0, 1].

Defaults, from the reference implementation (github.com/jbeomlee93/BBAM,
``tools/BBAM/BBAM_FRCNN.py`` and ``tools/BBAM/BBAM_utils.py``):

- ``lr=0.02`` (``--lr_mask``), ``iterations=300`` (``--max_iter_mask``), Adam;
- ``l1=0.07`` (``l1_coeff``), ``tv=1e-3`` (``--tv_coeff``), ``tv_beta=3`` (``--tv_beta``);
  TV sums |difference|^beta over vertical, horizontal and both diagonal neighbours, each
  diagonal counted twice, as the reference's ``tv_norm(mask, 3, diagonal=True, sum=True)``;
- mask stride ``16 + 48 * sqrt(box area / image area)`` px (``stride_base``,
  ``stride_scale``), a mask of int(H / stride) x int(W / stride) cells, initialised to 1 on the
  predicted box's cells (int(coordinate / stride)) and 0 elsewhere;
- preservation: the L1 distance of the box regression halved and of the class probability
  halved (``torch.abs(before_reg - after_reg).mean() / 2 + torch.abs(p0 - p) / 2``);
- ``perturbation="blur"``: the reference's blur option, ``cv2.GaussianBlur`` 11 x 11,
  sigma 5 (``blur_kernel``, ``blur_sigma``), as DESIGN.md defines BBAM; the reference script's
  default ``constant`` (zero in the mean-subtracted input, i.e. the pixel mean
  (122.77, 115.95, 102.98) RGB of maskrcnn-benchmark) is ``perturbation="constant"``, ``fill``.

Here the detector is any wrapper with ``WhiteBoxTrace.provenance_outputs``, so the box term
compares decoded boxes: delta(b, b0) = (10 (cx - cx0) / w0, 10 (cy - cy0) / h0,
5 log(w / w0), 5 log(h / h0)), the standard (10, 10, 5, 5) box coding of b relative to b0.
For Faster R-CNN this equals the reference's difference of regression deltas, except that the
centre terms divide by the box's size instead of the proposal's. The stride is measured in
original-image pixels (the reference measures it on the detector's resized input).

Several detections of an image are optimised together, one mask each, as one batch through
the detector; each loss depends on its own mask only and Adam is element-wise, so this equals
optimising them one at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from xaibench.detector import Detector, WhiteBoxTrace
from xaibench.images import to_rgb_uint8
from xaibench.method import ExplanationMethod, detection_indices
from xaibench.progress import progress_bar
from xaibench.registry import METHODS
from xaibench.types import Saliency, Target

Perturbation = Literal["blur", "constant"]
REFERENCE_PIXEL_MEAN = (122.7717, 115.9465, 102.9801)
"""maskrcnn-benchmark's PIXEL_MEAN (BGR 102.98, 115.95, 122.77) as RGB, 0-255."""


def total_variation(mask: torch.Tensor, beta: float = 3.0) -> torch.Tensor:
    """Sum of |difference|^beta over vertical, horizontal and (twice) diagonal neighbours of
    a mask (h, w), as the reference's ``tv_norm(..., diagonal=True, sum=True)``."""

    def term(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs().pow(beta).sum()

    return (
        term(mask[1:, :], mask[:-1, :])
        + term(mask[:, 1:], mask[:, :-1])
        + 2 * term(mask[1:, 1:], mask[:-1, :-1])
        + 2 * term(mask[1:, :-1], mask[:-1, 1:])
    )


def box_deltas(boxes: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(N, 4) codes (dx, dy, dw, dh) of ``boxes`` relative to ``reference`` (both xyxy),
    weights (10, 10, 5, 5): zero where the boxes agree."""
    size = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-3)
    size0 = (reference[:, 2:] - reference[:, :2]).clamp(min=1e-3)
    centre = (boxes[:, 2:] + boxes[:, :2]) / 2
    centre0 = (reference[:, 2:] + reference[:, :2]) / 2
    return torch.cat((10 * (centre - centre0) / size0, 5 * torch.log(size / size0)), dim=1)


@METHODS.register("bbam")
class BBAM(ExplanationMethod):
    """BBAM maps; the module docstring gives the loss and where each default comes from.
    ``batch_size`` detections are optimised together; ``progress`` shows a progress bar."""

    name = "bbam"
    access = "white-box"

    def __init__(
        self,
        iterations: int = 300,
        lr: float = 0.02,
        l1: float = 0.07,
        tv: float = 1e-3,
        tv_beta: float = 3.0,
        stride_base: float = 16.0,
        stride_scale: float = 48.0,
        perturbation: Perturbation = "blur",
        blur_kernel: int = 11,
        blur_sigma: float = 5.0,
        fill: Sequence[float] = REFERENCE_PIXEL_MEAN,
        batch_size: int = 8,
        progress: bool = True,
    ) -> None:
        if iterations < 0 or batch_size < 1:
            raise ValueError(
                f"iterations must be >= 0 and batch_size >= 1; got {iterations}, {batch_size}"
            )
        if perturbation not in ("blur", "constant"):
            raise ValueError(f"perturbation must be 'blur' or 'constant', got {perturbation!r}")
        if blur_kernel < 1 or blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be an odd number >= 1, got {blur_kernel}")
        if len(fill) != 3:
            raise ValueError(f"fill must be an RGB colour (3 values, 0-255), got {fill}")
        self.iterations, self.lr, self.l1, self.tv, self.tv_beta = iterations, lr, l1, tv, tv_beta
        self.stride_base, self.stride_scale = stride_base, stride_scale
        self.perturbation = perturbation
        self.blur_kernel, self.blur_sigma = blur_kernel, blur_sigma
        self.fill = tuple(float(v) for v in fill)
        self.batch_size = batch_size
        self.progress = progress

    def params(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "lr": self.lr,
            "l1": self.l1,
            "tv": self.tv,
            "tv_beta": self.tv_beta,
            "stride_base": self.stride_base,
            "stride_scale": self.stride_scale,
            "perturbation": self.perturbation,
            "blur_kernel": self.blur_kernel,
            "blur_sigma": self.blur_sigma,
            "fill": list(self.fill),
            "batch_size": self.batch_size,
        }

    def background(self, pixels: torch.Tensor) -> torch.Tensor:
        """The perturbation P (3, H, W) in [0, 1] for the image ``pixels`` (3, H, W)."""
        if self.perturbation == "blur":
            k, s = self.blur_kernel, self.blur_sigma
            return gaussian_blur(pixels[None], [k, k], [s, s])[0]
        colour = torch.tensor(self.fill, device=pixels.device) / 255
        return colour[:, None, None].expand_as(pixels)

    def initial_mask(self, box: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """The low-resolution mask (h, w) of a box (xyxy, original px): 1 on its cells."""
        height, width = image_size
        x1, y1, x2, y2 = box.tolist()
        area = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
        stride = self.stride_base + self.stride_scale * math.sqrt(area / (height * width))
        h, w = max(int(height / stride), 1), max(int(width / stride), 1)
        mask = torch.zeros(h, w)
        r0, c0 = min(max(int(y1 / stride), 0), h - 1), min(max(int(x1 / stride), 0), w - 1)
        r1, c1 = max(min(int(y2 / stride), h), r0 + 1), max(min(int(x2 / stride), w), c0 + 1)
        mask[r0:r1, c0:c1] = 1
        return mask

    def explain(
        self,
        detector: Detector,
        image: np.ndarray,
        targets: Sequence[Target],
        trace: WhiteBoxTrace | None = None,
    ) -> list[Saliency]:
        start = time.perf_counter()
        image = to_rgb_uint8(image, name="image")
        trace = trace if trace is not None else detector.trace(image)
        indices = detection_indices(targets, len(trace.detections))
        pixels = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 255
        pixels = pixels.to(detector.device)
        background = self.background(pixels)
        maps: dict[int, torch.Tensor] = {}
        batch = detector.batch_limit(self.batch_size)
        for first in range(0, len(indices), batch):
            chunk = indices[first : first + batch]
            for i, m in zip(chunk, self.optimise(trace, pixels, background, chunk), strict=True):
                maps[i] = m
        return self.saliencies(targets, [maps[t.index].numpy() for t in targets], start)

    def optimise(
        self,
        trace: WhiteBoxTrace,
        pixels: torch.Tensor,
        background: torch.Tensor,
        indices: list[int],
    ) -> list[torch.Tensor]:
        """Optimise the masks of detections ``indices`` together; their final maps (H, W)."""
        size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        with torch.no_grad():
            batch = pixels[None].expand(len(indices), -1, -1, -1)
            score0, box0 = trace.provenance_outputs(batch, indices)
        boxes = trace.detections.boxes[indices].float().cpu()
        masks = [self.initial_mask(b, size).to(pixels.device).requires_grad_(True) for b in boxes]
        optimizer = torch.optim.Adam(masks, lr=self.lr)
        label = f"{self.name} detections {indices[0]}-{indices[-1]}"
        for _ in progress_bar(
            iterable=range(self.iterations), desc=label, disable=not self.progress, leave=False
        ):
            with torch.enable_grad():
                up = self.upsample(masks, size)
                perturbed = pixels * up + background * (1 - up)
                score, box = trace.provenance_outputs(perturbed, indices)
                preservation = (
                    box_deltas(box, box0).abs().mean(dim=1) / 2 + (score - score0).abs() / 2
                )
                sparsity = torch.stack(
                    [
                        self.l1 * m.abs().sum() + self.tv * total_variation(m, self.tv_beta)
                        for m in masks
                    ]
                )
                grads = torch.autograd.grad((preservation + sparsity).sum(), masks)
            for m, g in zip(masks, grads, strict=True):
                m.grad = g
            optimizer.step()
            with torch.no_grad():
                for m in masks:
                    m.clamp_(0, 1)
        with torch.no_grad():
            return list(self.upsample(masks, size)[:, 0].float().cpu())

    @staticmethod
    def upsample(masks: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Masks of any sizes -> (K, 1, H, W), bilinear with ``align_corners=True``."""
        return torch.cat(
            [
                F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=True)
                for m in masks
            ]
        )
