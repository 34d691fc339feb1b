"""The ``odam-train`` recipe on tiny detectors: the losses on known numbers, the batched
differentiable maps against a direct per-prediction autograd computation, and the direction
training moves the maps in on a hand-made two-object scene (seconds on a CPU)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from xaibench.detectors.odam_train import (
    OdamTrainConfig,
    PositiveMaps,
    consistency_separation,
    fcos_losses_and_maps,
    frcnn_losses_and_maps,
    odam_terms,
    train_odam,
)
from xaibench.detectors.training import BaselineConfig, train
from xaibench.detectors.zoo import build_small_fcos, build_small_frcnn

from xaibench.registry import RECIPES
from xaibench.types import Instance, Sample

TINY = {"image_size": 64, "widths": (8, 8, 16, 16, 32), "fpn_channels": 32}
BOXES = torch.tensor([[8.0, 10.0, 30.0, 34.0], [24.0, 18.0, 52.0, 50.0]])
LABELS = torch.tensor([1, 2])


def tiny_fcos() -> nn.Module:
    torch.manual_seed(0)
    return build_small_fcos(4, head_convs=1, **TINY).train()


def tiny_frcnn() -> nn.Module:
    torch.manual_seed(0)
    return build_small_frcnn(4, representation=32, **TINY).train()


def small_case() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    torch.manual_seed(1)
    return [torch.rand(3, 64, 64)], [{"boxes": BOXES.clone(), "labels": LABELS.clone()}]


def test_registered_as_odam_train() -> None:
    assert RECIPES.get("odam-train") is train_odam


def test_losses_on_known_maps() -> None:
    # GT 0: a (the anchor, IoU 0.9) and b; GT 1: c alone
    a, b, c = [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]
    maps = torch.tensor([a, b, c])
    l_con, l_sep, pairs = consistency_separation(
        maps, torch.tensor([0, 0, 1]), torch.tensor([0.9, 0.5, 0.7])
    )
    eps = 1e-4
    # L_con: (a, a) clamped to 1 - eps, (a, b) = 0.6, (c, c) clamped
    assert float(l_con) == pytest.approx(-2 * math.log(1 - eps) - math.log(0.6), rel=1e-5)
    # L_sep: (a, c) = 0 clamped to eps, (c, a) likewise, (c, b) = 0.8
    assert float(l_sep) == pytest.approx(-2 * math.log(1 - eps) - math.log(0.2), rel=1e-5)
    assert pairs == 6
    positives = [
        PositiveMaps(
            maps,
            torch.tensor([0, 0, 1]),
            torch.tensor([0.9, 0.5, 0.7]),
            torch.tensor([1, 1, 2]),
            (1, 2),
        )
    ] * 2
    terms = odam_terms(positives, weight=0.5, clamp=eps)
    assert float(terms["odam_con"]) == pytest.approx(0.5 * 2 * float(l_con) / 12, rel=1e-6)
    assert float(terms["odam_sep"]) == pytest.approx(0.5 * 2 * float(l_sep) / 12, rel=1e-6)


def test_the_anchor_is_the_positive_of_highest_iou() -> None:
    maps = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    owner = torch.tensor([0, 0, 0])
    l_con_a, _, _ = consistency_separation(maps, owner, torch.tensor([0.9, 0.2, 0.1]))
    l_con_c, _, _ = consistency_separation(maps, owner, torch.tensor([0.1, 0.2, 0.9]))
    eps_term = -math.log(1 - 1e-4)
    assert float(l_con_a) == pytest.approx(eps_term - math.log(0.6) - math.log(1e-4), rel=1e-5)
    assert float(l_con_c) == pytest.approx(eps_term - math.log(0.8) - math.log(1e-4), rel=1e-5)


def _fixed_statistics_branch(tower: nn.Sequential, a: torch.Tensor, a_var: torch.Tensor):
    """The tower on ``a_var`` with each GroupNorm normalising by the statistics of the same
    layer run on ``a``: d(output)/d(a_var) holds the statistics fixed, as ODAM's fast path,
    while the statistics keep their graph (second order)."""
    x, v = a, a_var
    for m in tower:
        if isinstance(m, nn.GroupNorm):
            n = x.shape[0]
            groups = x.reshape(n, m.num_groups, -1)
            mean = groups.mean(-1, keepdim=True)
            rstd = torch.rsqrt(groups.var(-1, unbiased=False, keepdim=True) + m.eps)
            v = ((v.reshape(n, m.num_groups, -1) - mean) * rstd).reshape_as(v)
            v = v * m.weight[None, :, None, None] + m.bias[None, :, None, None]
            x = m(x)
        else:
            x, v = m(x), m(v)
    return v


def _direct_fcos_maps(model, images, targets, positives: PositiveMaps) -> torch.Tensor:
    """One autograd.grad(create_graph=True) per positive through the whole level."""
    image_list, _ = model.transform(images, targets)
    feats = list(model.backbone(image_list.tensors).values())
    head = model.head
    grid = tuple(math.ceil(s / 8) for s in image_list.tensors.shape[-2:])
    maps = []
    for lv, y, x, c in zip(
        positives.level, positives.y, positives.x, positives.labels, strict=True
    ):
        a = feats[int(lv)]
        a_var = a * 1.0
        cls = head.classification_head
        reg = head.regression_head
        logits = cls.cls_logits(_fixed_statistics_branch(cls.conv, a, a_var))
        ctr = reg.bbox_ctrness(_fixed_statistics_branch(reg.conv, a, a_var))
        score = torch.sqrt(torch.sigmoid(logits[0, c, y, x]) * torch.sigmoid(ctr[0, 0, y, x]))
        (g,) = torch.autograd.grad(score, a_var, create_graph=True)
        h = torch.relu((g * a).sum(1, keepdim=True))
        maps.append(F.interpolate(h, size=grid, mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(maps)


def _direct_loss(maps: torch.Tensor, owner: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Eq. 3 written out pair by pair, divided by the number of pairs, weight 0.5."""
    unit = maps.flatten(1) / maps.flatten(1).norm(dim=1, keepdim=True)
    total, pairs = 0.0, 0
    for p in owner.unique().tolist():
        mine = [i for i in range(len(owner)) if owner[i] == p]
        best = max(mine, key=lambda i: float(quality[i]))
        for n in range(len(owner)):
            cos = (unit[best] @ unit[n]).clamp(1e-4, 1 - 1e-4)
            total = total - (torch.log(cos) if n in mine else torch.log(1 - cos))
            pairs += 1
    return 0.5 * total / pairs


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _compare_gradients(fast: torch.Tensor, direct: torch.Tensor, model: nn.Module) -> None:
    assert float(fast.detach()) == pytest.approx(float(direct.detach()), rel=1e-5)
    params = _params(model)
    g_fast = torch.autograd.grad(fast, params, retain_graph=True, allow_unused=True)
    g_direct = torch.autograd.grad(direct, params, allow_unused=True)
    flat_fast = torch.cat([g.flatten() for g in g_fast if g is not None])
    flat_direct = torch.cat([g.flatten() for g in g_direct if g is not None])
    assert flat_fast.shape == flat_direct.shape and flat_fast.abs().sum() > 0
    torch.testing.assert_close(flat_fast, flat_direct, rtol=1e-4, atol=1e-6)


def test_fcos_maps_loss_and_gradient_match_direct_autograd() -> None:
    model = tiny_fcos()
    images, targets = small_case()
    _, (positives,) = fcos_losses_and_maps(model, images, targets)
    assert set(positives.owner.tolist()) == {0, 1} and len(positives.owner) > 4
    fast = odam_terms([positives], 0.5, 1e-4)
    fast = fast["odam_con"] + fast["odam_sep"]

    direct_maps = _direct_fcos_maps(model, images, targets, positives)
    unit = F.normalize(direct_maps.flatten(1), dim=1)
    torch.testing.assert_close(positives.maps, unit, rtol=1e-4, atol=1e-6)
    direct = _direct_loss(direct_maps, positives.owner, positives.quality)
    _compare_gradients(fast, direct, model)


def test_frcnn_maps_loss_and_gradient_match_direct_autograd() -> None:
    from xaibench.detectors.odam_train import _boxes_to_grid

    model = tiny_frcnn()
    images, targets = small_case()
    torch.manual_seed(2)
    _, (positives,) = frcnn_losses_and_maps(model, images, targets)
    assert set(positives.owner.tolist()) == {0, 1}
    fast = odam_terms([positives], 0.5, 1e-4)
    fast = fast["odam_con"] + fast["odam_sep"]

    torch.manual_seed(2)  # the same RoI sampling, then one backward per positive RoI
    image_list, tt = model.transform(images, targets)
    features = model.backbone(image_list.tensors)
    proposals, _ = model.rpn(image_list, features, tt)
    heads = model.roi_heads
    proposals, _, labels, _ = heads.select_training_samples(proposals, tt)
    pooled = heads.box_roi_pool(features, proposals, image_list.image_sizes)
    logits, _ = heads.box_predictor(heads.box_head(pooled))
    maps = []
    for row in positives.rows.tolist():
        score = F.softmax(logits[row], -1)[labels[0][row]]
        (g,) = torch.autograd.grad(score, pooled, create_graph=True)
        maps.append(torch.relu((g[row] * pooled[row]).sum(0)))
    grid = tuple(math.ceil(s / 8) for s in image_list.tensors.shape[-2:])
    placed = _boxes_to_grid(torch.stack(maps), proposals[0][positives.rows], grid, 8)
    direct = _direct_loss(placed, positives.owner, positives.quality)
    _compare_gradients(fast, direct, model)


def two_object_scene() -> Sample:
    """Two overlapping textured squares on grey: a red one and a blue one below right."""
    rng = np.random.default_rng(0)
    image = np.full((64, 64, 3), 128, np.uint8)
    image[10:34, 8:30] = [200, 40, 40]
    image[18:50, 24:52] = [40, 60, 200]
    image = np.clip(image + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
    return Sample(
        image=image,
        image_id=1,
        instances=[
            Instance(box=b.numpy(), label=int(lb)) for b, lb in zip(BOXES, LABELS, strict=True)
        ],
    )


def _map_similarities(model: nn.Module, sample: Sample) -> tuple[float, float]:
    """Mean cos of each GT's anchor map with its own positives (consistency) and with the
    other GT's positives (separation; lower is better), on a copy in train mode."""
    from xaibench.detectors.training import sample_to_target

    image, target = sample_to_target(sample)
    probe = copy.deepcopy(model).train()
    _, (pos,) = fcos_losses_and_maps(probe, [image], [target])
    own, other = [], []
    for p in pos.owner.unique().tolist():
        mine = torch.where(pos.owner == p)[0]
        best = mine[pos.quality[mine].argmax()]
        cos = pos.maps.detach() @ pos.maps[best].detach()
        own.append(cos[pos.owner == p].mean())
        other.append(cos[pos.owner != p].mean())
    return float(torch.stack(own).mean()), float(torch.stack(other).mean())


def test_training_makes_maps_of_one_object_alike_and_of_two_objects_apart() -> None:
    scenes = [two_object_scene()] * 4
    common = {
        "batch_size": 2,
        "warmup_iterations": 0,
        "hflip": 0.0,
        "optimizer": "adamw",
        "lr": 2e-3,
        "weight_decay": 0.0,
        "schedule": "constant",
    }
    model = tiny_fcos()
    train(model, scenes, BaselineConfig(iterations=30, **common), progress=False)
    before = _map_similarities(model, scenes[0])

    baseline, odam = copy.deepcopy(model), copy.deepcopy(model)
    train(baseline, scenes, BaselineConfig(iterations=30, **common), progress=False)
    config = OdamTrainConfig(iterations=30, odam_weight=2.0, **common)
    result = train_odam(odam, scenes, config, progress=False)
    assert result.iterations == 30 and not odam.training
    after_baseline = _map_similarities(baseline, scenes[0])
    after_odam = _map_similarities(odam, scenes[0])

    # separation: maps of different objects move apart, more than plain training moves them
    assert after_odam[1] < before[1] - 0.05
    assert after_odam[1] < after_baseline[1] - 0.05
    # consistency: maps of one object become more alike than with plain training
    assert after_odam[0] > max(before[0], after_baseline[0]) + 0.1
