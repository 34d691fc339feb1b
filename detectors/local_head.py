"""Convolutional detection heads evaluated for many predictions at once.

A one-stage head (FCOS, RetinaNet) is a few branches, each a tower of stride-1 convolutions
with normalisation and ReLU followed by output convolutions. The output at one cell of a
feature level depends only on a (2R+1) x (2R+1) window of that level, R = the sum of the
kernel radii. ``LocalConvHead`` runs the head once over each level while keeping what the
backward pass needs (references to ReLU outputs and GroupNorm inputs, normalisation scales and
statistics: nothing is copied) and then back-propagates the outputs of many cells at once, each
on its own window: one batched transposed convolution per layer instead of one full backward
pass per prediction. Targets at one cell whose cotangents are multiples of one another (the
scores of two classes on the branch that only feeds the centreness, or one box edge of two
classes) share one pass.

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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

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

    @property
    def in_channels(self) -> int:
        convs = [m for m in self.tower if isinstance(m, nn.Conv2d)] or list(self.outputs.values())
        return convs[0].in_channels


@dataclass
class ReluRecord:
    """A ReLU's output (C, h, w): the backward passes the gradient where it is > 0."""

    output: torch.Tensor


@dataclass
class NormRecord:
    """A normalisation layer's input-gradient scale with its statistics held fixed (C,)."""

    scale: torch.Tensor


@dataclass
class GroupNormRecord(NormRecord):
    """A GroupNorm layer's scale, its input (C, h, w), the per-group mean and 1/std (G,) of
    that input, its shift (C,) and epsilon: what the statistics term needs."""

    input: torch.Tensor
    mean: torch.Tensor
    rstd: torch.Tensor
    shift: torch.Tensor
    eps: float
    _normalised: torch.Tensor | None = field(default=None, repr=False)

    def per_channel(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group ``values`` (..., G) repeated over each group's channels (..., C)."""
        return values.repeat_interleave(self.input.shape[0] // len(self.mean), -1)

    def normalised(self) -> torch.Tensor:
        """The normalised input z (C, h, w), computed on first use."""
        if self._normalised is None:
            mean, rstd = self.per_channel(self.mean), self.per_channel(self.rstd)
            self._normalised = (self.input - mean[:, None, None]) * rstd[:, None, None]
        return self._normalised

    def window_products(
        self,
        output_gradient: torch.Tensor,
        ys: torch.Tensor,
        xs: torch.Tensor,
        r: int,
        relu_output: torch.Tensor | None,
    ) -> torch.Tensor:
        """Per target and group (T, G), the sum over the group's channels and the windows
        centred at (ys, xs) of g * z, g the input gradient with the statistics held fixed
        (scale * ``output_gradient``, (T, C, 2r+1, 2r+1), zero off the level) and z the
        normalised input. Where a ReLU follows the layer, pass its ``relu_output`` on the
        same windows (``output_gradient`` is zero where it is not positive): there
        g * z = rstd * output_gradient * (output - shift), and the input is not read."""
        t, groups = len(output_gradient), len(self.mean)
        if relu_output is not None:
            shifted = relu_output - self.shift[:, None, None]
            return (output_gradient * shifted).reshape(t, groups, -1).sum(-1) * self.rstd
        g = output_gradient * self.scale[:, None, None]
        g_sum = g.reshape(t, groups, -1).sum(-1)
        gx_sum = (g * gather_windows(self.input, ys, xs, r)).reshape(t, groups, -1).sum(-1)
        return self.rstd * (gx_sum - self.mean * g_sum)


LeafRecord = ReluRecord | NormRecord | None


class RecordedLevel(NamedTuple):
    """One level of a recorded forward pass (first image): the level's ``shape`` (h, w) and,
    per branch, one record per tower leaf (``None`` for convolutions and other leaves that
    need nothing)."""

    shape: tuple[int, int]
    branches: dict[str, list[LeafRecord]]


HeadRecords = list[RecordedLevel]
"""A recorded forward pass, one ``RecordedLevel`` per level."""


class CellTargets(NamedTuple):
    """Targets at cells (``ys``, ``xs``) (T,) of one level, each the weighted sum
    ``sum_o cotangents[o][t] . out_o[:, y_t, x_t]`` of the head's raw outputs there
    ({output name: (T, C_out)})."""

    ys: torch.Tensor
    xs: torch.Tensor
    cotangents: dict[str, torch.Tensor]

    def select(self, rows: torch.Tensor, outputs: Sequence[str] | None = None) -> CellTargets:
        """The targets at ``rows``, with the cotangents of ``outputs`` (default: all)."""
        names = self.cotangents if outputs is None else outputs
        cot = {o: self.cotangents[o][rows] for o in names}
        return CellTargets(self.ys[rows], self.xs[rows], cot)


class WindowPart(NamedTuple):
    """Input gradients of some targets of one level: ``rows`` (positions among the targets
    given), ``gradients`` (T, C, h_w, w_w) on windows whose top-left cells are ``origin``
    (T, 2) (row, col; may lie off the level), and the level's ``activations`` on the same
    windows (zero off the level)."""

    rows: torch.Tensor
    gradients: torch.Tensor
    origin: torch.Tensor
    activations: torch.Tensor


@dataclass
class WindowGradients:
    """Windowed input gradients (T, C, 2R+1, 2R+1) and, per target, the largest relative
    norm (over GroupNorm layers) of the statistics term the window leaves out (T,)."""

    grads: torch.Tensor
    gn_error: torch.Tensor


class LocalConvHead:
    """Runs a one-stage head level by level and back-propagates per-cell outputs on windows.

    The GroupNorm guard is set here: a target whose windowed gradient leaves out more than
    ``gn_tolerance`` (relative norm, on a level of ``GN_REFERENCE_CELLS`` cells;
    ``level_tolerance`` scales it to other sizes) of the statistics term is back-propagated
    exactly, as is every target on a level of at most ``exact_level_cells`` cells (``None``:
    no more cells than one window)."""

    def __init__(
        self,
        branches: dict[str, Branch],
        gn_tolerance: float = GN_TOLERANCE,
        exact_level_cells: int | None = None,
    ) -> None:
        self.branches = branches
        self.radius = max(b.radius for b in branches.values())
        self.gn_tolerance = gn_tolerance
        self.exact_level_cells = exact_level_cells

    def forward(
        self, levels: Sequence[torch.Tensor], record: bool = False
    ) -> tuple[list[dict[str, torch.Tensor]], HeadRecords | None]:
        """Raw output maps per level ({output name: (N, C_out, h, w)}, pre-activation) and,
        with ``record``, what the backward passes of the first image need."""
        passes = [self.forward_level(x, record) for x in levels]
        return [out for out, _ in passes], [rec for _, rec in passes] if record else None

    def forward_level(
        self, x: torch.Tensor, record: bool = False
    ) -> tuple[dict[str, torch.Tensor], RecordedLevel | None]:
        """One level's raw output maps and, with ``record``, its record."""
        out: dict[str, torch.Tensor] = {}
        leaves: dict[str, list[LeafRecord]] = {name: [] for name in self.branches}
        for name, branch in self.branches.items():
            t = x
            for m in branch.tower:
                if record:
                    t, leaf = _run_and_record(m, t)
                    leaves[name].append(leaf)
                else:
                    t = m(t)
            for out_name, conv in branch.outputs.items():
                out[out_name] = conv(t)
        return out, RecordedLevel((x.shape[-2], x.shape[-1]), leaves) if record else None

    @property
    def has_group_norm(self) -> bool:
        return any(isinstance(m, nn.GroupNorm) for b in self.branches.values() for m in b.tower)

    def _used(self, branch: Branch, cells: CellTargets) -> list[str]:
        return [o for o in branch.outputs if o in cells.cotangents]

    @torch.no_grad()
    def level_gradients(self, level: RecordedLevel, cells: CellTargets) -> torch.Tensor:
        """Exact input gradients (T, C, h, w) of the targets over the whole recorded
        ``level``, GroupNorm statistics included: one batched backward pass over the
        recorded forward pass, every target on its own copy of the level."""
        total: torch.Tensor | None = None
        rows = torch.arange(len(cells.ys))
        for name, branch in self.branches.items():
            g: torch.Tensor | None = None
            for o in self._used(branch, cells):
                conv, cot = branch.outputs[o], cells.cotangents[o]
                seed = cot.new_zeros((len(rows), cot.shape[1], *level.shape))
                seed[rows, :, cells.ys, cells.xs] = cot
                back = F.conv_transpose2d(seed, conv.weight, padding=conv.padding)
                g = back if g is None else g + back
            if g is None:
                continue
            for m, leaf in reversed(list(zip(branch.tower, level.branches[name], strict=True))):
                if isinstance(m, nn.Conv2d):
                    g = F.conv_transpose2d(g, m.weight, padding=m.padding)
                elif isinstance(leaf, ReluRecord):
                    g = g.masked_fill(leaf.output <= 0, 0)
                elif isinstance(leaf, NormRecord):
                    g = g * leaf.scale[None, :, None, None]
                    if isinstance(leaf, GroupNormRecord):
                        g = g - _statistics_term(g, leaf)
            total = g if total is None else total + g
        if total is None:
            raise ValueError(f"no cotangent for any head output; got {sorted(cells.cotangents)}")
        return total

    def window_gradients(
        self, level: RecordedLevel, cells: CellTargets, create_graph: bool = False
    ) -> WindowGradients:
        """The targets' input gradients on each cell's window of the recorded ``level``:
        (T, C, 2R+1, 2R+1) centred on (y_t, x_t), R = ``self.radius``; cells outside the
        level get zero gradient.

        ``create_graph=True`` keeps the autograd graph of the gradients themselves (with
        respect to the head's weights, the recorded forward pass and the cotangents), for
        losses on heat maps (Odam-Train); the GroupNorm statistics term is then not measured
        (``gn_error`` is zero).
        """
        if not any(self._used(b, cells) for b in self.branches.values()):
            raise ValueError(f"no cotangent for any head output; got {sorted(cells.cotangents)}")
        with torch.set_grad_enabled(create_graph):
            return self._windows(level, cells, create_graph)

    def _windows(
        self, level: RecordedLevel, cells: CellTargets, keep_graph: bool
    ) -> WindowGradients:
        ys, xs = cells.ys, cells.xs
        total: torch.Tensor | None = None
        gn_error = torch.zeros(len(ys), device=ys.device)
        for name, branch in self.branches.items():
            used = self._used(branch, cells)
            if not used:
                continue
            cot = torch.cat([cells.cotangents[o] for o in used], 1)
            runs, share, multiple = _shared_backwards(ys, xs, cot)
            if not len(runs):  # every target's cotangent on this branch is zero
                continue
            leaves = list(zip(branch.tower, level.branches[name], strict=True))
            run_cells = cells.select(runs, used)
            g, err = self._branch_windows(branch, leaves, level.shape, run_cells, keep_graph)
            if len(runs) < len(ys):  # targets that share a backward pass, or have none
                g = g[share.clamp(min=0)] * multiple[:, None, None, None]
                err = torch.where(share >= 0, err[share.clamp(min=0)], 0)
            gn_error = torch.maximum(gn_error, err)
            total = g if total is None else total + g
        if total is None:  # all cotangents are zero
            k = 2 * self.radius + 1
            branch = next(iter(self.branches.values()))
            weight = next(iter(branch.outputs.values())).weight
            return WindowGradients(weight.new_zeros(len(ys), branch.in_channels, k, k), gn_error)
        total = total * _inside_level(level.shape, ys, xs, self.radius, total)
        return WindowGradients(total, gn_error)

    def _branch_windows(
        self,
        branch: Branch,
        leaves: list[tuple[nn.Module, LeafRecord]],
        shape: tuple[int, int],
        cells: CellTargets,
        keep_graph: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One branch's windowed input gradients (T, C, 2R+1, 2R+1) and its largest relative
        GroupNorm statistics term per target (T,; zero with ``keep_graph``), for
        ``window_gradients``. No operation is in place, so the result can carry a graph."""
        ys, xs = cells.ys, cells.xs
        g = sum(
            F.conv_transpose2d(cot[:, :, None, None], branch.outputs[o].weight)
            for o, cot in cells.cotangents.items()
        )
        r = max(branch.outputs[o].kernel_size[0] for o in cells.cotangents) // 2
        gn_error = torch.zeros(len(ys), device=ys.device)
        inside = False  # whether g is zero on the window's cells off the level
        relu_output = None  # the windows of a ReLU output, while g is that ReLU's input gradient
        for m, leaf in reversed(leaves):
            if isinstance(leaf, ReluRecord):
                relu_output = gather_windows(leaf.output, ys, xs, r)
                g = g.masked_fill(relu_output <= 0, 0)
                inside = True
                continue
            following_relu, relu_output = relu_output, None
            if not inside:  # a layer's gradient has no cells off the level
                g = g * _inside_level(shape, ys, xs, r, g)
                inside = True
            if isinstance(m, nn.Conv2d):
                g = F.conv_transpose2d(g, m.weight)
                r += m.kernel_size[0] // 2
                inside = False
            elif isinstance(leaf, GroupNormRecord) and not keep_graph:
                gz = leaf.window_products(g, ys, xs, r, following_relu)
                g = g * leaf.scale[None, :, None, None]
                gn_error = torch.maximum(gn_error, _statistics_error(g, gz, leaf))
            elif isinstance(leaf, NormRecord):
                g = g * leaf.scale[None, :, None, None]
        return _pad(g, self.radius - r), gn_error

    def level_parts(
        self, level: RecordedLevel, feat: torch.Tensor, cells: CellTargets, pad: int = 0
    ) -> list[WindowPart]:
        """Input gradients of the targets on the recorded ``level`` whose input is ``feat``
        (C, h, w), with ``pad`` extra cells on every side. Windowed, except on a GroupNorm
        head for targets whose left-out statistics term exceeds
        ``level_tolerance(gn_tolerance, h * w)`` (relative norm) and for levels of at most
        ``exact_level_cells`` cells: those get the whole level, exactly."""
        h, w = level.shape
        exact_level_cells = self.exact_level_cells
        if exact_level_cells is None:
            exact_level_cells = (2 * self.radius + 1) ** 2
        parts = []
        if self.has_group_norm and h * w <= exact_level_cells:
            redo = torch.arange(len(cells.ys), device=cells.ys.device)
        else:
            windowed = self.window_gradients(level, cells)
            exact = windowed.gn_error > level_tolerance(self.gn_tolerance, h * w)
            keep, redo = torch.where(~exact)[0], torch.where(exact)[0]
            if len(keep):
                r = self.radius + pad
                grads = windowed.grads if len(keep) == len(cells.ys) else windowed.grads[keep]
                ys, xs = cells.ys[keep], cells.xs[keep]
                origin = torch.stack((ys, xs), 1).cpu() - r
                acts = gather_windows(feat, ys, xs, r)
                parts.append(WindowPart(keep, _pad(grads, pad), origin, acts))
        if len(redo):
            grads = self.level_gradients(level, cells.select(redo))
            acts = _pad(feat, pad)[None].expand(len(redo), -1, -1, -1)
            origin = torch.full((len(redo), 2), -pad, dtype=torch.long)
            parts.append(WindowPart(redo, _pad(grads, pad), origin, acts))
        return parts


def _run_and_record(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, LeafRecord]:
    """A tower leaf's output for input ``x`` (N, C, h, w) and what its backward needs, for
    the first image. GroupNorm runs as ``native_group_norm``, which also returns the
    statistics it used (the same output as the module)."""
    if isinstance(m, nn.GroupNorm):
        n, c, h, w = x.shape
        out, mean, rstd = torch.native_group_norm(
            x, m.weight, m.bias, n, c, h * w, m.num_groups, m.eps
        )
        scale = rstd[0].repeat_interleave(c // m.num_groups)
        scale = scale * m.weight if m.affine else scale
        shift = m.bias if m.affine else x.new_zeros(c)
        return out, GroupNormRecord(scale, x[0], mean[0], rstd[0], shift, m.eps)
    if isinstance(m, nn.BatchNorm2d):
        if m.training or m.running_var is None:
            raise NotImplementedError("windowed backward needs BatchNorm in eval mode")
        scale = torch.rsqrt(m.running_var + m.eps)
        return m(x), NormRecord(scale * m.weight if m.affine else scale)
    out = m(x)
    return out, ReluRecord(out[0]) if isinstance(m, nn.ReLU) else None


def _shared_backwards(
    ys: torch.Tensor, xs: torch.Tensor, cot: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets at the same cell whose cotangents (T, D) are multiples of one another (say the
    score of two classes on a branch that reads only the centreness) get the same multiples
    of one backward pass; a zero cotangent needs none. Returns the targets to run (U,),
    ascending, each target's position among them (T,; -1 for a zero cotangent) and its
    multiple of that run's gradient (T,)."""
    lead = (cot != 0).to(torch.uint8).argmax(1)
    alpha = cot.gather(1, lead[:, None])[:, 0]
    active = torch.where(alpha != 0)[0]
    position = torch.full_like(ys, -1)
    multiple = torch.zeros_like(alpha)
    if not len(active):
        return active, position, multiple
    unit = cot[active] / alpha[active, None]
    cell = torch.stack((ys[active], xs[active]), 1).to(cot.dtype)
    _, group = torch.unique(torch.cat((cell, unit), 1), dim=0, return_inverse=True)
    first = torch.full((int(group.max()) + 1,), len(active), device=group.device)
    first = first.scatter_reduce(0, group, torch.arange(len(active), device=group.device), "amin")
    runs, order = active[first].sort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    position[active] = rank[group]
    multiple[active] = alpha[active] / alpha[runs][rank[group]]
    return runs, position, multiple


def _pad(x: torch.Tensor, cells: int) -> torch.Tensor:
    """``x`` (..., h, w) with ``cells`` zero cells added on every side (``x`` itself for 0)."""
    return F.pad(x, (cells,) * 4) if cells else x


def _inside_level(
    shape: tuple[int, int], ys: torch.Tensor, xs: torch.Tensor, r: int, like: torch.Tensor
) -> torch.Tensor:
    """(T, 1, 2r+1, 2r+1): 1 on the cells of windows centred at (ys, xs) that lie on a level
    of ``shape`` (h, w), 0 off it."""
    offsets = torch.arange(-r, r + 1, device=ys.device)
    rows = ys[:, None] + offsets
    cols = xs[:, None] + offsets
    on_rows = (rows >= 0) & (rows < shape[0])
    on_cols = (cols >= 0) & (cols < shape[1])
    return (on_rows[:, :, None] & on_cols[:, None, :])[:, None].to(like.dtype)


def _statistics_term(g: torch.Tensor, leaf: GroupNormRecord) -> torch.Tensor:
    """The part of a GroupNorm input gradient that flows through the statistics:
    m1 + z * m2, m1 and m2 the means of g and g * z over each group's channels and cells.
    ``g`` (T, C, h, w) is (gamma/sigma) * the output gradient, z (C, h, w) the layer's
    normalised input."""
    t, groups, z = g.shape[0], len(leaf.mean), leaf.normalised()
    m1 = leaf.per_channel(g.reshape(t, groups, -1).mean(-1))[:, :, None, None]
    m2 = leaf.per_channel((g * z).reshape(t, groups, -1).mean(-1))[:, :, None, None]
    return m1 + z * m2


def _statistics_error(g: torch.Tensor, gz: torch.Tensor, leaf: GroupNormRecord) -> torch.Tensor:
    """Relative norm of the term a fixed-statistics GroupNorm backward leaves out.

    ``g`` (T, C, k, k) is the input gradient with the statistics held fixed on each target's
    window (zero off it) and ``gz`` (T, G) the sums of g * z over each group
    (``GroupNormRecord.window_products``). The exact gradient adds -(m1 + z * m2) on every
    cell of the level, m1 and m2 the means of g and g * z over the group's n channel-cells.
    Over a group, sum z = 0 and sum z^2 = n var / (var + eps), so the added term's squared
    norm is n (m1^2 + m2^2 (1 - eps rstd^2)). Returns ||added|| / ||g||, per target (T,).
    """
    t, c = g.shape[:2]
    groups = len(leaf.mean)
    n = leaf.input.shape[-1] * leaf.input.shape[-2] * (c // groups)
    m1 = g.reshape(t, groups, -1).sum(-1) / n
    m2 = gz / n
    added = (n * (m1**2 + m2**2 * (1 - leaf.eps * leaf.rstd**2))).sum(1)
    kept = (g * g).sum((1, 2, 3))
    return torch.sqrt(added / kept.clamp_min(torch.finfo(g.dtype).tiny))


def gather_windows(fmap: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, r: int) -> torch.Tensor:
    """Crops (T, C, 2r+1, 2r+1) of ``fmap`` (C, h, w) centred at (ys, xs), zeros outside
    (one indexing operation, differentiable)."""
    offsets = torch.arange(2 * r + 1, device=fmap.device)
    rows = (ys.to(fmap.device)[:, None] + offsets)[:, :, None]
    cols = (xs.to(fmap.device)[:, None] + offsets)[:, None, :]
    return _pad(fmap, r)[:, rows, cols].permute(1, 0, 2, 3)
