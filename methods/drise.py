"""D-RISE (Petsiuk et al., CVPR 2021): black-box saliency of detections from random masks.

Masks (RISE): N binary grids of s x s cells, each cell on with probability p, upsampled
(bilinearly by default) to (s + 1) cells of ceil(H / s) x ceil(W / s) pixels and cropped to
H x W at a random shift of less than one cell. The masked image (``masking``) is
``"uint8"`` (default): round(image * mask) as uint8, or ``"float"`` (DESIGN.md, the Microsoft
implementation): the float product image / 255 * mask in [0, 1], handed to the detector
unrounded (``Detector.detect`` accepts float images; a wrapper that quantises them to uint8
gives the ``"uint8"`` numbers).

Weights: for target detection d_t and the detections d_j of a masked image,
w = max_j IoU(box_t, box_j) * cos(class_probs_t, class_probs_j) * objectness_j
(objectness_j = 1 where the detector has none, or with ``objectness=False``).
Saliency = sum_i w_i M_i over the masks used (not divided by N); with
``mean_subtraction=True`` (the Microsoft vision-explanation-methods implementation)
sum_i w_i M_i - mean(w) * sum_i M_i, which is signed.

Every target of an image is explained from the same masks and the same detector runs; a
detection's map does not depend on the target's attribute (D-RISE explains the box and the
class together). ``drise-feature`` applies the masks to a feature layer instead of the pixels
(the feature-drift study): the layer is multiplied by each mask resized to it, the rest of the
network re-runs, and the map is returned in image pixels (``masking`` does not apply).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from xaibench.detector import Detector, WhiteBoxTrace
from xaibench.feature_masks import check_masks
from xaibench.images import to_rgb_uint8
from xaibench.method import ExplanationMethod, detection_indices
from xaibench.progress import progress_bar
from xaibench.registry import METHODS
from xaibench.types import Detections, Saliency, Target

Upsample = Literal["bilinear", "nearest", "bicubic"]
Masking = Literal["uint8", "float"]
MASKINGS: tuple[str, ...] = ("uint8", "float")


class RandomMasks:
    """The D-RISE / RISE masks of one image size, drawn once from ``seed`` and upsampled batch
    by batch (so N large masks never sit in memory together). Mask i depends only on the seed
    and i, not on the batch size."""

    def __init__(
        self,
        n: int,
        image_size: tuple[int, int],
        grid: int = 16,
        p: float = 0.5,
        seed: int = 0,
        upsample: Upsample = "bilinear",
    ) -> None:
        check_mask_settings(n, grid, p, upsample)
        self.image_size = image_size
        self.grid = grid
        self.upsample = upsample
        generator = torch.Generator().manual_seed(seed)
        self.cells = (torch.rand(n, grid, grid, generator=generator) < p).float()
        self.cell_size = (math.ceil(image_size[0] / grid), math.ceil(image_size[1] / grid))
        self.shifts = torch.stack(
            [torch.randint(0, c, (n,), generator=generator) for c in self.cell_size], dim=1
        )

    def __len__(self) -> int:
        return int(self.cells.shape[0])

    def batch(self, start: int, stop: int) -> torch.Tensor:
        """Masks ``start:stop`` as float32 (B, H, W) in [0, 1]."""
        height, width = self.image_size
        up = ((self.grid + 1) * self.cell_size[0], (self.grid + 1) * self.cell_size[1])
        corners = {} if self.upsample == "nearest" else {"align_corners": False}
        big = F.interpolate(self.cells[start:stop, None], size=up, mode=self.upsample, **corners)
        big = big[:, 0].clamp(0, 1)
        return torch.stack(
            [
                big[i, dy : dy + height, dx : dx + width]
                for i, (dy, dx) in enumerate(self.shifts[start:stop].tolist())
            ]
        )


def check_mask_settings(n: int, grid: int, p: float, upsample: str) -> None:
    """Clear errors for impossible mask settings."""
    if n < 1 or grid < 1:
        raise ValueError(f"n and grid must be >= 1, got n={n}, grid={grid}")
    if not 0 < p <= 1:
        raise ValueError(f"p must lie in (0, 1], got {p}")
    if upsample not in ("bilinear", "nearest", "bicubic"):
        raise ValueError(f"upsample must be bilinear, nearest or bicubic; got {upsample!r}")


class GivenMasks:
    """Masks supplied by the caller: (N, h, w) in [0, 1], resized bilinearly to the image
    when their size differs."""

    def __init__(self, masks: np.ndarray | torch.Tensor, image_size: tuple[int, int]) -> None:
        self.masks = check_masks(masks if torch.is_tensor(masks) else np.asarray(masks))
        self.image_size = image_size

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def batch(self, start: int, stop: int) -> torch.Tensor:
        chunk = self.masks[start:stop]
        if tuple(chunk.shape[-2:]) == self.image_size:
            return chunk
        return F.interpolate(
            chunk[:, None], size=self.image_size, mode="bilinear", align_corners=False
        )[:, 0]


def drise_weights(
    target_boxes: torch.Tensor,
    target_probs: torch.Tensor,
    detections: Detections,
    objectness: bool = True,
) -> torch.Tensor:
    """(T,) max over the detections j of IoU(box_t, box_j) * cos(probs_t, probs_j) * o_j;
    0 when there are none. Boxes xyxy (any common unit)."""
    if len(detections) == 0:
        return target_boxes.new_zeros(target_boxes.shape[0])
    iou = box_iou(target_boxes, detections.boxes.to(target_boxes))
    cos = (
        F.normalize(target_probs, dim=1)
        @ F.normalize(detections.class_probs.to(target_probs), dim=1).T
    )
    similarity = iou * cos
    if objectness and detections.objectness is not None:
        similarity = similarity * detections.objectness.to(similarity)[None]
    return similarity.amax(dim=1)


@METHODS.register("drise")
class DRISE(ExplanationMethod):
    """D-RISE in input space (black box: ``Detector.detect`` on masked images).

    n, grid, p: N masks on an s x s grid with cells on at probability p (paper: 5000, 16, 0.5).
    seed: the masks' seed. upsample: bilinear (paper) | nearest | bicubic. objectness: multiply
    by the detections' objectness. mean_subtraction: subtract mean(w) * sum M (signed maps).
    masking: masked images rounded to ``"uint8"`` or kept ``"float"`` (module docstring).
    masks: (N, h, w) in [0, 1] supplied by the caller instead (n, grid, p, seed, upsample then
    unused). batch_size: masked images per detector call. tolerance: stop early once the map
    per mask, checked every ``check_every`` masks (after ``min_masks``), changes by less than
    this relative L2 amount for every target; the masks used are recorded as ``masks_used``.
    progress: show a progress bar.
    """

    name = "drise"
    access = "black-box"

    def __init__(
        self,
        n: int = 5000,
        grid: int = 16,
        p: float = 0.5,
        seed: int = 0,
        upsample: Upsample = "bilinear",
        objectness: bool = True,
        mean_subtraction: bool = False,
        masking: Masking = "uint8",
        masks: np.ndarray | torch.Tensor | None = None,
        batch_size: int = 32,
        tolerance: float | None = None,
        check_every: int = 250,
        min_masks: int = 500,
        progress: bool = True,
    ) -> None:
        if batch_size < 1 or check_every < 1:
            raise ValueError(
                f"batch_size and check_every must be >= 1, got {batch_size}, {check_every}"
            )
        if tolerance is not None and tolerance <= 0:
            raise ValueError(f"tolerance must be > 0 or None, got {tolerance}")
        check_mask_settings(n, grid, p, upsample)
        if masking not in MASKINGS:
            raise ValueError(f"masking must be one of {', '.join(MASKINGS)}; got {masking!r}")
        self.masking = masking
        self.n, self.grid, self.p, self.seed, self.upsample = n, grid, p, seed, upsample
        self.objectness = objectness
        self.mean_subtraction = mean_subtraction
        self.masks = masks
        self.batch_size = batch_size
        self.tolerance = tolerance
        self.check_every = check_every
        self.min_masks = min_masks
        self.progress = progress

    def params(self) -> dict[str, Any]:
        given = self.masks is not None
        return {
            "n": len(self.masks) if given else self.n,
            "grid": None if given else self.grid,
            "p": None if given else self.p,
            "seed": None if given else self.seed,
            "upsample": None if given else self.upsample,
            "masks": "given" if given else "generated",
            "objectness": self.objectness,
            "mean_subtraction": self.mean_subtraction,
            "masking": self.masking,
            "signed": self.mean_subtraction,
            "batch_size": self.batch_size,
            "tolerance": self.tolerance,
        }

    def conventions(self) -> dict[str, str]:
        return {"drise_masking": self.masking}

    def mask_set(self, image_size: tuple[int, int]) -> RandomMasks | GivenMasks:
        """The masks this method uses on an image of ``image_size`` (H, W)."""
        if self.masks is not None:
            return GivenMasks(self.masks, image_size)
        return RandomMasks(self.n, image_size, self.grid, self.p, self.seed, self.upsample)

    def perturbed_detections(
        self, detector: Detector, image: np.ndarray, trace: WhiteBoxTrace | None
    ) -> Callable[[torch.Tensor], list[Detections]]:
        """Detections of the image under each mask of a batch (B, H, W)."""
        pixels = torch.from_numpy(np.array(image, dtype=np.float32))
        if self.masking == "float":
            pixels = pixels / 255.0

        def run(masks: torch.Tensor) -> list[Detections]:
            masked = pixels[None] * masks[..., None]
            if self.masking == "uint8":
                masked = masked.round_().to(torch.uint8)
            batch = detector.batch_limit(self.batch_size)
            return detector.detect(list(masked.numpy()), batch_size=batch)

        return run

    def explain(
        self,
        detector: Detector,
        image: np.ndarray,
        targets: Sequence[Target],
        trace: WhiteBoxTrace | None = None,
    ) -> list[Saliency]:
        start = time.perf_counter()
        image = to_rgb_uint8(image, name="image")
        if trace is None and self.access == "white-box":
            trace = detector.trace(image)
        size = (int(image.shape[0]), int(image.shape[1]))
        masks = self.mask_set(size)
        reference = trace.detections if trace is not None else detector.detect([image])[0]
        indices = detection_indices(targets, len(reference))
        maps, used = self.saliency(
            masks,
            self.perturbed_detections(detector, image, trace),
            reference.boxes[indices].float().cpu(),
            reference.class_probs[indices].float().cpu(),
        )
        row = {i: k for k, i in enumerate(indices)}
        params = {**self.params(), "masks_used": used}
        return self.saliencies(
            targets, [maps[row[t.index]].numpy() for t in targets], start, params
        )

    def saliency(
        self,
        masks: RandomMasks | GivenMasks,
        detect: Callable[[torch.Tensor], list[Detections]],
        boxes: torch.Tensor,
        probs: torch.Tensor,
    ) -> tuple[torch.Tensor, int]:
        """Maps (T, H, W) of the targets (boxes (T, 4), class_probs (T, C)) and the number of
        masks used."""
        height, width = masks.image_size
        weighted = torch.zeros(len(boxes), height * width, dtype=torch.float64)
        mask_sum = torch.zeros(height * width, dtype=torch.float64)
        weight_sum = torch.zeros(len(boxes), dtype=torch.float64)
        previous: torch.Tensor | None = None
        last_check = used = 0
        with progress_bar(
            total=len(masks), desc=self.name, unit="mask", disable=not self.progress, leave=False
        ) as bar:
            while used < len(masks):
                stop = min(used + self.batch_size, len(masks))
                chunk = masks.batch(used, stop)
                weights = torch.stack(
                    [drise_weights(boxes, probs, d, self.objectness) for d in detect(chunk)], 1
                ).double()  # (T, B)
                flat = chunk.reshape(len(chunk), -1).double()
                weighted += weights @ flat
                mask_sum += flat.sum(0)
                weight_sum += weights.sum(1)
                bar.update(stop - used)
                used = stop
                if self.tolerance is None or used < self.min_masks:
                    continue
                if used - last_check >= self.check_every or previous is None:
                    current = self._combine(weighted, mask_sum, weight_sum, used) / used
                    if previous is not None and _converged(current, previous, self.tolerance):
                        break
                    previous, last_check = current, used
        maps = self._combine(weighted, mask_sum, weight_sum, used)
        return maps.reshape(len(boxes), height, width).float(), used

    def _combine(self, weighted, mask_sum, weight_sum, used) -> torch.Tensor:
        if not self.mean_subtraction:
            return weighted
        return weighted - (weight_sum / used)[:, None] * mask_sum[None]


def _converged(current: torch.Tensor, previous: torch.Tensor, tolerance: float) -> bool:
    """Every target's map per mask moved by less than ``tolerance`` (relative L2)."""
    change = (current - previous).norm(dim=1)
    scale = current.norm(dim=1).clamp(min=1e-12)
    return bool((change / scale < tolerance).all())


@METHODS.register("drise-feature")
class FeatureDRISE(DRISE):
    """D-RISE in feature space (the feature-drift study): the masks multiply feature ``layer``
    (``fpn`` = every pyramid level, each with the mask resized to it; or one level, a backbone
    stage, or ``module:<name>``) and the rest of the network re-runs
    (``WhiteBoxTrace.detect_with_feature_masks``). Maps are in image pixels: mask i covers the
    image as in input space, so a layer cell takes its value at the cell's centre."""

    name = "drise-feature"
    access = "white-box"

    def __init__(self, layer: str = "fpn", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layer = layer

    def params(self) -> dict[str, Any]:
        return {**super().params(), "layer": self.layer}

    def conventions(self) -> dict[str, str]:
        return {}  # the masks multiply a feature layer: no image is rounded

    def perturbed_detections(
        self, detector: Detector, image: np.ndarray, trace: WhiteBoxTrace | None
    ) -> Callable[[torch.Tensor], list[Detections]]:
        if trace is None:
            raise ValueError("feature-space D-RISE needs the image's trace")

        def run(masks: torch.Tensor) -> list[Detections]:
            batch = detector.batch_limit(self.batch_size)
            return trace.detect_with_feature_masks(masks, self.layer, batch)

        return run
