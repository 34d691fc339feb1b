"""The ``odam-train`` recipe (Zhao & Chan, ICLR 2023, Sec. 3.2 and App. A.1): the detector's
own losses plus heat-map consistency and separation losses on ODAM maps.

For every image, the positive predictions (the locations FCOS assigns to a GT; the sampled
RoIs of Faster R-CNN whose label is a GT's) are explained by ODAM with their confidence score
for their GT's class as the target, on the layer the inference fast path uses (FCOS: the FPN
level of the prediction; Faster R-CNN: the RoI-pooled features). The maps are placed on one
grid over the image (``map_stride`` input pixels per cell, the padding cropped), vectorised
and unit-normalised. For GT p, the anchor H_best is its positive whose predicted box has the
highest IoU with the GT box, and

    L_con = sum_p sum_{n in P(p)} -log cos(H_best(p), H_n)
    L_sep = sum_p sum_{m not in P(p)} -log(1 - cos(H_best(p), H_m))

with cos clamped to [c, 1 - c] (c = 1e-4, the reference code), the pairs being those of one
image (the anchor itself is one of P(p), as in Eq. 3). The loss is the detector's plus
``weight * (L_con + L_sep) / N``, N the number of pairs in the batch; the reference weights
are 0.5 for FCOS and 0.2 for Faster R-CNN.

Differentiable maps, without a backward pass per prediction: the maps need d(score)/dA for
every positive, and the loss needs the gradient of those gradients (second order).

* FCOS: the head runs through ``LocalConvHead`` (as on the inference fast path), recording
  per image the ReLU outputs and GroupNorm scales with their autograd graph. The cotangent of
  every positive's score with respect to the raw head outputs at its cell comes from one
  ``torch.autograd.grad(..., create_graph=True)``, and ``LocalConvHead.window_gradients(...,
  create_graph=True)`` back-propagates all of them at once, each on its own window of the
  level (transposed convolutions with the head's weights, ReLU masks, normalisation scales),
  as ordinary differentiable tensor operations. So the maps H = ReLU(sum_c g_c A_c) carry a
  graph to the head's weights, the GroupNorm statistics and the features, and the loss's
  backward is the second-order gradient. As on the inference fast path, GroupNorm statistics
  are held fixed in the first-order gradient (the term through them is dense over the level;
  ``local_head`` measures it), while the second-order gradient does flow through them.
* Faster R-CNN: each RoI's outputs depend only on its own row of the RoI-pooled features, so
  one ``torch.autograd.grad(scores.sum(), pooled, create_graph=True)`` gives every positive's
  gradient on its own row (the inference fast path, with the graph kept). This holds for box
  heads without batch statistics (torchvision's ``TwoMLPHead``; a BatchNorm head in train mode
  couples the RoIs of a batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.ops import box_iou
from xaibench.detectors.local_head import CellTargets, gather_windows
from xaibench.detectors.torchvision import one_stage_local_head
from xaibench.detectors.training import (
    BaselineConfig,
    FitRecipe,
    Images,
    StepLosses,
    Targets,
)

from xaibench.registry import RECIPES

REFERENCE_WEIGHTS = {"fcos": 0.5, "frcnn": 0.2}
"""Weight of (L_con + L_sep) / N in the reference code, per detector family."""


class OdamTrainConfig(BaselineConfig):
    """Hyper-parameters of ``odam-train``: the baseline's, plus the Odam-Train losses'."""

    odam_weight: float | None = Field(
        None, ge=0, description="weight of (L_con + L_sep) / N; None: 0.5 FCOS, 0.2 Faster R-CNN"
    )
    cos_clamp: float = Field(1e-4, gt=0, lt=0.5, description="cos clamped to [c, 1 - c]")
    map_stride: int = Field(8, ge=1, description="input pixels per cell of the maps' grid")


@dataclass
class PositiveMaps:
    """One image's positives: unit-normalised maps (T, D) on the common grid (``grid`` (h, w)
    cells of ``map_stride`` resized-input pixels, D = h * w), the index of each one's GT
    (T,) and the IoU of its predicted box with that GT (T,), and where it came from: FCOS
    ``level``, ``y``, ``x`` (T,) of its cell, or Faster R-CNN ``rows`` (T,) into the batch's
    sampled RoIs; ``labels`` (T,) the class explained."""

    maps: torch.Tensor
    owner: torch.Tensor
    quality: torch.Tensor
    labels: torch.Tensor
    grid: tuple[int, int]
    level: torch.Tensor | None = None
    y: torch.Tensor | None = None
    x: torch.Tensor | None = None
    rows: torch.Tensor | None = None


LossesAndMaps = tuple[dict[str, torch.Tensor], list[PositiveMaps]]
"""A batch's detector training losses by name and, per image, its positives' maps."""


def consistency_separation(
    maps: torch.Tensor, owner: torch.Tensor, quality: torch.Tensor, clamp: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """L_con, L_sep (sums, Eq. 3) and the number of pairs for one image's positives.

    ``maps`` (T, D) unit-normalised, ``owner`` (T,) each one's GT, ``quality`` (T,) the IoU
    of its predicted box with that GT: the anchor of a GT is its positive of highest quality.
    cos is clamped to [clamp, 1 - clamp]."""
    if len(maps) == 0:
        zero = maps.sum()
        return zero, zero, 0
    gts, inverse = owner.unique(return_inverse=True)
    # the first positive of the highest quality of each GT
    masked = torch.where(
        inverse[None] == torch.arange(len(gts), device=owner.device)[:, None],
        quality[None].float(),
        -math.inf,
    )
    best = masked.argmax(1)  # (G,)
    cos = (maps[best].float() @ maps.float().T).clamp(clamp, 1 - clamp)  # (G, T)
    same = inverse[None] == torch.arange(len(gts), device=owner.device)[:, None]
    l_con = -torch.log(cos[same]).sum()
    l_sep = -torch.log(1 - cos[~same]).sum()
    return l_con, l_sep, int(same.numel())


def odam_terms(
    positives: Sequence[PositiveMaps], weight: float, clamp: float
) -> dict[str, torch.Tensor]:
    """``{"odam_con": weight * L_con / N, "odam_sep": weight * L_sep / N}`` over a batch's
    images, N the number of pairs in the batch (zero terms without pairs)."""
    parts = [consistency_separation(p.maps, p.owner, p.quality, clamp) for p in positives]
    pairs = sum(n for _, _, n in parts)
    con = sum(c for c, _, _ in parts)
    sep = sum(s for _, s, _ in parts)
    scale = weight / max(pairs, 1)
    return {"odam_con": con * scale, "odam_sep": sep * scale}


def _unit(maps: torch.Tensor) -> torch.Tensor:
    """Maps (T, h, w) as unit vectors (T, h * w)."""
    return F.normalize(maps.flatten(1).float(), dim=1)


def _grid(padded: tuple[int, int], stride: int) -> tuple[int, int]:
    return math.ceil(padded[0] / stride), math.ceil(padded[1] / stride)


def _valid(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Cells of the common grid that cover an image of ``size`` (resized pixels)."""
    return math.ceil(size[0] / stride), math.ceil(size[1] / stride)


# ---------------------------------------------------------------------------------------------
# FCOS


def fcos_losses_and_maps(
    model: FCOS, images: Images, targets: Targets, map_stride: int = 8
) -> LossesAndMaps:
    """torchvision FCOS's training losses and, per image, the differentiable ODAM maps of
    its positive locations' scores (see the module docstring)."""
    image_list, targets = model.transform(images, targets)
    features = list(model.backbone(image_list.tensors).values())
    head = one_stage_local_head(model)
    raws, records = [], []
    for i in range(len(images)):
        raw, record = head.forward([f[i : i + 1] for f in features], record=True)
        raws.append(raw)
        records.append(record)
    flat = {
        name: torch.cat([torch.cat([_flatten(level[name]) for level in raw], 1) for raw in raws], 0)
        for name in raws[0][0]
    }
    head_outputs = {
        "cls_logits": flat["cls_logits"],
        "bbox_regression": F.relu(flat["bbox_reg"]),
        "bbox_ctrness": flat["bbox_ctrness"],
    }
    anchors = model.anchor_generator(image_list, features)
    per_level = [f.shape[-2] * f.shape[-1] for f in features]
    losses, matched = _fcos_losses(model, targets, head_outputs, anchors, per_level)

    padded = tuple(image_list.tensors.shape[-2:])
    grid = _grid(padded, map_stride)
    offsets = torch.tensor([0, *per_level], device=anchors[0].device).cumsum(0)
    out = []
    for i, (raw, rec) in enumerate(zip(raws, records, strict=True)):
        positive = torch.where(matched[i] >= 0)[0]
        owner = matched[i][positive]
        labels = targets[i]["labels"][owner]
        level = torch.searchsorted(offsets, positive, right=True) - 1
        local = positive - offsets[level]
        widths = torch.tensor([f.shape[-1] for f in features], device=level.device)[level]
        y, x = local // widths, local % widths
        with torch.no_grad():
            boxes = model.box_coder.decode(
                head_outputs["bbox_regression"][i, positive].detach().float(),
                anchors[i][positive],
            )
            gt = targets[i]["boxes"][owner]
            quality = box_iou(boxes, gt).diagonal() if len(gt) else boxes.new_zeros(0)
        maps = boxes.new_zeros(len(positive), *grid)
        for lv in level.unique().tolist():
            rows = torch.where(level == lv)[0]
            maps = maps.index_put(
                (rows,),
                _fcos_level_maps(
                    head, lv, raw[lv], rec, features[lv][i], y[rows], x[rows], labels[rows], grid
                ).to(maps.dtype),
            )
        valid = _valid(tuple(image_list.image_sizes[i]), map_stride)
        maps = maps[:, : valid[0], : valid[1]]
        out.append(PositiveMaps(_unit(maps), owner, quality, labels, valid, level=level, y=y, x=x))
    return losses, out


def _flatten(value: torch.Tensor) -> torch.Tensor:
    """A level's raw output (N, C, h, w) in torchvision's flat order (N, h * w, C) (one
    anchor per location, as in FCOS)."""
    n, c, h, w = value.shape
    return value.permute(0, 2, 3, 1).reshape(n, h * w, c)


def _fcos_losses(model, targets, head_outputs, anchors, per_level):
    """``FCOS.compute_loss`` (torchvision's location assignment and losses) and the
    per-image GT index of every location (-1: background) it assigned."""
    captured: list[torch.Tensor] = []
    own = model.head.compute_loss

    def capture(targets, outputs, anchors, matched_idxs):
        captured.extend(matched_idxs)
        return own(targets, outputs, anchors, matched_idxs)

    model.head.compute_loss = capture
    try:
        losses = model.compute_loss(targets, head_outputs, anchors, per_level)
    finally:
        del model.head.compute_loss
    return losses, captured


def _fcos_level_maps(head, level, raw, records, feature, ys, xs, labels, grid):
    """ODAM maps (T, *grid) of the scores of positives at cells (ys, xs) of one level
    (``feature`` (C, h, w)), with the graph kept."""
    cells = {name: value[0][:, ys, xs].T for name, value in raw.items()}
    rows = torch.arange(len(ys), device=ys.device)
    scores = torch.sqrt(
        torch.sigmoid(cells["cls_logits"][rows, labels])
        * torch.sigmoid(cells["bbox_ctrness"][:, 0])
    )
    used = ["cls_logits", "bbox_ctrness"]
    grads = torch.autograd.grad(scores.sum(), [cells[n] for n in used], create_graph=True)
    shape = (int(feature.shape[-2]), int(feature.shape[-1]))
    targets = CellTargets(ys, xs, dict(zip(used, grads, strict=True)))
    windows = head.window_gradients(records[level], targets, create_graph=True).grads
    r = head.radius
    acts = gather_windows(feature, ys, xs, r)
    window_maps = torch.relu((windows * acts).sum(1))  # (T, 2r+1, 2r+1)
    k = 2 * r + 1
    offs = torch.arange(k, device=ys.device)
    canvas = window_maps.new_zeros(len(ys), shape[0] + 2 * r, shape[1] + 2 * r)
    canvas = canvas.index_put(
        (rows[:, None, None], (ys[:, None] + offs)[:, :, None], (xs[:, None] + offs)[:, None, :]),
        window_maps,
    )
    level_maps = canvas[:, r : r + shape[0], r : r + shape[1]]
    return F.interpolate(level_maps[:, None], size=grid, mode="bilinear", align_corners=False)[:, 0]


# ---------------------------------------------------------------------------------------------
# Faster R-CNN


def frcnn_losses_and_maps(
    model: FasterRCNN, images: Images, targets: Targets, map_stride: int = 8
) -> LossesAndMaps:
    """torchvision Faster R-CNN's training losses and, per image, the differentiable ODAM
    maps (RoI-pooled features) of its positive sampled RoIs' class scores."""
    image_list, targets = model.transform(images, targets)
    features = model.backbone(image_list.tensors)
    proposals, proposal_losses = model.rpn(image_list, features, targets)
    heads = model.roi_heads
    proposals, matched, labels, regression_targets = heads.select_training_samples(
        proposals, targets
    )
    pooled = heads.box_roi_pool(features, proposals, image_list.image_sizes)
    logits, regression = heads.box_predictor(heads.box_head(pooled))
    loss_classifier, loss_box_reg = fastrcnn_loss(logits, regression, labels, regression_targets)
    losses = {**proposal_losses, "loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}

    all_labels = torch.cat(labels)
    positive = torch.where(all_labels > 0)[0]
    cls = all_labels[positive]
    scores = F.softmax(logits[positive].float(), -1)[torch.arange(len(positive)), cls]
    (g_pooled,) = torch.autograd.grad(scores.sum(), pooled, create_graph=True)
    roi_maps = torch.relu((g_pooled[positive] * pooled[positive]).sum(1))  # (T, k, k)

    padded = tuple(image_list.tensors.shape[-2:])
    grid = _grid(padded, map_stride)
    counts = [len(p) for p in proposals]
    starts = torch.tensor([0, *counts]).cumsum(0).tolist()
    out = []
    for i in range(len(images)):
        mine = torch.where((positive >= starts[i]) & (positive < starts[i + 1]))[0]
        rows = positive[mine]
        local = rows - starts[i]
        owner = matched[i][local]
        rois = proposals[i][local]
        with torch.no_grad():
            deltas = regression[rows].view(len(rows), -1, 4)[torch.arange(len(rows)), cls[mine]]
            boxes = heads.box_coder.decode_single(deltas.detach().float(), rois.float())
            quality = box_iou(boxes, targets[i]["boxes"][owner]).diagonal()
        valid = _valid(tuple(image_list.image_sizes[i]), map_stride)
        maps = _boxes_to_grid(roi_maps[mine], rois, grid, map_stride)[:, : valid[0], : valid[1]]
        out.append(PositiveMaps(_unit(maps), owner, quality, cls[mine], valid, rows=rows))
    return losses, out


def _boxes_to_grid(
    maps: torch.Tensor, boxes: torch.Tensor, grid: tuple[int, int], stride: int
) -> torch.Tensor:
    """RoI grids (T, k, k) spread over their boxes (T, 4, resized pixels) on the cells
    (centres at (i + 0.5) * stride px) of ``grid`` -> (T, h, w); zero outside each box
    (bilinear, as ``InputGeometry.boxes_grid_to_original`` places them on images)."""
    t = len(maps)
    ys = (torch.arange(grid[0], device=maps.device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(grid[1], device=maps.device, dtype=torch.float32) + 0.5) * stride
    x1, y1, x2, y2 = boxes.float().unbind(1)
    gx = (xs[None] - x1[:, None]) / (x2 - x1).clamp(min=1e-6)[:, None] * 2 - 1
    gy = (ys[None] - y1[:, None]) / (y2 - y1).clamp(min=1e-6)[:, None] * 2 - 1
    sampling = torch.stack(
        (gx[:, None, :].expand(t, *grid), gy[:, :, None].expand(t, *grid)), dim=-1
    )
    out = F.grid_sample(
        maps[:, None].float(), sampling, mode="bilinear", padding_mode="border", align_corners=False
    )[:, 0]
    inside = (gx.abs() <= 1)[:, None, :] & (gy.abs() <= 1)[:, :, None]
    return out * inside


def step_losses(
    model: nn.Module,
    images: Images,
    targets: Targets,
    weight: float,
    clamp: float,
    map_stride: int,
) -> dict[str, torch.Tensor]:
    """One batch's detector losses (FCOS or Faster R-CNN) plus the Odam-Train terms."""
    losses_and_maps = fcos_losses_and_maps if family(model) == "fcos" else frcnn_losses_and_maps
    losses, positives = losses_and_maps(model, images, targets, map_stride)
    return {**losses, **odam_terms(positives, weight, clamp)}


# ---------------------------------------------------------------------------------------------
# The recipe


def family(model: nn.Module) -> str:
    """``"fcos"`` or ``"frcnn"``; a clear error for models the recipe does not train."""
    if isinstance(model, FCOS):
        return "fcos"
    if isinstance(model, FasterRCNN):
        return "frcnn"
    raise TypeError(
        f"odam-train trains torchvision FCOS and FasterRCNN models, not {type(model).__name__}"
    )


def odam_train_losses(model: nn.Module, config: OdamTrainConfig) -> StepLosses:
    """``step_losses`` with the settings of ``config`` (the reference weight of the model's
    family unless ``odam_weight`` is given)."""
    weight = REFERENCE_WEIGHTS[family(model)] if config.odam_weight is None else config.odam_weight
    return partial(step_losses, weight=weight, clamp=config.cos_clamp, map_stride=config.map_stride)


train_odam = RECIPES.register(
    "odam-train", FitRecipe("odam-train", OdamTrainConfig, odam_train_losses)
)
"""The ``odam-train`` recipe: trains a torchvision FCOS or Faster R-CNN in place and returns
it in eval mode; checkpoints, resuming, devices and progress as ``training.fit``."""
