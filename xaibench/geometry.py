"""Where a detector's input tensor sits in the original image.

Detectors resize the original (H, W) image to (h, w) and pad it (bottom and right) to the
batch size (H_pad, W_pad). A feature layer of size (h_l, w_l) covers the padded input, so a
layer cell centre (i + 0.5) * H_pad / h_l (in resized pixels) lies at
(i + 0.5) * H_pad / h_l * H / h in original pixels. Maps are sampled at the original pixel
centres through that one mapping, so the padding is cropped before anything is resized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class InputGeometry:
    """original (H, W), resized (h, w) and padded (H_pad, W_pad) sizes of one image."""

    original: tuple[int, int]
    resized: tuple[int, int]
    padded: tuple[int, int]

    def scale(self) -> tuple[float, float]:
        """(sy, sx): original pixels per resized pixel."""
        return self.original[0] / self.resized[0], self.original[1] / self.resized[1]

    def boxes_to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        """xyxy boxes in resized-input pixels -> original pixels."""
        sy, sx = self.scale()
        return boxes * boxes.new_tensor([sx, sy, sx, sy])

    def boxes_to_layer(self, boxes: torch.Tensor, layer_size: tuple[int, int]) -> torch.Tensor:
        """xyxy boxes in original pixels -> continuous cell coordinates of a layer."""
        sy, sx = self.scale()
        fy = layer_size[0] / self.padded[0] / sy
        fx = layer_size[1] / self.padded[1] / sx
        return boxes * boxes.new_tensor([fx, fy, fx, fy])

    def layer_to_original(self, maps: torch.Tensor) -> torch.Tensor:
        """Bilinearly sample layer maps (T, h_l, w_l) at every original pixel -> (T, H, W)."""
        origin = torch.zeros(maps.shape[0], 2, dtype=torch.long)
        return self.windows_to_original(maps, origin, (maps.shape[-2], maps.shape[-1]))

    def windows_to_original(
        self, maps: torch.Tensor, origin: torch.Tensor, layer_size: tuple[int, int]
    ) -> torch.Tensor:
        """Maps on windows (T, h_w, w_w) of a layer of ``layer_size`` (h_l, w_l), window t's
        top-left cell at ``origin[t]`` (row, col; the window may run past the layer, zero
        elsewhere), bilinearly sampled at every original pixel -> (T, H, W).

        Sampling is separable: out_t = R_y[:, window rows] @ map_t @ R_x[:, window cols]^T,
        R the per-axis bilinear weights of grid_sample (align_corners=False, border)."""
        t = maps.shape[0]
        height, width = self.original
        if t == 0:
            return maps.new_zeros(0, height, width)
        rows = self._axis_weights(0, layer_size[0], origin[:, 0], maps.shape[-2], maps)
        cols = self._axis_weights(1, layer_size[1], origin[:, 1], maps.shape[-1], maps)
        return torch.bmm(torch.bmm(rows, maps), cols.transpose(1, 2))

    def _axis_weights(
        self, axis: int, cells: int, start: torch.Tensor, length: int, like: torch.Tensor
    ) -> torch.Tensor:
        """(T, original size, length) bilinear weights of the original pixels of ``axis`` on
        the layer cells start[t] .. start[t] + length - 1 (zero for cells off the layer)."""
        size = self.original[axis]
        # continuous cell index of each original pixel centre, clamped to the border cells
        pos = (torch.arange(size, device=like.device, dtype=like.dtype) + 0.5) * (
            self.resized[axis] / size / self.padded[axis] * cells
        ) - 0.5
        pos = pos.clamp(0, cells - 1)
        low = pos.floor().long()
        frac = pos - low
        high = (low + 1).clamp(max=cells - 1)
        full = like.new_zeros(size, cells)
        pixels = torch.arange(size, device=like.device)
        full.index_put_((pixels, low), 1 - frac, accumulate=True)
        full.index_put_((pixels, high), frac, accumulate=True)
        pad = max(0, -int(start.min())) + max(0, int(start.max()) + length - cells)
        full = F.pad(full, (pad, pad))
        index = start.to(like.device)[:, None] + pad + torch.arange(length, device=like.device)
        return full[:, index].permute(1, 0, 2)

    def boxes_grid_to_original(self, maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Spread per-box grids (T, k, k) over their boxes (T, 4, original pixels) -> (T, H, W);
        zero outside each box."""
        t = maps.shape[0]
        height, width = self.original
        if t == 0:
            return maps.new_zeros(0, height, width)
        ys = torch.arange(height, device=maps.device, dtype=maps.dtype) + 0.5
        xs = torch.arange(width, device=maps.device, dtype=maps.dtype) + 0.5
        x1, y1, x2, y2 = boxes.to(maps.dtype).unbind(1)
        gx = (xs[None] - x1[:, None]) / (x2 - x1).clamp(min=1e-6)[:, None] * 2 - 1  # (T, W)
        gy = (ys[None] - y1[:, None]) / (y2 - y1).clamp(min=1e-6)[:, None] * 2 - 1  # (T, H)
        grid = torch.stack(
            (gx[:, None, :].expand(t, height, width), gy[:, :, None].expand(t, height, width)),
            dim=-1,
        )
        out = F.grid_sample(
            maps[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False
        )[:, 0]
        inside = (gx.abs() <= 1)[:, None, :] & (gy.abs() <= 1)[:, :, None]
        return out * inside
