"""NMS strategies on a detector's pre-NMS candidates (``NMS`` registry): classic NMS,
Soft-NMS, FeatureNMS and Odam-NMS (paper Sec. 4.3; DESIGN.md "NMS strategies").

Every strategy starts from the same candidates, ``detector.detect([image], nms=False)``
(boxes xyxy in original pixels, scores, labels, provenance; Odam-NMS takes the same ones from
one ``detector.trace_candidates(image)``), keeps those with score >
``score_threshold`` and suppresses duplicates within each class. ``strategy.run(detector,
image)`` is the whole pipeline (detector included, what ``xaibench nms`` times);
``strategy.select(candidates, detector, image)`` applies the strategy to given candidates.

- ``none``: every candidate (the reference "without NMS").
- ``nms``: torchvision's ``batched_nms`` (a candidate goes if its IoU with a kept one > 0.5).
- ``softnms``: Bodla et al. 2017; ``method="gaussian"`` scales the others' scores by
  exp(-IoU^2 / sigma) (sigma 0.5), ``"linear"`` by 1 - IoU where IoU > ``iou_threshold``;
  candidates whose score falls to ``final_threshold`` (0.05) or below are dropped.
- ``featurenms``: Salscheider 2021; IoU > 0.9 duplicate, IoU < 0.1 distinct, otherwise a
  duplicate when the L2 distance of the two L2-normalised embeddings is <= 1.0. The
  embeddings come from the detector's ``featurenms-embedding`` head
  (``detectors/featurenms.py``).
- ``odamnms``: Algorithm 1 of the ODAM paper; ODAM maps of every candidate's score (all at
  once through the fast path), resized to a short edge of 50 px, vectorised; corr = the
  normalised correlation of every pair at once (``correlation="cosine"``: dot product of the
  unit-normalised maps, as the official code; ``"pearson"`` subtracts each map's mean first).
  p is a duplicate of a kept d if (IoU >= T_iou and corr > T_l) or (IoU < T_iou and corr > T_h).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, box_iou

from xaibench.detector import Detector, WhiteBoxTrace
from xaibench.registry import METHODS, NMS
from xaibench.types import Detections, Target

IOU_THRESHOLD = 0.5
SCORE_THRESHOLD = 0.05


@dataclass
class NMSOutput:
    """What a strategy kept: ``keep`` (K,) indices into ``candidates`` by descending final
    score, ``scores`` (K,) their final scores (Soft-NMS lowers them; the others keep the
    candidates' scores)."""

    candidates: Detections
    keep: torch.Tensor
    scores: torch.Tensor

    @property
    def detections(self) -> Detections:
        """The kept candidates with their final scores."""
        return replace(self.candidates.index(self.keep), scores=self.scores)


def greedy_keep(scores: torch.Tensor, duplicate: torch.Tensor) -> torch.Tensor:
    """Algorithm 1's loop: visit candidates by descending score, keep one unless it is a
    duplicate (``duplicate`` (N, N) bool, symmetric) of one kept before. Returns kept indices."""
    order = torch.argsort(scores, descending=True, stable=True)
    suppressed = torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= duplicate[i]
    return torch.tensor(keep, dtype=torch.long, device=scores.device)


def same_class(labels: torch.Tensor) -> torch.Tensor:
    """(N, N) bool: pairs of candidates with the same label."""
    return labels[:, None] == labels[None, :]


def pairwise_iou(candidates: Detections) -> torch.Tensor:
    """(N, N) IoU of the candidates' boxes."""
    boxes = candidates.boxes.float()
    return box_iou(boxes, boxes)


def keep_non_duplicates(
    candidates: Detections, duplicate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``greedy_keep`` with ``duplicate`` (N, N) restricted to pairs of one class; the kept
    indices and their (unchanged) scores."""
    keep = greedy_keep(candidates.scores, duplicate & same_class(candidates.labels))
    return keep, candidates.scores[keep]


@dataclass(kw_only=True, eq=False)
class NMSStrategy(ABC):
    """Duplicate removal on pre-NMS candidates, per class; see the module docstring.

    A strategy's settings are its dataclass fields (keyword-only; a subclass adds its own
    after its parent's), checked in ``__post_init__``; ``params`` records them."""

    name: ClassVar[str] = "strategy"
    iou_threshold: float = IOU_THRESHOLD
    score_threshold: float = SCORE_THRESHOLD
    max_detections: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1], got {self.iou_threshold}")
        if self.max_detections is not None and self.max_detections < 1:
            raise ValueError(f"max_detections must be >= 1 or None, got {self.max_detections}")

    def params(self) -> dict[str, Any]:
        """The settings (recorded with every result row), in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def run(self, detector: Detector, image: np.ndarray) -> NMSOutput:
        """The whole pipeline on one uint8 RGB image: candidates, then ``select``."""
        candidates = detector.detect([image], nms=False)[0]
        return self.select(candidates, detector, image)

    def select(
        self,
        candidates: Detections,
        detector: Detector | None = None,
        image: np.ndarray | None = None,
    ) -> NMSOutput:
        """Apply the strategy to ``candidates`` (of ``image``, from ``detector``: strategies
        that look inside the detector need both)."""
        pre = self.above_threshold(candidates)
        if len(pre) == 0:
            return self.finish(candidates, pre, pre, candidates.scores[pre])
        keep, scores = self.suppress(candidates.index(pre), detector, image)
        return self.finish(candidates, pre, keep, scores)

    def above_threshold(self, candidates: Detections) -> torch.Tensor:
        """Indices of the candidates with score > ``score_threshold``."""
        return torch.nonzero(candidates.scores > self.score_threshold).flatten()

    def finish(
        self, candidates: Detections, pre: torch.Tensor, keep: torch.Tensor, scores: torch.Tensor
    ) -> NMSOutput:
        """``keep`` (indices into ``candidates.index(pre)``) by descending final ``scores``,
        at most ``max_detections``."""
        order = torch.argsort(scores, descending=True, stable=True)
        if self.max_detections is not None:
            order = order[: self.max_detections]
        return NMSOutput(candidates, pre[keep[order]], scores[order])

    @abstractmethod
    def suppress(
        self, candidates: Detections, detector: Detector | None, image: np.ndarray | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept indices into ``candidates`` (all above the score threshold) and their final
        scores."""


@NMS.register("none")
@dataclass(kw_only=True, eq=False)
class NoSuppression(NMSStrategy):
    """Keeps every candidate above the score threshold: the "without NMS" reference."""

    name = "none"

    def suppress(self, candidates, detector=None, image=None):
        return torch.arange(len(candidates), device=candidates.scores.device), candidates.scores


@NMS.register("nms")
@dataclass(kw_only=True, eq=False)
class ClassicNMS(NMSStrategy):
    """Classic NMS per class (torchvision ``batched_nms``)."""

    name = "nms"

    def suppress(self, candidates, detector=None, image=None):
        keep = batched_nms(
            candidates.boxes.float(), candidates.scores, candidates.labels, self.iou_threshold
        )
        return keep, candidates.scores[keep]


@NMS.register("softnms")
@dataclass(kw_only=True, eq=False)
class SoftNMS(NMSStrategy):
    """Soft-NMS per class; torchvision has no op for it, so the loop is here (one IoU matrix,
    one argmax per kept candidate)."""

    name = "softnms"
    method: Literal["gaussian", "linear"] = "gaussian"
    sigma: float = 0.5
    final_threshold: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in ("gaussian", "linear"):
            raise ValueError(f"method must be 'gaussian' or 'linear', got {self.method!r}")
        if self.sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")

    def decay(self, iou: torch.Tensor) -> torch.Tensor:
        """Score factor for the given IoUs with the candidate just kept."""
        if self.method == "gaussian":
            return torch.exp(-(iou**2) / self.sigma)
        return torch.where(iou > self.iou_threshold, 1.0 - iou, torch.ones_like(iou))

    def suppress(self, candidates, detector=None, image=None):
        iou = pairwise_iou(candidates) * same_class(
            candidates.labels
        )  # other classes: IoU 0, factor 1
        scores = candidates.scores.clone().float()
        alive = scores > self.final_threshold
        keep, final = [], []
        while bool(alive.any()):
            i = int(torch.argmax(torch.where(alive, scores, -torch.inf)))
            keep.append(i)
            final.append(scores[i].clone())
            alive[i] = False
            scores = torch.where(alive, scores * self.decay(iou[i]), scores)
            alive &= scores > self.final_threshold
        index = torch.tensor(keep, dtype=torch.long, device=scores.device)
        return index, torch.stack(final) if final else scores[index]


def resize_short_edge(maps: torch.Tensor, short_edge: int) -> torch.Tensor:
    """Maps (N, H, W) bilinearly resized so that min(H, W) becomes ``short_edge`` px."""
    h, w = maps.shape[-2:]
    scale = short_edge / min(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[
        :, 0
    ]


def normalized_correlation(
    maps: torch.Tensor, kind: Literal["cosine", "pearson"] = "cosine"
) -> torch.Tensor:
    """(N, N) normalised correlation of every pair of maps (N, ...) at once: the dot product
    of the vectorised, unit-normalised maps (``pearson``: centred first). A constant map
    correlates 0 with everything."""
    flat = maps.reshape(len(maps), -1).float()
    if kind == "pearson":
        flat = flat - flat.mean(dim=1, keepdim=True)
    elif kind != "cosine":
        raise ValueError(f"correlation must be 'cosine' or 'pearson', got {kind!r}")
    unit = F.normalize(flat, dim=1)
    return unit @ unit.T


def odam_duplicates(
    iou: torch.Tensor, corr: torch.Tensor, t_iou: float, t_high: float, t_low: float
) -> torch.Tensor:
    """Algorithm 1's rule (N, N) bool: (IoU >= T_iou and corr > T_l) or (IoU < T_iou and
    corr > T_h)."""
    return ((iou >= t_iou) & (corr > t_low)) | ((iou < t_iou) & (corr > t_high))


@NMS.register("odamnms")
@dataclass(kw_only=True, eq=False)
class OdamNMS(NMSStrategy):
    """Odam-NMS (paper Algorithm 1); ``iou_threshold`` is T_iou, ``t_high``/``t_low`` the
    correlation thresholds; ``odam`` holds settings of the ``odam`` method (default: score
    maps on the FPN level of each prediction, fast path)."""

    name = "odamnms"
    t_high: float = 0.8
    t_low: float = 0.2
    short_edge: int = 50
    correlation: Literal["cosine", "pearson"] = "cosine"
    odam: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.short_edge < 1:
            raise ValueError(f"short_edge must be >= 1, got {self.short_edge}")
        if self.correlation not in ("cosine", "pearson"):
            raise ValueError(f"correlation must be 'cosine' or 'pearson', got {self.correlation!r}")
        self.odam = dict(self.odam or {})
        self.method = METHODS.build("odam", **self.odam)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "odam": self.method.params()}

    def run(self, detector: Detector, image: np.ndarray) -> NMSOutput:
        """One pass of the detector: a trace of the pre-NMS candidates
        (``Detector.trace_candidates``), the maps of those above the score threshold on it,
        then the rule."""
        trace = detector.trace_candidates(image)
        candidates = trace.detections
        pre = self.above_threshold(candidates)
        if len(pre) == 0:
            return self.finish(candidates, pre, pre, candidates.scores[pre])
        maps = self.maps_on(detector, image, trace, pre.tolist())
        keep, scores = self.keep_from(candidates.index(pre), self.correlations(maps))
        return self.finish(candidates, pre, keep, scores)

    def maps_on(
        self, detector: Detector, image: np.ndarray, trace: WhiteBoxTrace, indices: list[int]
    ) -> torch.Tensor:
        """ODAM score maps (N, H, W), original-image pixels, of ``trace``'s detections
        ``indices``, computed together."""
        targets = [Target(i, "score") for i in indices]
        maps = self.method.explain(detector, image, targets, trace=trace)
        return torch.from_numpy(np.stack([m.map for m in maps]))

    def heat_maps(self, detector: Detector, image: np.ndarray, candidates: Detections):
        """ODAM score maps of all ``candidates`` (N, H, W), original-image pixels, computed
        together on one trace of their output units."""
        trace = detector.trace_units(image, candidates)
        return self.maps_on(detector, image, trace, list(range(len(candidates))))

    def correlations(self, maps: torch.Tensor) -> torch.Tensor:
        """(N, N) corr of maps (N, H, W) after resizing to the short edge."""
        return normalized_correlation(resize_short_edge(maps, self.short_edge), self.correlation)

    def suppress(self, candidates, detector=None, image=None):
        if detector is None or image is None:
            raise ValueError("odamnms needs the detector and the image to compute ODAM maps")
        return self.keep_from(
            candidates, self.correlations(self.heat_maps(detector, image, candidates))
        )

    def keep_from(
        self, candidates: Detections, corr: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Algorithm 1 given the correlation matrix (N, N) of the candidates' maps."""
        iou = pairwise_iou(candidates)
        corr = corr.to(iou.device)
        duplicate = odam_duplicates(iou, corr, self.iou_threshold, self.t_high, self.t_low)
        return keep_non_duplicates(candidates, duplicate)


def feature_duplicates(
    iou: torch.Tensor, distance: torch.Tensor, high: float, low: float, max_distance: float
) -> torch.Tensor:
    """FeatureNMS's rule (N, N) bool: IoU > ``high`` duplicate, IoU < ``low`` distinct,
    otherwise duplicate when the embeddings' L2 distance <= ``max_distance``."""
    return (iou > high) | ((iou >= low) & (distance <= max_distance))


@NMS.register("featurenms")
@dataclass(kw_only=True, eq=False)
class FeatureNMS(NMSStrategy):
    """FeatureNMS with the detector's trained embedding head; ``embedding``: its file (default
    ``<cache>/detectors/<detector>/featurenms-embedding.pt``, trained on first use for the
    crowd demo detectors)."""

    name = "featurenms"
    high: float = 0.9
    low: float = 0.1
    distance: float = 1.0
    embedding: str | None = None
    _heads: dict[int, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"need 0 <= low <= high <= 1, got low={self.low}, high={self.high}")

    def head(self, detector: Detector) -> Any:
        """The detector's embedding head (loaded once per detector)."""
        from xaibench.detectors.featurenms import demo_embedding, load_embedding

        if id(detector) not in self._heads:
            path = self.embedding or demo_embedding(detector)
            self._heads[id(detector)] = load_embedding(detector, path)
        return self._heads[id(detector)]

    def run(self, detector: Detector, image: np.ndarray) -> NMSOutput:
        """Candidates and their embeddings from one forward pass, then the rule."""
        from xaibench.detectors.featurenms import embed

        candidates, embeddings = embed(detector, self.head(detector), image)
        pre = self.above_threshold(candidates)
        keep, scores = self.keep_from(candidates.index(pre), embeddings[pre])
        return self.finish(candidates, pre, keep, scores)

    def suppress(self, candidates, detector=None, image=None):
        from xaibench.detectors.featurenms import backbone_features, candidate_inputs

        if detector is None or image is None:
            raise ValueError("featurenms needs the detector and the image for the embeddings")
        head = self.head(detector)
        with torch.no_grad():
            inputs, features = backbone_features(detector, image)
            embeddings = head(candidate_inputs(detector, inputs, features, candidates, head.patch))
        return self.keep_from(candidates, embeddings)

    def keep_from(
        self, candidates: Detections, embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rule and the greedy loop, given the candidates' embeddings (N, D)."""
        iou = pairwise_iou(candidates)
        distance = torch.cdist(embeddings.float(), embeddings.float()).to(iou.device)
        duplicate = feature_duplicates(iou, distance, self.high, self.low, self.distance)
        return keep_non_duplicates(candidates, duplicate)
