"""ODAM (Zhao & Chan, ICLR 2023): instance-specific heat maps for any predicted attribute.

For a target's scalar Y and a feature map A (C, h, w): w = Phi(dY/dA) per pixel and channel,
H = ReLU(sum_c w_c * A_c) (Eq. 2). The layer is by default the FPN level that produced the
prediction (for two-stage detectors the RoI's level; ``layer="roi"`` uses the RoI-pooled
features). All targets of an image are computed together.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F

from xaibench.detector import FeatureWindows, GradientMode
from xaibench.method import GradientCAMBase
from xaibench.registry import METHODS

Direction = Literal["positive", "negative", "signed", "abs"]
Smoothing = Literal["none", "gaussian"]


@METHODS.register("odam")
class ODAM(GradientCAMBase):
    """ODAM heat maps.

    direction (paper App. A.5.6): ``positive`` ReLU(sum dY/dA * A) (default, Eq. 2),
    ``negative`` ReLU(sum -dY/dA * A) (features that lower Y: for box edges, shrinking),
    ``signed`` no ReLU, ``abs`` |sum dY/dA * A|.
    smoothing: ``none`` (the official code, which produced the paper's tables) or
    ``gaussian``: Phi is a Gaussian on the gradient map whose sigma (in layer cells) is
    ``sigma_scale * sqrt(w * h)`` of the predicted box on the layer, at least 0.5 cell; the
    paper says the kernel adapts to the object's size but gives no constant.
    """

    name = "odam"

    def __init__(
        self,
        layer: str = "fpn",
        mode: GradientMode = "fast",
        direction: Direction = "positive",
        smoothing: Smoothing = "none",
        sigma_scale: float = 0.1,
    ) -> None:
        super().__init__(layer=layer, mode=mode)
        if direction not in ("positive", "negative", "signed", "abs"):
            raise ValueError(
                f"direction must be positive, negative, signed or abs; got {direction!r}"
            )
        if smoothing not in ("none", "gaussian"):
            raise ValueError(f"smoothing must be 'none' or 'gaussian', got {smoothing!r}")
        if sigma_scale <= 0:
            raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
        self.direction = direction
        self.smoothing = smoothing
        self.sigma_scale = sigma_scale

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "direction": self.direction,
            "smoothing": self.smoothing,
            "sigma_scale": self.sigma_scale,
        }

    def _sigmas(self, boxes_on_layer: torch.Tensor) -> torch.Tensor:
        wh = (boxes_on_layer[:, 2:] - boxes_on_layer[:, :2]).clamp(min=0)
        return (self.sigma_scale * torch.sqrt(wh[:, 0] * wh[:, 1])).clamp(min=0.5)

    def margin(self, boxes_on_layer: torch.Tensor) -> int:
        if self.smoothing == "none" or len(boxes_on_layer) == 0:
            return 0
        return math.ceil(3 * float(self._sigmas(boxes_on_layer).max()))

    def weights(self, windows: FeatureWindows) -> torch.Tensor:
        grads = -windows.gradients if self.direction == "negative" else windows.gradients
        if self.smoothing == "gaussian":
            grads = gaussian_blur_per_target(grads, self._sigmas(windows.boxes_on_layer))
        return grads

    def combine(self, weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        h = (weights * activations).sum(dim=1)
        if self.direction == "signed":
            return h
        if self.direction == "abs":
            return h.abs()
        return torch.relu(h)


def gaussian_blur_per_target(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Blur each target's maps (T, C, h, w) with its own Gaussian (sigmas (T,), in cells),
    truncated at 3 sigma, zero padding."""
    t, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigmas.max())))
    offs = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernels = torch.exp(-0.5 * (offs[None] / sigmas[:, None].to(x.dtype)) ** 2)
    kernels = kernels * (offs.abs()[None] <= 3 * sigmas[:, None].to(x.dtype))
    kernels = kernels / kernels.sum(dim=1, keepdim=True)  # (T, K)
    k = kernels.repeat_interleave(c, dim=0)  # (T*C, K)
    flat = x.reshape(1, t * c, h, w)
    flat = F.conv2d(flat, k[:, None, :, None], padding=(radius, 0), groups=t * c)
    flat = F.conv2d(flat, k[:, None, None, :], padding=(0, radius), groups=t * c)
    return flat.reshape(t, c, h, w)
