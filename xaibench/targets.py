"""What a target's value is, decided once: traces compute each target's unit outputs (its
score and its box) differentiably, and ``target_values`` reads the target's attribute off
them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xaibench.types import Target


def box_edges(boxes: torch.Tensor) -> torch.Tensor:
    """Box edges measured outwards (-x1, -y1, x2, y2): the values box targets explain."""
    return boxes * boxes.new_tensor([-1.0, -1.0, 1.0, 1.0])


def target_values(
    targets: Sequence[Target], scores: torch.Tensor, boxes: torch.Tensor
) -> torch.Tensor:
    """The value (T,) of each target from its unit's ``scores`` (T,) and ``boxes`` (T, 4, xyxy,
    original pixels): the score, or a box edge measured outwards."""
    edges = box_edges(boxes)
    columns = {"score": scores, "x1": edges[:, 0], "y1": edges[:, 1], "x2": edges[:, 2]}
    columns["y2"] = edges[:, 3]
    return torch.stack([columns[t.attribute][i] for i, t in enumerate(targets)])
