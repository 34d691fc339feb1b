"""What a target means, decided once: per-unit outputs -> the scalar each ``Target`` explains.

A trace reads, for every requested target, the output unit that produced its detection (same
level, cell, anchor and class, or the same proposal) and returns that unit's differentiable
outputs as ``UnitOutputs`` (row t belongs to target t). ``target_values`` turns them into the
values the gradients are taken of. The built-in kinds are the attributes of ``Target``:

- ``score``: the unit's score of the detection's class;
- ``x1``, ``y1``, ``x2``, ``y2``: the decoded, unclipped box (xyxy, original-image pixels)
  with its edges measured outwards (-x1, -y1, x2, y2), so a positive gradient marks evidence
  for a larger box (the FCOS regression targets of the ODAM paper, App. A.5.6).

A new kind is one object: a callable from ``UnitOutputs`` to the (T,) values, used as the
attribute of a ``Target`` (``Target(0, ClassProbability(3))``), as pytorch-grad-cam's targets
are callables on the model output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from xaibench.types import Target


@dataclass
class UnitOutputs:
    """Differentiable outputs of the units behind T targets (row t: target t's unit).

    ``score`` (T,) the unit's score of the detection's class; ``box`` (T, 4) its decoded box,
    xyxy in original-image pixels, not clipped to the image; ``class_probs`` (T, C) its class
    distribution in the columns of ``Detections.class_probs`` (column 0 the background), where
    the trace provides it."""

    score: torch.Tensor
    box: torch.Tensor
    class_probs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        t = self.score.shape[0]
        if self.score.dim() != 1 or tuple(self.box.shape) != (t, 4):
            raise ValueError(
                f"UnitOutputs: score must be (T,) and box (T, 4); got {tuple(self.score.shape)} "
                f"and {tuple(self.box.shape)}"
            )
        if self.class_probs is not None and (
            self.class_probs.dim() != 2 or self.class_probs.shape[0] != t
        ):
            raise ValueError(
                f"UnitOutputs: class_probs must be (T, C) with T = {t}; "
                f"got {tuple(self.class_probs.shape)}"
            )


TargetFn = Callable[[UnitOutputs], torch.Tensor]
"""A target kind: (T,) values from the units' outputs (differentiable)."""


def box_edges(boxes: torch.Tensor) -> torch.Tensor:
    """Box edges measured outwards (-x1, -y1, x2, y2) of xyxy boxes (..., 4)."""
    return boxes * boxes.new_tensor([-1.0, -1.0, 1.0, 1.0])


def _edge(column: int) -> TargetFn:
    return lambda outputs: box_edges(outputs.box)[:, column]


KINDS: dict[str, TargetFn] = {
    "score": lambda outputs: outputs.score,
    "x1": _edge(0),
    "y1": _edge(1),
    "x2": _edge(2),
    "y2": _edge(3),
}
"""The built-in target kinds, by ``Target.attribute``."""


@dataclass(frozen=True)
class ClassProbability:
    """A target kind: the unit's probability of class ``label`` (a column of
    ``class_probs``, 0 the background), e.g. to ask what makes a box look like another class."""

    label: int

    def __call__(self, outputs: UnitOutputs) -> torch.Tensor:
        if outputs.class_probs is None:
            raise ValueError("ClassProbability: this trace gives no class probabilities")
        columns = outputs.class_probs.shape[1]
        if not 0 <= self.label < columns:
            raise ValueError(f"ClassProbability: label {self.label} outside 0..{columns - 1}")
        return outputs.class_probs[:, self.label]

    def __str__(self) -> str:
        return f"class_prob[{self.label}]"


def target_values(targets: Sequence[Target], outputs: UnitOutputs) -> torch.Tensor:
    """The value (T,) of each target from its unit's outputs (row t for ``targets[t]``):
    ``KINDS[attribute]`` for the built-in attributes, the attribute itself where it is a
    callable ``TargetFn``."""
    if len(targets) != outputs.score.shape[0]:
        raise ValueError(
            f"target_values: {len(targets)} targets but outputs of {outputs.score.shape[0]} units"
        )
    columns: dict[object, torch.Tensor] = {}
    picked = []
    for i, t in enumerate(targets):
        if t.attribute not in columns:
            kind = t.attribute if callable(t.attribute) else KINDS.get(t.attribute)
            if kind is None:
                raise ValueError(
                    f"target {i}: attribute {t.attribute!r} is not one of "
                    f"{', '.join(KINDS)} (expand 'combined' first) nor a callable"
                )
            columns[t.attribute] = kind(outputs)
        picked.append(columns[t.attribute][i])
    return torch.stack(picked)
