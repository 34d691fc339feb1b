"""Masks over the original image placed on a feature layer (feature-space perturbation).

A mask (N, h, w) in [0, 1] covers the original image's extent at any resolution. A layer
(h_l, w_l) covers the detector's padded input, so each layer cell takes the mask's value at
the cell centre's position in the original image (bilinear, ``align_corners=False``); cells
whose centre lies on the padding keep the value 1 (nothing of the image is there to mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xaibench.geometry import InputGeometry


def check_masks(masks: torch.Tensor) -> torch.Tensor:
    """``masks`` as float (N, h, w) with values in [0, 1]; a clear error otherwise."""
    if not isinstance(masks, torch.Tensor):
        masks = torch.as_tensor(masks)
    if masks.dim() != 3 or 0 in masks.shape:
        raise ValueError(
            f"masks must have shape (N, h, w) with N, h, w > 0; got {tuple(masks.shape)}"
        )
    masks = masks.float()
    if not torch.isfinite(masks).all() or masks.min() < 0 or masks.max() > 1:
        raise ValueError("masks must hold finite values in [0, 1]")
    return masks


def masks_to_layer(
    masks: torch.Tensor, geometry: InputGeometry, layer_size: tuple[int, int]
) -> torch.Tensor:
    """Sample masks (N, h, w) over the original image at the centres of a layer's cells
    -> (N, h_l, w_l); cells over the padding are 1."""
    n = masks.shape[0]
    h_l, w_l = layer_size
    dev, dt = masks.device, masks.dtype
    # cell centre in original pixels, divided by the original size: (i + 0.5) * pad / h_l / resized
    ys = (torch.arange(h_l, device=dev, dtype=dt) + 0.5) * (
        geometry.padded[0] / h_l / geometry.resized[0]
    )
    xs = (torch.arange(w_l, device=dev, dtype=dt) + 0.5) * (
        geometry.padded[1] / w_l / geometry.resized[1]
    )
    grid = torch.stack(torch.meshgrid(xs * 2 - 1, ys * 2 - 1, indexing="xy"), dim=-1)
    sampled = F.grid_sample(
        masks[:, None],
        grid[None].expand(n, -1, -1, -1),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )[:, 0]
    inside = (ys < 1)[:, None] & (xs < 1)[None, :]
    return torch.where(inside, sampled, torch.ones_like(sampled))
