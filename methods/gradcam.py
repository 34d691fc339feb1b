"""Grad-CAM (Selvaraju et al., ICCV 2017) and Grad-CAM++ (Chattopadhay et al., WACV 2018) of
detection targets.

For a target's scalar Y (score or box edge) and a feature layer A (C, h, w), g = dY/dA:

- Grad-CAM:   w_c = mean over the whole layer of g_c;  H = ReLU(sum_c w_c A_c)
- Grad-CAM++: w_c = sum_ij alpha_cij ReLU(g_cij),
              alpha_cij = g_cij^2 / (2 g_cij^2 + (sum_ab A_cab) g_cij^3)  (0 where g_cij = 0)

Unlike ODAM the weights are one number per channel and the map covers the whole layer, so two
objects of one class on one layer get nearly the same map. The gradient of a one-stage
prediction is zero outside its window of the layer and that of a two-stage prediction outside
its RoI's crop, so the windowed (fast) gradients, restricted to the cells of the layer, give
the whole layer's sums; the layer itself comes from ``FeatureWindows.layer_activations``. On
``layer="roi"`` the layer is each target's own RoI-pooled grid.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import replace

import torch

from xaibench.detector import FeatureWindows
from xaibench.method import GradientCAMBase
from xaibench.registry import METHODS


class WholeLayerCAM(GradientCAMBase):
    """CAM methods with one weight per channel applied to the whole layer. Subclasses define
    ``channel_weights``; the layer is the one the target's windows were cut from."""

    @abstractmethod
    def channel_weights(self, windows: FeatureWindows, layer: torch.Tensor) -> torch.Tensor:
        """(T, C) weights from the windows' gradients and the layer (T or 1, C, h, w)."""

    def weights(self, windows: FeatureWindows) -> torch.Tensor:
        return self.channel_weights(windows, whole_layer(windows))[..., None, None]

    def layer_maps(self, windows: FeatureWindows) -> tuple[FeatureWindows, torch.Tensor]:
        """Maps over the whole layer (spatial layers: placed from the layer's origin)."""
        layer = whole_layer(windows)
        weights = self.channel_weights(windows, layer)
        if layer.shape[0] == 1:  # one spatial layer shared by the targets
            maps = torch.relu(torch.einsum("tc,chw->thw", weights, layer[0]))
        else:  # each target's own RoI grid
            maps = torch.relu(torch.einsum("tc,tchw->thw", weights, layer))
        if windows.roi_boxes is not None:
            return windows, maps
        return replace(windows, origin=torch.zeros_like(windows.origin)), maps


def layer_gradients(windows: FeatureWindows) -> torch.Tensor:
    """The windows' gradients (T, C, h_w, w_w) with the cells that lie outside the layer set to
    zero: a fast-path window may run past the layer's edge, over its zero padding, where the
    windowed backward pass leaves gradients that belong to no cell of the layer."""
    if windows.roi_boxes is not None:
        return windows.gradients
    h, w = windows.layer_size
    wh, ww = windows.gradients.shape[-2:]
    origin = windows.origin.to(windows.gradients.device)
    rows = origin[:, :1] + torch.arange(wh, device=origin.device)  # (T, h_w) layer rows
    cols = origin[:, 1:] + torch.arange(ww, device=origin.device)  # (T, w_w) layer columns
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    return windows.gradients * inside[:, None].to(windows.gradients.dtype)


def whole_layer(windows: FeatureWindows) -> torch.Tensor:
    """The layer the windows belong to: (1, C, h, w) for a spatial layer, each target's own
    pooled grid (T, C, k, k) for RoI windows."""
    if windows.roi_boxes is not None:
        return windows.activations
    if windows.layer_activations is not None:
        return windows.layer_activations[None]
    if tuple(windows.activations.shape[-2:]) == windows.layer_size and not windows.origin.any():
        return windows.activations[:1]
    raise ValueError(
        f"layer {windows.layer!r}: the trace gave windows without the whole layer; "
        "Grad-CAM needs it (use mode='exact')"
    )


@METHODS.register("gradcam")
class GradCAM(WholeLayerCAM):
    """Grad-CAM: channel weights = spatial mean of dY/dA over the whole layer."""

    name = "gradcam"

    def channel_weights(self, windows: FeatureWindows, layer: torch.Tensor) -> torch.Tensor:
        h, w = layer.shape[-2:]
        return layer_gradients(windows).sum(dim=(2, 3)) / (h * w)


@METHODS.register("gradcampp")
class GradCAMPlusPlus(WholeLayerCAM):
    """Grad-CAM++: channel weights = sum_ij alpha_ij ReLU(g_ij) with
    alpha = g^2 / (2 g^2 + sum_ab A_ab g^3), and alpha = 0 where g = 0."""

    name = "gradcampp"

    def channel_weights(self, windows: FeatureWindows, layer: torch.Tensor) -> torch.Tensor:
        g = layer_gradients(windows)
        activation_sums = layer.sum(dim=(2, 3))[..., None, None]  # (T or 1, C, 1, 1)
        denominator = 2 * g**2 + activation_sums * g**3
        safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
        alpha = torch.where((g != 0) & (denominator != 0), g**2 / safe, torch.zeros_like(g))
        return (alpha * torch.relu(g)).sum(dim=(2, 3))
