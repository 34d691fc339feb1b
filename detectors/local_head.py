"""Convolutional detection heads evaluated for many predictions at once.

A one-stage head (FCOS, RetinaNet) is a few branches, each a tower of stride-1 convolutions
with normalisation and ReLU followed by output convolutions. The output at one cell of a
feature level depends only on a (2R+1) x (2R+1) window of that level, R = the sum of the
kernel radii. ``LocalConvHead`` runs the head once over each level while recording what the
backward pass needs (ReLU masks, normalisation scales) and then back-propagates the outputs
of many cells at once, each on its own window: one batched transposed convolution per layer
instead of one full backward pass per prediction.

GroupNorm is treated with its statistics held fixed: the gradient through the per-image
mean and variance is the one part of the exact gradient the windowed path leaves out. It
shrinks with the level's size (each cell moves the statistics by about 1/(h*w)), so small
levels are back-propagated exactly instead (``level_gradients``), each prediction on its own
copy of the level, in one batched pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def flatten_tower(tower: nn.Module) -> list[nn.Module]:
    """The tower's leaf modules in call order; raises for anything it cannot window."""
    leaves: list[nn.Module] = []
    for m in tower.modules() if isinstance(tower, nn.Sequential) else [tower]:
        if isinstance(m, nn.Sequential):
            continue
        if isinstance(m, nn.Conv2d):
            ok = (
                m.stride == (1, 1)
                and m.dilation == (1, 1)
                and m.groups == 1
                and m.kernel_size[0] == m.kernel_size[1]
                and m.kernel_size[0] % 2 == 1
                and m.padding == (m.kernel_size[0] // 2,) * 2
                and m.padding_mode == "zeros"
            )
            if not ok:
                raise NotImplementedError(f"cannot window convolution {m}; use mode='exact'")
        elif not isinstance(m, nn.GroupNorm | nn.BatchNorm2d | nn.ReLU | nn.Identity):
            raise NotImplementedError(
                f"cannot window layer {type(m).__name__} in a head tower; use mode='exact'"
            )
        leaves.append(m)
    return leaves


def radius(convs: list[nn.Module]) -> int:
    return sum(m.kernel_size[0] // 2 for m in convs if isinstance(m, nn.Conv2d))


@dataclass
class Branch:
    """A tower and the output convolutions that read its last feature map."""

    tower: list[nn.Module]
    outputs: dict[str, nn.Conv2d]

    @property
    def radius(self) -> int:
        return radius(self.tower) + max(m.kernel_size[0] // 2 for m in self.outputs.values())


@dataclass
class LevelRecord:
    """What one branch's backward needs on one level: per tower leaf, a (C, h, w) factor
    map (ReLU mask) or a (C,) scale (normalisation), ``None`` for convolutions."""

    factors: list[torch.Tensor | None] = field(default_factory=list)


class LocalConvHead:
    """Runs a one-stage head level by level and back-propagates per-cell outputs on windows."""

    def __init__(self, branches: dict[str, Branch]) -> None:
        self.branches = branches
        self.radius = max(b.radius for b in branches.values())
        self.records: dict[str, list[LevelRecord]] = {name: [] for name in branches}

    def forward_level(self, x: torch.Tensor, record: bool) -> dict[str, torch.Tensor]:
        """Raw output maps {output name: (N, C_out, h, w)} of one level (pre-activation)."""
        out: dict[str, torch.Tensor] = {}
        for name, branch in self.branches.items():
            rec = LevelRecord()
            t = x
            for m in branch.tower:
                if record:
                    rec.factors.append(_backward_factor(m, t))
                t = m(t)
                if record and isinstance(m, nn.ReLU):
                    rec.factors[-1] = (t[0] > 0).to(t.dtype)
            for out_name, conv in branch.outputs.items():
                out[out_name] = conv(t)
            if record:
                self.records[name].append(rec)
        return out

    @property
    def has_group_norm(self) -> bool:
        return any(isinstance(m, nn.GroupNorm) for b in self.branches.values() for m in b.tower)

    def level_gradients(
        self,
        x: torch.Tensor,
        ys: torch.Tensor,
        xs: torch.Tensor,
        cotangents: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Exact d(sum_o cot[t, o] * out_o[y_t, x_t]) / d(x) over the whole level (1, C, h, w):
        every target runs on its own copy of the level. Returns (T, C, h, w)."""
        t = len(ys)
        copies = x.detach().expand(t, -1, -1, -1).clone().requires_grad_(True)
        rows = torch.arange(t, device=x.device)
        with torch.enable_grad():
            total = copies.new_zeros(())
            for branch in self.branches.values():
                used = [o for o in branch.outputs if o in cotangents]
                if not used:
                    continue
                feat = copies
                for m in branch.tower:
                    feat = m(feat)
                for o in used:
                    cells = branch.outputs[o](feat)[rows, :, ys, xs]  # (T, C_out)
                    total = total + (cells * cotangents[o]).sum()
            (grad,) = torch.autograd.grad(total, copies)
        return grad

    @torch.no_grad()
    def window_gradients(
        self,
        level: int,
        ys: torch.Tensor,
        xs: torch.Tensor,
        cotangents: dict[str, torch.Tensor],
        records: dict[str, list[LevelRecord]] | None = None,
    ) -> torch.Tensor:
        """d(sum_o cot[t, o] * out_o[y_t, x_t]) / d(level input) on each cell's window.

        ``cotangents`` maps output names to (T, C_out). ``records`` are those of the forward
        pass being explained (default: the last recorded one; a trace passes its own, since
        later forward passes replace ``self.records``). Returns (T, C, 2R+1, 2R+1) centred
        on (y_t, x_t), R = ``self.radius`` (cells outside the level get zero gradient).
        """
        records = self.records if records is None else records
        total: torch.Tensor | None = None
        for name, branch in self.branches.items():
            used = [o for o in branch.outputs if o in cotangents]
            if not used:
                continue
            g = sum(
                F.conv_transpose2d(cotangents[o][:, :, None, None], branch.outputs[o].weight)
                for o in used
            )
            k_out = max(branch.outputs[o].kernel_size[0] for o in used)
            r = k_out // 2
            rec = records[name][level]
            for m, factor in zip(reversed(branch.tower), reversed(rec.factors), strict=True):
                if isinstance(m, nn.Conv2d):
                    g = F.conv_transpose2d(g, m.weight)
                    r += m.kernel_size[0] // 2
                elif factor is not None and factor.dim() == 1:
                    g = g * factor[None, :, None, None]
                elif factor is not None:
                    g = g * gather_windows(factor, ys, xs, r)
            pad = self.radius - r
            g = F.pad(g, (pad, pad, pad, pad))
            total = g if total is None else total + g
        if total is None:
            raise ValueError(f"no cotangent for any head output; got {sorted(cotangents)}")
        return total


def _backward_factor(m: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Per-channel scale of a normalisation layer's input gradient (statistics held fixed)."""
    if isinstance(m, nn.GroupNorm):
        c = x.shape[1]
        var = x[:1].reshape(1, m.num_groups, -1).var(dim=-1, unbiased=False)
        rstd = torch.rsqrt(var + m.eps).repeat_interleave(c // m.num_groups, dim=1)[0]
        return rstd * m.weight if m.affine else rstd
    if isinstance(m, nn.BatchNorm2d):
        if m.training or m.running_var is None:
            raise NotImplementedError("windowed backward needs BatchNorm in eval mode")
        scale = torch.rsqrt(m.running_var + m.eps)
        return scale * m.weight if m.affine else scale
    return None


def gather_windows(fmap: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, r: int) -> torch.Tensor:
    """Crops (T, C, 2r+1, 2r+1) of ``fmap`` (C, h, w) centred at (ys, xs), zeros outside."""
    padded = F.pad(fmap, (r, r, r, r))
    offs = torch.arange(2 * r + 1, device=fmap.device)
    rows = (ys[:, None] + offs)[:, :, None]
    cols = (xs[:, None] + offs)[:, None, :]
    return padded[:, rows, cols].permute(1, 0, 2, 3)
