"""The FeatureNMS embedding head (Salscheider, ICPR 2021) and its recipe ``featurenms-embedding``.

The head is an extra module on a torchvision detector's features that gives every candidate an
L2-normalised embedding (``EmbeddingHead``, an MLP). Its input per candidate:

- one-stage (FCOS, RetinaNet): the ``patch`` x ``patch`` cells of the FPN level that produced
  the candidate, centred on its cell (provenance level, y, x), flattened;
- Faster R-CNN: the box head's representation of the candidate's proposal (RoIAlign of the
  FPN on ``provenance.proposal_box``, then ``roi_heads.box_head``).

The recipe trains it with the pull/push loss: candidates are assigned to the non-ignored GT
they overlap most (IoU > ``assign_iou``); pairs of one GT are pulled within ``pull_margin``
(0.8), pairs of different GTs pushed beyond ``push_margin`` (1.2):
L = mean_same relu(d - 0.8) + mean_different relu(1.2 - d), d the L2 distance. The detector
is frozen (default) or fine-tuned with the head (``fine_tune=True``); either way the file
holds what NMS needs: the head and, when fine-tuned, the detector's weights
(``save_embedding`` / ``load_embedding``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torchvision.ops import box_iou
from xaibench.detectors.network import Features, NetworkDetector
from xaibench.detectors.roi import RoINetwork

from xaibench import cache
from xaibench.detector import Detector
from xaibench.progress import progress_bar
from xaibench.registry import RECIPES
from xaibench.types import Detections, Sample

EMBEDDING_FILE = "featurenms-embedding.pt"


class EmbeddingConfig(BaseModel):
    """Hyper-parameters of the ``featurenms-embedding`` recipe (validated once)."""

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(600, ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="images per step")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    fine_tune: bool = Field(False, description="also train the detector's weights")
    detector_lr: float = Field(1e-4, gt=0, description="learning rate of the detector (fine_tune)")
    dim: int = Field(32, ge=2, description="embedding size")
    hidden: int = Field(128, ge=1)
    patch: int = Field(3, ge=1, description="one-stage: cells per side of the input patch (odd)")
    pull_margin: float = Field(0.8, ge=0)
    push_margin: float = Field(1.2, ge=0)
    assign_iou: float = Field(0.5, ge=0, le=1)
    score_threshold: float = Field(0.05, ge=0, description="candidates used for training")
    max_candidates: int = Field(64, ge=2, description="per image, the highest-scoring ones")
    seed: int = 0


class EmbeddingHead(nn.Module):
    """MLP from a candidate's features (N, in_features) to unit-length embeddings (N, dim)."""

    def __init__(self, in_features: int, dim: int = 32, hidden: int = 128, patch: int = 3):
        super().__init__()
        self.in_features, self.dim, self.hidden, self.patch = in_features, dim, hidden, patch
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(features), dim=1)

    def spec(self) -> dict[str, int]:
        """The constructor's arguments (stored with the weights)."""
        return {name: getattr(self, name) for name in ("in_features", "dim", "hidden", "patch")}


def pull_push_loss(
    embeddings: torch.Tensor, groups: torch.Tensor, pull: float = 0.8, push: float = 1.2
) -> torch.Tensor:
    """mean over pairs of one group of relu(d - pull) + mean over pairs of different groups of
    relu(push - d); d = L2 distance, ``groups`` (N,) the GT of each embedding (-1: none, left
    out). A term without pairs is 0."""
    valid = groups >= 0
    e, g = embeddings[valid], groups[valid]
    diff = e[:, None, :] - e[None, :, :]
    d = torch.sqrt((diff**2).sum(-1).clamp(min=1e-12))
    upper = torch.ones_like(d, dtype=torch.bool).triu(1)
    same = (g[:, None] == g[None, :]) & upper
    other = (g[:, None] != g[None, :]) & upper
    zero = embeddings.sum() * 0.0
    pull_term = F.relu(d[same] - pull).mean() if same.any() else zero
    push_term = F.relu(push - d[other]).mean() if other.any() else zero
    return pull_term + push_term


# ---------------------------------------------------------------------------------------------
# Features of candidates


def _network(detector: Detector) -> NetworkDetector:
    if not isinstance(detector, NetworkDetector):
        raise TypeError(
            "the FeatureNMS embedding head reads the feature levels of a wrapped network "
            f"(xaibench.detectors.network.NetworkDetector); {detector.name} is a "
            f"{type(detector).__name__}"
        )
    return detector


def backbone_features(detector: Detector, image: np.ndarray) -> tuple[Any, Features]:
    """The detector's batch input of ``image`` and its feature levels (graph kept where grad
    is on)."""
    network = _network(detector)
    inputs, _ = network.prepare([image])
    return inputs, network.features(inputs)


def detect_with_features(detector: Detector, image: np.ndarray) -> tuple[Detections, Any, Features]:
    """``detect([image], nms=False)``, with the batch input and the feature levels it
    computed (one forward pass)."""
    network = _network(detector)
    inputs, geometry = network.prepare([image])
    features = network.features(inputs)
    candidates = network.detect_from_features(inputs, features, geometry, nms=False)[0]
    return candidates, inputs, features


def candidate_inputs(
    detector: Detector, inputs: Any, features: Features, candidates: Detections, patch: int
) -> torch.Tensor:
    """(N, in_features) head input of each candidate (see the module docstring), from the
    batch input and feature levels of ``backbone_features``."""
    network = _network(detector)
    if len(candidates) == 0:
        return torch.zeros(0, _in_features(network, features, patch), device=detector.device)
    p = candidates.provenance
    if isinstance(network, RoINetwork):
        if p.proposal_box is None:
            raise ValueError("Faster R-CNN candidates need provenance.proposal_box")
        height, width = candidates.image_size
        rh, rw = inputs.image_sizes[0]
        scale = p.proposal_box.new_tensor([rw / width, rh / height, rw / width, rh / height])
        boxes = (p.proposal_box * scale).to(detector.device)
        return network.model.roi_heads.box_head(network.pool(inputs, features, [boxes]))
    levels = [features[name] for name in network.feature_levels]
    half = patch // 2
    out = torch.zeros(len(candidates), levels[0].shape[1] * patch * patch, device=detector.device)
    for index, level in enumerate(levels):
        rows = torch.nonzero(p.level == index).flatten()
        if len(rows) == 0:
            continue
        padded = F.pad(level[0], (half, half, half, half))
        offs = torch.arange(patch, device=padded.device)
        ys = p.y[rows].to(padded.device)[:, None, None] + offs[None, :, None]
        xs = p.x[rows].to(padded.device)[:, None, None] + offs[None, None, :]
        cells = padded[:, ys, xs]  # (C, n, patch, patch)
        out = out.index_copy(0, rows.to(out.device), cells.permute(1, 0, 2, 3).flatten(1))
    return out


def _in_features(network: NetworkDetector, features: Features, patch: int) -> int:
    if isinstance(network, RoINetwork):
        return int(network.model.roi_heads.box_predictor.cls_score.in_features)
    return int(next(iter(features.values())).shape[1]) * patch * patch


# ---------------------------------------------------------------------------------------------
# Embeddings at NMS time, saving and loading


def embed(
    detector: Detector, head: EmbeddingHead, image: np.ndarray
) -> tuple[Detections, torch.Tensor]:
    """Candidates of ``image`` (``detect(nms=False)``) and their embeddings (N, dim), one
    forward pass of the detector."""
    with torch.no_grad():
        candidates, inputs, features = detect_with_features(detector, image)
        return candidates, head(
            candidate_inputs(detector, inputs, features, candidates, head.patch)
        )


def embedding_path(detector: Detector, cache_dir: str | Path | None = None) -> Path:
    """Default file of the head: ``<cache>/detectors/<name>/featurenms-embedding.pt``."""
    root = Path(cache_dir) if cache_dir is not None else cache.cache_dir()
    return root / "detectors" / detector.name / EMBEDDING_FILE


def save_embedding(
    path: str | Path, head: EmbeddingHead, detector: Detector, config: EmbeddingConfig, info: dict
) -> Path:
    """Write the head (and the detector's weights when it was fine-tuned) atomically."""
    state = {
        "head": head.state_dict(),
        "spec": head.spec(),
        "detector": detector.name,
        "config": config.model_dump(),
        "info": info,
    }
    if config.fine_tune:
        state["detector_state"] = detector.torch_module().state_dict()
    path = Path(path)
    with cache.atomic_write(path) as tmp:
        torch.save(state, tmp)
    return path


def load_embedding(detector: Detector, path: str | Path) -> EmbeddingHead:
    """The head stored in ``path``; a fine-tuned file also loads its weights into
    ``detector``. Errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no FeatureNMS embedding head at {path}; train one with the "
            f"'featurenms-embedding' recipe (xaibench.detectors.featurenms.train_embedding)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        head = EmbeddingHead(**state["spec"])
        head.load_state_dict(state["head"])
    except Exception as exc:
        raise ValueError(f"{path} is not a FeatureNMS embedding file ({exc})") from exc
    if "detector_state" in state:
        detector.torch_module().load_state_dict(state["detector_state"])
    return head.to(detector.device).eval()


# ---------------------------------------------------------------------------------------------
# The recipe


def assign_to_gt(candidates: Detections, sample: Sample, min_iou: float) -> torch.Tensor:
    """(N,) index of the non-ignored GT each candidate overlaps most with IoU > ``min_iou``,
    else -1."""
    gts = [g for g in sample.instances if not g.ignore]
    if not gts or len(candidates) == 0:
        return torch.full((len(candidates),), -1, dtype=torch.long)
    boxes = torch.tensor(np.array([g.box for g in gts]), dtype=torch.float32)
    iou = box_iou(candidates.boxes.float().cpu(), boxes)
    best, index = iou.max(dim=1)
    return torch.where(best > min_iou, index, torch.full_like(index, -1))


@RECIPES.register("featurenms-embedding")
def train_embedding(
    detector: Detector,
    dataset: Sequence[Sample],
    config: EmbeddingConfig | None = None,
    progress: bool = True,
) -> tuple[EmbeddingHead, dict[str, Any]]:
    """Train a FeatureNMS embedding head for ``detector`` on ``dataset`` (pull/push loss).
    Returns the head (eval mode) and a summary (seconds, final loss, steps)."""
    config = config or EmbeddingConfig()
    torch.manual_seed(config.seed)
    network = _network(detector)
    model = network.torch_module()
    rng = np.random.default_rng(config.seed)
    with torch.no_grad():
        _, features = backbone_features(detector, dataset[0].image)
    head = EmbeddingHead(
        _in_features(network, features, config.patch), config.dim, config.hidden, config.patch
    ).to(detector.device)
    groups = [{"params": head.parameters(), "lr": config.lr}]
    for p in model.parameters():
        p.requires_grad_(config.fine_tune)
    if config.fine_tune:
        groups.append({"params": [p for p in model.parameters()], "lr": config.detector_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    losses: list[float] = []
    start = time.perf_counter()
    model.eval()
    with progress_bar(
        total=config.iterations, desc="featurenms-embedding", disable=not progress
    ) as bar:
        for _step in range(config.iterations):
            total = head.mlp[0].weight.sum() * 0.0
            for index in rng.integers(0, len(dataset), config.batch_size):
                total = total + _image_loss(detector, head, dataset[int(index)], config)
            loss = total / config.batch_size
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            bar.update()
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    info = {
        "seconds": time.perf_counter() - start,
        "iterations": config.iterations,
        "final_loss": float(np.mean(losses[-50:])),
    }
    return head.eval(), info


def _image_loss(
    detector: Detector, head: EmbeddingHead, sample: Sample, config: EmbeddingConfig
) -> torch.Tensor:
    if config.fine_tune:
        candidates = detector.detect([sample.image], nms=False)[0]
        candidates = _top(candidates, config)
        batch_input, features = backbone_features(detector, sample.image)
    else:
        with torch.no_grad():
            candidates, batch_input, features = detect_with_features(detector, sample.image)
            candidates = _top(candidates, config)
    inputs = candidate_inputs(detector, batch_input, features, candidates, config.patch)
    groups = assign_to_gt(candidates, sample, config.assign_iou).to(inputs.device)
    return pull_push_loss(head(inputs), groups, config.pull_margin, config.push_margin)


def _top(candidates: Detections, config: EmbeddingConfig) -> Detections:
    keep = torch.nonzero(candidates.scores > config.score_threshold).flatten()
    keep = keep[torch.argsort(candidates.scores[keep], descending=True)][: config.max_candidates]
    return candidates.index(keep)


def demo_embedding(detector: Detector, cache_dir: str | Path | None = None) -> Path:
    """The embedding file of a crowd demo detector, trained (frozen detector, ``DEMO_CONFIG``)
    on its synthetic crowd train split and cached beside its weights on first use."""
    from xaibench.detectors.zoo import CROWD_DEMOS, demo_data

    path = embedding_path(detector, cache_dir)
    if path.is_file():
        return path
    if detector.name not in CROWD_DEMOS:
        raise FileNotFoundError(
            f"no FeatureNMS embedding head for {detector.name} at {path}; train one with the "
            "'featurenms-embedding' recipe and pass its file as featurenms.embedding=PATH"
        )
    data = demo_data(cache_dir, mode="crowd")["train"]
    head, info = train_embedding(detector, data, DEMO_CONFIG)
    return save_embedding(path, head, detector, DEMO_CONFIG, info)


DEMO_CONFIG = EmbeddingConfig(iterations=300, batch_size=2)
"""The recipe's settings for the crowd demo detectors (frozen detector, 600 images seen)."""
