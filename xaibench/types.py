"""Core data types shared by detectors, methods and metrics.

Coordinates are always ``xyxy`` in pixels of the original image (x to the right, y down);
heat maps are float32 ``(H, W)`` arrays over the original image.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch

Attribute = Literal["score", "x1", "y1", "x2", "y2", "combined"]
BOX_ATTRIBUTES: tuple[str, ...] = ("x1", "y1", "x2", "y2")
ATTRIBUTES: tuple[str, ...] = ("score", *BOX_ATTRIBUTES)


def check_attribute(value: str) -> str:
    """``value`` if it names an explainable attribute (``ATTRIBUTES`` or ``"combined"``);
    else a ValueError listing them."""
    if value not in (*ATTRIBUTES, "combined"):
        raise ValueError(f"attribute must be one of {', '.join((*ATTRIBUTES, 'combined'))}")
    return value


@dataclass
class Provenance:
    """Where in the detector each prediction came from (one row per prediction).

    ``level`` indexes the detector's ``feature_levels`` (e.g. FPN "p3"), ``y``/``x`` are the
    cell on that level's feature map, ``anchor`` the anchor at that cell (0 for anchor-free
    heads), ``class_index`` the class channel that produced the score, and for two-stage
    detectors ``proposal`` indexes the RoI and ``proposal_box`` holds it in original pixels.
    """

    level: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    anchor: torch.Tensor
    class_index: torch.Tensor
    proposal: torch.Tensor | None = None
    proposal_box: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.level.shape[0])

    def index(self, keep: torch.Tensor | slice | list[int]) -> Provenance:
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[keep]

        return Provenance(
            level=self.level[keep],
            y=self.y[keep],
            x=self.x[keep],
            anchor=self.anchor[keep],
            class_index=self.class_index[keep],
            proposal=pick(self.proposal),
            proposal_box=pick(self.proposal_box),
        )

    def record(self, i: int, level_names: list[str]) -> dict[str, Any]:
        """A JSON-ready description of prediction ``i``."""
        out: dict[str, Any] = {
            "level": level_names[int(self.level[i])] if level_names else int(self.level[i]),
            "y": int(self.y[i]),
            "x": int(self.x[i]),
            "anchor": int(self.anchor[i]),
            "class_index": int(self.class_index[i]),
        }
        if self.proposal is not None:
            out["proposal"] = int(self.proposal[i])
        if self.proposal_box is not None:
            out["proposal_box"] = [float(v) for v in self.proposal_box[i]]
        return out

    @staticmethod
    def empty() -> Provenance:
        z = torch.zeros(0, dtype=torch.long)
        return Provenance(level=z, y=z, x=z, anchor=z, class_index=z)


@dataclass
class Detections:
    """Detections of one image.

    boxes (N,4) xyxy in original-image pixels; scores (N,); labels (N,) class indices of the
    detector; class_probs (N,C) the full class distribution of each prediction (index =
    label; for softmax heads column 0 is the background); objectness (N,) where the detector
    has one (FCOS centerness, RPN objectness), else None.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    class_probs: torch.Tensor
    provenance: Provenance
    objectness: torch.Tensor | None = None
    image_size: tuple[int, int] = (0, 0)  # (H, W) of the original image

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def index(self, keep: torch.Tensor | slice | list[int]) -> Detections:
        return replace(
            self,
            boxes=self.boxes[keep],
            scores=self.scores[keep],
            labels=self.labels[keep],
            class_probs=self.class_probs[keep],
            objectness=None if self.objectness is None else self.objectness[keep],
            provenance=self.provenance.index(keep),
        )

    def to(self, device: torch.device | str) -> Detections:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        p = self.provenance
        return replace(
            self,
            boxes=self.boxes.to(device),
            scores=self.scores.to(device),
            labels=self.labels.to(device),
            class_probs=self.class_probs.to(device),
            objectness=mv(self.objectness),
            provenance=Provenance(
                level=p.level.to(device),
                y=p.y.to(device),
                x=p.x.to(device),
                anchor=p.anchor.to(device),
                class_index=p.class_index.to(device),
                proposal=mv(p.proposal),
                proposal_box=mv(p.proposal_box),
            ),
        )

    @staticmethod
    def empty(num_classes: int, image_size: tuple[int, int]) -> Detections:
        return Detections(
            boxes=torch.zeros(0, 4),
            scores=torch.zeros(0),
            labels=torch.zeros(0, dtype=torch.long),
            class_probs=torch.zeros(0, num_classes),
            provenance=Provenance.empty(),
            image_size=image_size,
        )


@dataclass(frozen=True)
class Target:
    """What to explain: one prediction (row of ``Detections``) and one attribute.

    Box attributes are the predicted box edges measured outwards (-x1, -y1, x2, y2 of the
    decoded, unclipped box), so a positive gradient marks evidence for a larger box, as the
    regression targets of FCOS in the ODAM paper (App. A.5.6). ``combined`` is the element-wise
    maximum of the five maps (the paper's H_comb).
    """

    index: int
    attribute: Attribute = "score"

    def __post_init__(self) -> None:
        if self.attribute not in (*ATTRIBUTES, "combined"):
            raise ValueError(
                f"Target.attribute must be one of {', '.join((*ATTRIBUTES, 'combined'))}; "
                f"got {self.attribute!r}"
            )
        if self.index < 0:
            raise ValueError(f"Target.index must be >= 0, got {self.index}")


@dataclass
class Saliency:
    """A heat map over the original image: float32 (H, W), non-negative unless the method's
    ``params`` say otherwise, with the method name, target, parameters and compute time (s)."""

    map: np.ndarray
    method: str
    target: Target
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.map = np.asarray(self.map, dtype=np.float32)
        if self.map.ndim != 2:
            raise ValueError(f"Saliency.map must be 2-D (H, W), got shape {self.map.shape}")


@dataclass
class Instance:
    """One ground-truth object: box xyxy in original pixels, optional (H, W) bool mask."""

    box: np.ndarray
    label: int
    mask: np.ndarray | None = None
    ignore: bool = False
    id: int | str | None = None
    visible_box: np.ndarray | None = None


@dataclass
class Sample:
    """An image (uint8 RGB, H x W x 3) with its id and ground-truth instances."""

    image: np.ndarray
    image_id: int | str
    instances: list[Instance] = field(default_factory=list)
    file_name: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])
