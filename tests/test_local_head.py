"""The windowed one-stage head backward: the exact whole-level pass and the measured size of
the GroupNorm statistics term, each against autograd through the real modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from xaibench.detectors.local_head import (
    GN_REFERENCE_CELLS,
    Branch,
    CellTargets,
    LocalConvHead,
    _shared_backwards,
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
        {name: Branch(flatten_tower(towers[name]), {name: outputs[name]}) for name in towers},
        gn_tolerance=float("inf"),
    )
    with torch.no_grad():
        _, head.records = head.forward([x], record=True)
    return head


def test_level_gradients_equal_autograd_with_group_norm_statistics() -> None:
    torch.manual_seed(0)
    towers = {"cls": gn_tower(), "reg": gn_tower()}
    outputs = {"cls": nn.Conv2d(16, 5, 3, padding=1), "reg": nn.Conv2d(16, 4, 3, padding=1)}
    x = torch.randn(1, 16, 9, 11)
    head = recorded_head(towers, outputs, x)
    ys, xs = torch.tensor([0, 4, 8]), torch.tensor([3, 10, 0])  # corners and edges included
    cot = {"cls": torch.randn(3, 5), "reg": torch.randn(3, 4)}
    ours = head.level_gradients(head.records[0], CellTargets(ys, xs, cot))
    for t in range(3):
        leaf = x.clone().requires_grad_(True)
        value = sum(
            (outputs[n](towers[n](leaf))[0, :, ys[t], xs[t]] * cot[n][t]).sum() for n in towers
        )
        (reference,) = torch.autograd.grad(value, leaf)
        torch.testing.assert_close(ours[t], reference[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("relu", [True, False], ids=["relu-after", "no-relu"])
def test_gn_error_is_the_relative_norm_of_the_statistics_term(relu: bool) -> None:
    """With one GroupNorm layer the windowed cotangent reaching it is exact, so the left-out
    term is autograd's input gradient of the norm layer minus the fixed-statistics one. With
    a ReLU after the norm layer the measure reads the ReLU's output, without one its input."""
    torch.manual_seed(1)
    norm = nn.GroupNorm(4, 16)
    nn.init.uniform_(norm.weight, 0.5, 2.0)
    nn.init.normal_(norm.bias)
    activation = nn.ReLU() if relu else nn.Identity()
    tower = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), norm, activation)
    out = nn.Conv2d(16, 3, 3, padding=1)
    x = torch.randn(1, 16, 12, 10)
    head = recorded_head({"cls": tower}, {"cls": out}, x)
    ys, xs = torch.tensor([5, 0]), torch.tensor([4, 9])
    cot = torch.randn(2, 3)
    measured = head.window_gradients(head.records[0], CellTargets(ys, xs, {"cls": cot})).gn_error
    z = tower[0](x).detach().requires_grad_(True)
    sigma = torch.sqrt(z.reshape(4, -1).var(-1, unbiased=False) + norm.eps)
    for t in range(2):
        y = norm(z)
        value = (out(activation(y))[0, :, ys[t], xs[t]] * cot[t]).sum()
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
        parts = head.level_parts(head.records[0], x[0], CellTargets(ys, xs, cot), pad=0)
        ((rows, grads, origin, _),) = parts
        assert rows.tolist() == [0, 1]
        if exact:
            assert grads.shape[-2:] == (h, w) and origin.tolist() == [[0, 0], [0, 0]]
            reference = head.level_gradients(head.records[0], CellTargets(ys, xs, cot))
            torch.testing.assert_close(grads, reference)
        else:
            assert grads.shape[-2:] == (5, 5)


def test_the_tolerance_shrinks_with_the_level_size() -> None:
    assert level_tolerance(0.03, GN_REFERENCE_CELLS) == 0.03
    assert level_tolerance(0.03, GN_REFERENCE_CELLS // 8) == pytest.approx(0.06)
    assert level_tolerance(0.03, GN_REFERENCE_CELLS * 8) == pytest.approx(0.015)


def test_windows_are_exact_with_no_relu_between_convolutions() -> None:
    """Border windows run past the level; with no ReLU mask to clear them, gradients on those
    cells must be dropped before the next transposed convolution. BatchNorm (eval) has no
    statistics term, so every window equals autograd's input gradient there."""
    torch.manual_seed(3)
    norm = nn.BatchNorm2d(8).eval()
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.5, 2.0)
    tower = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), norm, nn.Conv2d(8, 8, 3, padding=1))
    out = nn.Conv2d(8, 2, 3, padding=1)
    x = torch.randn(1, 8, 7, 6)
    head = recorded_head({"cls": tower}, {"cls": out}, x)
    ys, xs = torch.tensor([0, 6, 3]), torch.tensor([0, 5, 2])
    cot = torch.randn(3, 2)
    windows = head.window_gradients(head.records[0], CellTargets(ys, xs, {"cls": cot})).grads
    r = head.radius
    assert windows.shape == (3, 8, 2 * r + 1, 2 * r + 1)
    for t in range(3):
        leaf = x.clone().requires_grad_(True)
        value = (out(tower(leaf))[0, :, ys[t], xs[t]] * cot[t]).sum()
        (reference,) = torch.autograd.grad(value, leaf)
        on_windows = torch.nn.functional.pad(reference[0], (r,) * 4)
        expected = on_windows[:, ys[t] : ys[t] + 2 * r + 1, xs[t] : xs[t] + 2 * r + 1]
        torch.testing.assert_close(windows[t], expected, atol=1e-6, rtol=1e-5)


def test_targets_at_one_cell_with_parallel_cotangents_share_a_backward_pass() -> None:
    """Three targets at one cell whose cotangents are multiples of one vector, one with a zero
    cotangent and one elsewhere: two backward passes, the same windows and statistics terms as
    running each target alone."""
    torch.manual_seed(4)
    head = recorded_head(
        {"cls": gn_tower()}, {"cls": nn.Conv2d(16, 3, 3, padding=1)}, torch.randn(1, 16, 10, 9)
    )
    ys, xs = torch.tensor([2, 2, 2, 2, 7]), torch.tensor([3, 3, 3, 3, 1])
    v = torch.randn(3)
    cot = torch.stack((v, -2.5 * v, torch.zeros(3), 0.5 * v, torch.randn(3)))
    runs, share, multiple = _shared_backwards(ys, xs, cot)
    assert runs.tolist() == [0, 4] and share.tolist() == [0, 0, -1, 0, 1]
    assert multiple.tolist() == [1.0, -2.5, 0.0, 0.5, 1.0]
    together = head.window_gradients(head.records[0], CellTargets(ys, xs, {"cls": cot}))
    for t in range(5):
        alone = head.window_gradients(
            head.records[0], CellTargets(ys[t : t + 1], xs[t : t + 1], {"cls": cot[t : t + 1]})
        )
        torch.testing.assert_close(together.grads[t], alone.grads[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(together.gn_error[t], alone.gn_error[0])
