"""The windowed one-stage head backward: the exact whole-level pass and the measured size of
the GroupNorm statistics term, each against autograd through the real modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from xaibench.detectors.local_head import (
    GN_REFERENCE_CELLS,
    Branch,
    LocalConvHead,
    flatten_tower,
    level_tolerance,
)


def gn_tower(channels: int = 16, groups: int = 4, depth: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        norm = nn.GroupNorm(groups, channels)
        nn.init.uniform_(norm.weight, 0.5, 2.0)
        nn.init.normal_(norm.bias)
        layers += [nn.Conv2d(channels, channels, 3, padding=1), norm, nn.ReLU()]
    return nn.Sequential(*layers)


def recorded_head(towers: dict[str, nn.Sequential], outputs: dict[str, nn.Conv2d], x):
    head = LocalConvHead(
        {name: Branch(flatten_tower(towers[name]), {name: outputs[name]}) for name in towers}
    )
    head.records = {name: [] for name in head.branches}
    with torch.no_grad():
        head.forward_level(x, record=True)
    return head


def test_level_gradients_equal_autograd_with_group_norm_statistics() -> None:
    torch.manual_seed(0)
    towers = {"cls": gn_tower(), "reg": gn_tower()}
    outputs = {"cls": nn.Conv2d(16, 5, 3, padding=1), "reg": nn.Conv2d(16, 4, 3, padding=1)}
    x = torch.randn(1, 16, 9, 11)
    head = recorded_head(towers, outputs, x)
    ys, xs = torch.tensor([0, 4, 8]), torch.tensor([3, 10, 0])  # corners and edges included
    cot = {"cls": torch.randn(3, 5), "reg": torch.randn(3, 4)}
    ours = head.level_gradients(0, (9, 11), ys, xs, cot, head.records)
    for t in range(3):
        leaf = x.clone().requires_grad_(True)
        value = sum(
            (outputs[n](towers[n](leaf))[0, :, ys[t], xs[t]] * cot[n][t]).sum() for n in towers
        )
        (reference,) = torch.autograd.grad(value, leaf)
        torch.testing.assert_close(ours[t], reference[0], atol=1e-6, rtol=1e-5)


def test_gn_error_is_the_relative_norm_of_the_statistics_term() -> None:
    """With one GroupNorm layer the windowed cotangent reaching it is exact, so the left-out
    term is autograd's input gradient of the norm layer minus the fixed-statistics one."""
    torch.manual_seed(1)
    norm = nn.GroupNorm(4, 16)
    nn.init.uniform_(norm.weight, 0.5, 2.0)
    tower = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), norm, nn.ReLU())
    out = nn.Conv2d(16, 3, 3, padding=1)
    x = torch.randn(1, 16, 12, 10)
    head = recorded_head({"cls": tower}, {"cls": out}, x)
    ys, xs = torch.tensor([5, 0]), torch.tensor([4, 9])
    cot = torch.randn(2, 3)
    measured = head.window_gradients(0, ys, xs, {"cls": cot}, head.records).gn_error
    z = tower[0](x).detach().requires_grad_(True)
    sigma = torch.sqrt(z.reshape(4, -1).var(-1, unbiased=False) + norm.eps)
    for t in range(2):
        y = norm(z)
        value = (out(torch.relu(y))[0, :, ys[t], xs[t]] * cot[t]).sum()
        dz, dy = torch.autograd.grad(value, [z, y])
        fixed = dy * (norm.weight / sigma.repeat_interleave(4))[None, :, None, None]
        expected = (dz - fixed).norm() / fixed.norm()
        torch.testing.assert_close(measured[t], expected, atol=1e-6, rtol=1e-4)
    assert bool((measured > 0.01).all())  # a 12 x 10 level: the term is far from negligible


def test_levels_no_larger_than_a_window_take_the_exact_route() -> None:
    """Two 3x3 convolutions: R = 2, a window of 5 x 5 cells. A 4 x 5 level fits in one, so its
    targets get whole-level exact gradients however small their statistics term; a 6 x 6
    level does not, so with an infinite tolerance its targets stay on windows."""
    torch.manual_seed(2)
    tower = gn_tower(depth=1)
    out = nn.Conv2d(16, 3, 3, padding=1)
    for (h, w), exact in (((4, 5), True), ((6, 6), False)):
        x = torch.randn(1, 16, h, w)
        head = recorded_head({"cls": tower}, {"cls": out}, x)
        ys, xs = torch.tensor([1, h - 1]), torch.tensor([2, 0])
        cot = {"cls": torch.randn(2, 3)}
        parts = head.level_parts(0, x[0], ys, xs, cot, head.records, float("inf"), None, pad=0)
        ((rows, grads, origin, _),) = parts
        assert rows.tolist() == [0, 1]
        if exact:
            assert grads.shape[-2:] == (h, w) and origin.tolist() == [[0, 0], [0, 0]]
            reference = head.level_gradients(0, (h, w), ys, xs, cot, head.records)
            torch.testing.assert_close(grads, reference)
        else:
            assert grads.shape[-2:] == (5, 5)


def test_the_tolerance_shrinks_with_the_level_size() -> None:
    assert level_tolerance(0.03, GN_REFERENCE_CELLS) == 0.03
    assert level_tolerance(0.03, GN_REFERENCE_CELLS // 8) == pytest.approx(0.06)
    assert level_tolerance(0.03, GN_REFERENCE_CELLS * 8) == pytest.approx(0.015)
