"""Core data types shared by detectors, methods and metrics.

Coordinates are always ``xyxy`` in pixels of the original image (x to the right, y down);
heat maps are float32 ``(H, W)`` arrays over the original image.
"""

from __future__ import annotations

from collections.abc import Callable
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


def checked_detections(
    boxes: Any,
    scores: Any,
    labels: Any,
    class_probs: Any,
    *,
    num_classes: int,
    image_size: tuple[int, int],
    provenance: Provenance | None = None,
    objectness: Any = None,
    where: str = "detections",
) -> Detections:
    """``Detections`` from an outside detector's arrays or tensors, checked: boxes (N, 4) xyxy
    in original-image pixels (not normalised to [0, 1], not beyond twice the image), scores
    (N,) in [0, 1], labels (N,) integers in 1..num_classes - 1 (0 is the background),
    class_probs (N, num_classes) with column 0 the background, objectness (N,) or None.
    Without ``provenance`` each detection is its own unit: level 0, the pixel (y, x) of its
    box centre, anchor 0, class_index = label. A mistake raises ValueError naming ``where``,
    the field and what was expected."""

    def tensor(value: Any, field_name: str, dtype: torch.dtype) -> torch.Tensor:
        t = torch.as_tensor(value).detach().cpu()
        if dtype == torch.long:
            if t.is_floating_point() and not torch.equal(t, t.round()):
                raise ValueError(f"{where}: {field_name} must hold integer labels")
            return t.long()
        t = t.float()
        if not torch.isfinite(t).all():
            raise ValueError(f"{where}: {field_name} must be finite")
        return t

    b = tensor(boxes, "boxes", torch.float32)
    n = b.shape[0] if b.dim() == 2 else -1
    if b.dim() != 2 or b.shape[1] != 4:
        raise ValueError(f"{where}: boxes must be (N, 4) xyxy; got shape {tuple(b.shape)}")
    s = tensor(scores, "scores", torch.float32)
    lab = tensor(labels, "labels", torch.long)
    probs = tensor(class_probs, "class_probs", torch.float32)
    for name, t, shape in (
        ("scores", s, (n,)),
        ("labels", lab, (n,)),
        ("class_probs", probs, (n, num_classes)),
    ):
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{where}: {name} must have shape {shape} for {n} boxes and {num_classes} "
                f"classes (column 0 the background); got {tuple(t.shape)}"
            )
    if n and ((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])).any():
        raise ValueError(f"{where}: boxes must be xyxy with x2 >= x1 and y2 >= y1")
    height, width = image_size
    if n and max(height, width) > 2 and float(b.abs().max()) <= 1.0:
        raise ValueError(
            f"{where}: boxes lie in [0, 1]: normalised? expected xyxy in original-image pixels "
            f"(image {height} x {width})"
        )
    reach = b.new_tensor([2 * width, 2 * height, 2 * width, 2 * height])
    if n and (b.abs() > reach).any():
        raise ValueError(
            f"{where}: boxes reach beyond twice the image ({height} x {width} px): expected "
            "xyxy in original-image pixels (not in the resized input's)"
        )
    if n and ((s < 0) | (s > 1)).any():
        raise ValueError(f"{where}: scores must lie in [0, 1]")
    if n and ((lab < 1) | (lab >= num_classes)).any():
        raise ValueError(
            f"{where}: labels must lie in 1..{num_classes - 1} (0 is the background); "
            f"got {sorted(set(lab.tolist()))}"
        )
    obj = None if objectness is None else tensor(objectness, "objectness", torch.float32)
    if obj is not None and tuple(obj.shape) != (n,):
        raise ValueError(f"{where}: objectness must have shape ({n},); got {tuple(obj.shape)}")
    if provenance is None:
        centre = ((b[:, :2] + b[:, 2:]) / 2).long()
        zeros = torch.zeros(n, dtype=torch.long)
        provenance = Provenance(zeros, centre[:, 1], centre[:, 0], zeros, lab.clone())
    elif len(provenance) != n:
        raise ValueError(f"{where}: provenance has {len(provenance)} rows for {n} boxes")
    return Detections(b, s, lab, probs, provenance, obj, (int(height), int(width)))


@dataclass(frozen=True)
class Target:
    """What to explain: one prediction (row of ``Detections``) and one attribute.

    Box attributes are the predicted box edges measured outwards (-x1, -y1, x2, y2 of the
    decoded, unclipped box), so a positive gradient marks evidence for a larger box, as the
    regression targets of FCOS in the ODAM paper (App. A.5.6). ``combined`` is the element-wise
    maximum of the five maps (the paper's H_comb). Any other kind of target is a callable
    attribute (``xaibench.targets.TargetFn``, e.g. ``ClassProbability(2)``): what a target
    means is decided in ``xaibench.targets`` alone.
    """

    index: int
    attribute: Attribute | Callable[..., Any] = "score"

    def __post_init__(self) -> None:
        if not callable(self.attribute) and self.attribute not in (*ATTRIBUTES, "combined"):
            raise ValueError(
                f"Target.attribute must be one of {', '.join((*ATTRIBUTES, 'combined'))} "
                f"or a callable target kind (xaibench.targets); got {self.attribute!r}"
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
