"""Convolutional detection heads evaluated for many predictions at once.

A one-stage head (FCOS, RetinaNet) is a few branches, each a tower of stride-1 convolutions
with normalisation and ReLU followed by output convolutions. The output at one cell of a
feature level depends only on a (2R+1) x (2R+1) window of that level, R = the sum of the
kernel radii. ``LocalConvHead`` runs the head once over each level while recording what the
backward pass needs (ReLU masks, normalisation scales) and then back-propagates the outputs
of many cells at once, each on its own window: one batched transposed convolution per layer
instead of one full backward pass per prediction.

GroupNorm is treated with its statistics held fixed: the gradient through the per-image
mean and variance is the one part of the exact gradient the windowed path leaves out, and it
is dense over the level. It shrinks with the level's size (each cell moves the statistics by
about 1/(h*w)) but not to nothing on small levels of trained heads. So the windowed pass also
measures, per prediction and GroupNorm layer, the norm of the left-out term over the whole
level relative to the kept one (``WindowGradients.gn_error``, computed in closed form from
the window); predictions above a tolerance are back-propagated exactly instead
(``level_gradients``: each on its own copy of the level, in one batched pass). The same
relative norm costs more Pearson correlation on a larger level, so the tolerance shrinks
slowly with the level's size (``level_tolerance``). Levels no larger than a window always
take the exact route: there it costs no more than the windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

GN_TOLERANCE = 0.028
"""Default tolerance on ``WindowGradients.gn_error`` on a level of ``GN_REFERENCE_CELLS``."""
GN_REFERENCE_CELLS = 4096
GN_SIZE_EXPONENT = 1 / 3
"""The tolerance on a level of n cells is GN_TOLERANCE * (GN_REFERENCE_CELLS / n) ** this.
Calibrated on the trained demo FCOS (two channels per group; 160-640 px inputs, levels of
100-6400 cells, every attribute): the smallest ``gn_error`` whose windowed map fell below
Pearson 0.99 went from 0.124 (100 cells) to 0.026 (6400 cells), about as n ** -0.36; this
rule stays at least 8% below it on every level size measured."""


def level_tolerance(tolerance: float, cells: int) -> float:
    """``tolerance`` (given for a level of ``GN_REFERENCE_CELLS`` cells) on a level of
    ``cells`` cells."""
    return tolerance * (GN_REFERENCE_CELLS / cells) ** GN_SIZE_EXPONENT


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
    map (ReLU mask) or a (C,) scale (normalisation), ``None`` for convolutions; and per
    GroupNorm leaf its normalised input (C, h, w) (``None`` for other leaves)."""

    factors: list[torch.Tensor | None] = field(default_factory=list)
    normalised: list[torch.Tensor | None] = field(default_factory=list)


@dataclass
class WindowGradients:
    """Windowed input gradients (T, C, 2R+1, 2R+1) and, per target, the largest relative
    norm (over GroupNorm layers) of the statistics term the window leaves out (T,)."""

    grads: torch.Tensor
    gn_error: torch.Tensor


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
                    factor, normalised = _record(m, t)
                    rec.factors.append(factor)
                    rec.normalised.append(normalised)
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

    @torch.no_grad()
    def level_gradients(
        self,
        level: int,
        shape: tuple[int, int],
        ys: torch.Tensor,
        xs: torch.Tensor,
        cotangents: dict[str, torch.Tensor],
        records: dict[str, list[LevelRecord]],
    ) -> torch.Tensor:
        """Exact d(sum_o cot[t, o] * out_o[y_t, x_t]) / d(level input) over the whole level
        of ``shape`` (h, w), GroupNorm statistics included: one batched backward pass over the
        recorded forward pass, every target on its own copy of the level. Returns
        (T, C, h, w)."""
        total: torch.Tensor | None = None
        for name, branch in self.branches.items():
            used = [o for o in branch.outputs if o in cotangents]
            if not used:
                continue
            rec = records[name][level]
            g: torch.Tensor | None = None
            for o in used:
                conv = branch.outputs[o]
                cot = cotangents[o]
                seed = cot.new_zeros((len(ys), cot.shape[1], *shape))
                seed[torch.arange(len(ys)), :, ys, xs] = cot
                back = F.conv_transpose2d(seed, conv.weight, padding=conv.padding)
                g = back if g is None else g + back
            leaves = zip(branch.tower, rec.factors, rec.normalised, strict=True)
            for m, factor, normalised in reversed(list(leaves)):
                if isinstance(m, nn.Conv2d):
                    g = F.conv_transpose2d(g, m.weight, padding=m.padding)
                elif factor is not None and factor.dim() == 1:
                    g = g * factor[None, :, None, None]
                    if normalised is not None:
                        g = g - _statistics_term(g, normalised, m.num_groups)
                elif factor is not None:
                    g = g * factor
            total = g if total is None else total + g
        if total is None:
            raise ValueError(f"no cotangent for any head output; got {sorted(cotangents)}")
        return total

    @torch.no_grad()
    def window_gradients(
        self,
        level: int,
        ys: torch.Tensor,
        xs: torch.Tensor,
        cotangents: dict[str, torch.Tensor],
        records: dict[str, list[LevelRecord]],
    ) -> WindowGradients:
        """d(sum_o cot[t, o] * out_o[y_t, x_t]) / d(level input) on each cell's window.

        ``cotangents`` maps output names to (T, C_out); ``records`` are those of the forward
        pass being explained. Gradients are (T, C, 2R+1, 2R+1) centred on (y_t, x_t),
        R = ``self.radius`` (cells outside the level get zero gradient).
        """
        total: torch.Tensor | None = None
        gn_error = torch.zeros(len(ys), device=ys.device)
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
            leaves = zip(branch.tower, rec.factors, rec.normalised, strict=True)
            for m, factor, normalised in reversed(list(leaves)):
                if isinstance(m, nn.Conv2d):
                    g = F.conv_transpose2d(g, m.weight)
                    r += m.kernel_size[0] // 2
                elif factor is not None and factor.dim() == 1:
                    g = g * factor[None, :, None, None]
                    if normalised is not None:
                        z_windows = gather_windows(normalised, ys, xs, r)
                        err = _statistics_error(g, z_windows, normalised, m)
                        gn_error = torch.maximum(gn_error, err)
                elif factor is not None:
                    g = g * gather_windows(factor, ys, xs, r)
            pad = self.radius - r
            g = F.pad(g, (pad, pad, pad, pad))
            total = g if total is None else total + g
        if total is None:
            raise ValueError(f"no cotangent for any head output; got {sorted(cotangents)}")
        return WindowGradients(total, gn_error)

    def level_parts(
        self,
        level: int,
        feat: torch.Tensor,
        ys: torch.Tensor,
        xs: torch.Tensor,
        cotangents: dict[str, torch.Tensor],
        records: dict[str, list[LevelRecord]],
        gn_tolerance: float,
        exact_level_cells: int | None,
        pad: int,
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Input gradients of the targets at (ys, xs) of one level ``feat`` (C, h, w), as parts
        ``(positions in ys, gradients, origin (T, 2) (y, x) in cells, activations)`` with
        ``pad`` extra cells on every side. Windowed, except on a GroupNorm head for targets
        whose left-out statistics term exceeds ``level_tolerance(gn_tolerance, h * w)``
        (relative norm) and for levels of at most ``exact_level_cells`` cells (``None``: the
        window's (2R+1)^2): those get the whole level, exactly."""
        windowed = self.window_gradients(level, ys, xs, cotangents, records)
        h, w = feat.shape[-2:]
        exact = windowed.gn_error > level_tolerance(gn_tolerance, h * w)
        if exact_level_cells is None:
            exact_level_cells = (2 * self.radius + 1) ** 2
        if self.has_group_norm and h * w <= exact_level_cells:
            exact[:] = True
        parts = []
        keep = torch.where(~exact)[0]
        if len(keep):
            r = self.radius + pad
            grads = F.pad(windowed.grads[keep], (pad,) * 4)
            origin = torch.stack((ys[keep], xs[keep]), 1).cpu() - r
            parts.append((keep, grads, origin, gather_windows(feat, ys[keep], xs[keep], r)))
        redo = torch.where(exact)[0]
        if len(redo):
            cot = {n: c[redo] for n, c in cotangents.items()}
            grads = self.level_gradients(level, (h, w), ys[redo], xs[redo], cot, records)
            grads = F.pad(grads, (pad,) * 4)
            acts = F.pad(feat, (pad,) * 4)[None].expand(len(redo), -1, -1, -1)
            origin = torch.full((len(redo), 2), -pad, dtype=torch.long)
            parts.append((redo, grads, origin, acts))
        return parts


def _record(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What the backward needs of a tower leaf with input ``x`` (N, C, h, w), first image: a
    normalisation layer's per-channel input-gradient scale with the statistics held fixed
    (C,), and a GroupNorm layer's normalised input (C, h, w); ``None`` where there is none."""
    if isinstance(m, nn.GroupNorm):
        c, h, w = x.shape[1:]
        groups = x[0].reshape(m.num_groups, -1)
        var, mean = torch.var_mean(groups, dim=-1, correction=0, keepdim=True)
        rstd = torch.rsqrt(var + m.eps)
        normalised = ((groups - mean) * rstd).reshape(c, h, w)
        scale = rstd[:, 0].repeat_interleave(c // m.num_groups)
        return (scale * m.weight if m.affine else scale), normalised
    if isinstance(m, nn.BatchNorm2d):
        if m.training or m.running_var is None:
            raise NotImplementedError("windowed backward needs BatchNorm in eval mode")
        scale = torch.rsqrt(m.running_var + m.eps)
        return (scale * m.weight if m.affine else scale), None
    return None, None


def _statistics_term(g: torch.Tensor, z: torch.Tensor, groups: int) -> torch.Tensor:
    """The part of a GroupNorm input gradient that flows through the statistics:
    m1 + z * m2, m1 and m2 the means of g and g * z over each group's channels and cells.
    ``g`` (T, C, h, w) is (gamma/sigma) * the output gradient, ``z`` (C, h, w) the
    normalised input."""
    t, c = g.shape[:2]
    per_group = (t, groups, -1)
    m1 = g.reshape(per_group).mean(-1)
    m2 = (g * z).reshape(per_group).mean(-1)
    m1 = m1.repeat_interleave(c // groups, 1)[:, :, None, None]
    m2 = m2.repeat_interleave(c // groups, 1)[:, :, None, None]
    return m1 + z * m2


def _statistics_error(
    g: torch.Tensor, z_windows: torch.Tensor, z: torch.Tensor, m: nn.GroupNorm
) -> torch.Tensor:
    """Relative norm of the term a fixed-statistics GroupNorm backward leaves out.

    ``g`` (T, C, k, k) is the windowed gradient after the fixed-statistics scaling
    (gamma/sigma) * v, ``z_windows`` the normalised input on the same windows and ``z``
    (C, h, w) on the whole level. The exact input gradient adds -(m1 + z * m2) on every cell
    of the level, m1 and m2 the means of g and g * z over the group's channels and all cells
    (g is zero off the window). Returns ||added|| / ||g|| over the level, per target (T,).
    """
    t, c = g.shape[:2]
    groups, per_group = m.num_groups, c // m.num_groups
    n = z.shape[-1] * z.shape[-2] * per_group
    m1 = g.reshape(t, groups, -1).sum(-1) / n
    m2 = (g * z_windows).reshape(t, groups, -1).sum(-1) / n
    m1, m2 = m1.repeat_interleave(per_group, 1), m2.repeat_interleave(per_group, 1)
    cells = z.shape[-1] * z.shape[-2]
    z_sum, z_sq = z.reshape(c, -1).sum(-1), (z * z).reshape(c, -1).sum(-1)
    added = (cells * m1**2 + 2 * m1 * m2 * z_sum + m2**2 * z_sq).sum(1)
    kept = (g * g).sum((1, 2, 3))
    return torch.sqrt(added / kept.clamp_min(torch.finfo(g.dtype).tiny))


def gather_windows(fmap: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, r: int) -> torch.Tensor:
    """Crops (T, C, 2r+1, 2r+1) of ``fmap`` (C, h, w) centred at (ys, xs), zeros outside."""
    h, w = fmap.shape[-2:]
    crops = fmap.new_zeros(len(ys), fmap.shape[0], 2 * r + 1, 2 * r + 1)
    for crop, y, x in zip(crops, ys.tolist(), xs.tolist(), strict=True):
        top, left = max(y - r, 0), max(x - r, 0)
        bottom, right = min(y + r + 1, h), min(x + r + 1, w)
        crop[:, top - y + r : bottom - y + r, left - x + r : right - x + r] = fmap[
            :, top:bottom, left:right
        ]
    return crops
