"""Sanity checks by model parameter randomisation (Adebayo et al., NeurIPS 2018).

The detector's parameters are grouped into blocks (``Detector.parameter_blocks``; by default
by module path, ``depth`` leading name components, e.g. ``backbone.body.layer2``,
``head.classification_head.cls_logits``, in the order the modules are registered: input to
head). ``cascading`` re-initialises the blocks
from the head towards the input, cumulatively; ``independent`` one block at a time. After each
step the same output units (same provenance: ``Detector.trace_units``) are explained again and
compared with their maps before randomisation by Spearman rank correlation (of the maps and of
their absolute values), SSIM and HOG similarity (Pearson correlation of HOG features), the
last two on min-max normalised maps. A method passes when the similarity collapses.

``region``: where the maps are compared. ``box`` (default): inside the unit's predicted box
(xyxy, rounded outwards to whole pixels). The explanation of one unit lives in that unit's
receptive field whatever the parameters, so over the whole image (``image``, the literal
reading of Adebayo et al.) both maps share a large zero area whose tied ranks keep the
correlation high even for a fully random model; the box compares what the parameters decide.

Re-initialisation calls each module's ``reset_parameters`` (PyTorch's initialisation; batch
norms become identity-like with reset statistics) and draws parameters of modules without it
from N(0, 0.01^2), under ``seed``; the original parameters are restored afterwards.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from skimage.feature import hog
from skimage.metrics import structural_similarity
from torch import nn
from torchvision.ops import box_iou

from xaibench.detector import Detector
from xaibench.detector import parameter_blocks as parameter_blocks  # re-exported
from xaibench.method import ExplanationMethod
from xaibench.metric import Curve, ExplainedBatch, Metric, MetricResult
from xaibench.plots import plot_curves
from xaibench.registry import METRICS
from xaibench.types import Detections, Target

RandomisationMode = Literal["cascading", "independent"]
MEASURES: tuple[str, ...] = ("spearman", "spearman_abs", "ssim", "hog")
SanityRegion = Literal["box", "image"]
HOG_CELL = 8
"""Largest HOG cell (pixels, 3 x 3 cells per block); smaller maps use cells of a third of
their shorter side, at least 2 px (maps under 6 px get no HOG similarity)."""


# -- similarity ----------------------------------------------------------------------------


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo)


def _correlation(kind, a: np.ndarray, b: np.ndarray) -> float:
    if a.min() == a.max() or b.min() == b.max():
        return float("nan")
    return float(kind(a.ravel(), b.ravel())[0])


def map_similarity(before: np.ndarray, after: np.ndarray) -> dict[str, float]:
    """Spearman (``spearman``), Spearman of absolute values (``spearman_abs``), SSIM and HOG
    similarity of two (H, W) maps; NaN where a map is constant or not finite (SSIM: also
    under 7 px, HOG: under 6 px per side)."""
    a, b = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"maps to compare differ in shape: {a.shape} and {b.shape}")
    nan = dict.fromkeys(MEASURES, float("nan"))
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return nan
    out = {
        "spearman": _correlation(spearmanr, a, b),
        "spearman_abs": _correlation(spearmanr, np.abs(a), np.abs(b)),
    }
    if a.min() == a.max() or b.min() == b.max():
        return {**nan, **out}
    an, bn = _minmax(a), _minmax(b)
    short = min(a.shape)
    ssim = structural_similarity(an, bn, data_range=1.0) if short >= 7 else float("nan")
    out["ssim"] = float(ssim)
    cell = min(HOG_CELL, short // 3)
    if cell >= 2:
        hog_a, hog_b = (hog(m, pixels_per_cell=(cell, cell)) for m in (an, bn))
        out["hog"] = _correlation(pearsonr, hog_a, hog_b)
    else:
        out["hog"] = float("nan")
    return out


def compared_region(heat: np.ndarray, box: np.ndarray | None) -> np.ndarray:
    """The part of ``heat`` (H, W) inside ``box`` (xyxy, rounded outwards, clipped to the
    map), or the whole map when ``box`` is None."""
    if box is None:
        return heat
    h, w = heat.shape
    x1, y1 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
    x2, y2 = min(int(np.ceil(box[2])), w), min(int(np.ceil(box[3])), h)
    return heat[y1 : max(y2, y1 + 1), x1 : max(x2, x1 + 1)]


# -- randomisation --------------------------------------------------------------------------


def randomisation_steps(
    blocks: Sequence[tuple[str, list[str]]], mode: RandomisationMode
) -> list[tuple[str, list[str]]]:
    """(label, module names to re-initialise) per step: ``cascading`` accumulates the blocks
    from the last (head) to the first (input); ``independent`` takes one block at a time."""
    if mode == "cascading":
        steps, done = [], []
        for block, names in reversed(blocks):
            done = [*done, *names]
            steps.append((block, done))
        return steps
    if mode == "independent":
        return [(block, list(names)) for block, names in blocks]
    raise ValueError(f"mode must be 'cascading' or 'independent', got {mode!r}")


def reinitialise(module: nn.Module, names: Sequence[str], seed: int = 0) -> None:
    """Re-initialise the parameters of the submodules ``names`` in place (see module doc).
    Each submodule draws from its own seed (``seed`` and its position in the module), so a
    block gets the same values whichever other blocks are re-initialised with it."""
    position = {name: i for i, (name, _) in enumerate(module.named_modules())}
    with torch.random.fork_rng(devices=[]):
        for name in names:
            torch.manual_seed(seed * 1_000_003 + position[name])
            m = module.get_submodule(name)
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
            else:
                with torch.no_grad():
                    for p in m.parameters(recurse=False):
                        p.normal_(0.0, 0.01)


@contextmanager
def randomised(module: nn.Module, names: Sequence[str], seed: int = 0) -> Iterator[nn.Module]:
    """Within the block, the submodules ``names`` of ``module`` are re-initialised; the
    original parameters and buffers come back on exit."""
    saved = copy.deepcopy(module.state_dict())
    try:
        reinitialise(module, names, seed)
        yield module
    finally:
        module.load_state_dict(saved)


# -- the check ---------------------------------------------------------------------------------


@dataclass
class SanityCurve:
    """Similarity of each target's map before and after each randomisation step.

    ``steps`` (S,) labels the blocks re-initialised (cascading: the last one added);
    ``similarity`` maps each measure to (T, S); ``unit`` says per target how its unit was
    found again ("provenance", or "box IoU" where the detector cannot re-read a unit);
    ``reasons`` (T, S) why a similarity is NaN (None where defined).
    """

    mode: str
    steps: list[str]
    similarity: dict[str, np.ndarray]
    unit: list[str]
    reasons: np.ndarray


def _same_units_by_iou(
    original: Detections, randomised_dets: Detections, targets: Sequence[Target]
) -> list[int | None]:
    """For detectors that cannot re-read a unit: the randomised model's detection of the same
    class with the highest box IoU (> 0), per target."""
    if len(randomised_dets) == 0:
        return [None] * len(targets)
    iou = box_iou(original.boxes.float().cpu(), randomised_dets.boxes.float().cpu())
    same = original.labels.cpu()[:, None] == randomised_dets.labels.cpu()[None]
    iou = torch.where(same, iou, torch.zeros_like(iou))
    out: list[int | None] = []
    for t in targets:
        best = int(iou[t.index].argmax())
        out.append(best if float(iou[t.index, best]) > 0 else None)
    return out


def _explain_units(
    detector: Detector,
    method: ExplanationMethod,
    image: np.ndarray,
    targets: Sequence[Target],
    units: Detections,
) -> tuple[list[np.ndarray | None], str]:
    """Maps of the same output units with the detector's current parameters."""
    try:
        trace = detector.trace_units(image, units)
    except NotImplementedError:
        trace = detector.trace(image)
        match = _same_units_by_iou(units, trace.detections, targets)
        moved = [
            Target(m, t.attribute) for t, m in zip(targets, match, strict=True) if m is not None
        ]
        found = iter(method.explain(detector, image, moved, trace=trace) if moved else [])
        maps = [None if m is None else next(found).map for m in match]
        return maps, "box IoU"
    return [s.map for s in method.explain(detector, image, targets, trace=trace)], "provenance"


def sanity_check(
    detector: Detector,
    method: ExplanationMethod,
    image: np.ndarray,
    targets: Sequence[Target],
    mode: RandomisationMode = "cascading",
    depth: int = 3,
    seed: int = 0,
    before: Sequence[np.ndarray] | None = None,
    region: SanityRegion = "box",
) -> SanityCurve:
    """Randomise the detector's parameters step by step (``mode``) and compare each target's
    map with its map before (``before``, (H, W) each, computed here when not given), over
    ``region`` (see the module docstring)."""
    if region not in ("box", "image"):
        raise ValueError(f"region must be 'box' or 'image', got {region!r}")
    module = detector.torch_module()
    trace = detector.trace(image)
    units = trace.detections
    boxes = [units.boxes[t.index].cpu().numpy() if region == "box" else None for t in targets]
    if before is None:
        before = [s.map for s in method.explain(detector, image, targets, trace=trace)]
    blocks = detector.parameter_blocks(depth)
    if not blocks:
        raise ValueError(
            f"{detector.name} declares no parameter blocks (its torch_module() holds no "
            "parameters in submodules): override Detector.parameter_blocks"
        )
    steps = randomisation_steps(blocks, mode)
    similarity = {m: np.full((len(targets), len(steps)), np.nan) for m in MEASURES}
    reasons = np.full((len(targets), len(steps)), None, dtype=object)
    unit = "provenance"
    for s, (_, names) in enumerate(steps):
        with randomised(module, names, seed):
            after, unit = _explain_units(detector, method, image, targets, units)
        for t, (b, a) in enumerate(zip(before, after, strict=True)):
            if a is None:
                reasons[t, s] = "no detection of the same class overlaps the unit after randomising"
                continue
            values = map_similarity(compared_region(b, boxes[t]), compared_region(a, boxes[t]))
            for m in MEASURES:
                similarity[m][t, s] = values[m]
            if any(np.isnan(v) for v in values.values()):
                reasons[t, s] = "a compared map is constant or too small (SSIM, HOG)"
    return SanityCurve(
        mode, [label for label, _ in steps], similarity, [unit] * len(targets), reasons
    )


def sanity_curves(curve: SanityCurve) -> list[tuple[str, Curve]]:
    """(measure, Curve over the steps) pairs of a sanity check, for ``plots.plot_curves``."""
    x = np.arange(len(curve.steps), dtype=np.float64)
    return [
        (
            measure,
            Curve(
                x,
                values,
                f"{curve.mode} randomisation (block re-initialised)",
                "similarity to the original map",
                list(curve.steps),
            ),
        )
        for measure, values in curve.similarity.items()
    ]


def plot_sanity(curve: SanityCurve, path: str | Path, title: str = "") -> Path:
    """Mean similarity per measure (95% interval over targets) against the step, as PNG."""
    return plot_curves(sanity_curves(curve), path, title or "sanity check", zero_line=True)


@METRICS.register("sanity")
class SanityCheck(Metric):
    """Model parameter randomisation (module docstring). Columns ``sanity_<measure>``: the
    similarity after the last cascading step (every block re-initialised), or, for
    ``independent``, the mean over the blocks; curves ``sanity_<measure>`` over the steps.
    Lower is better (the explanation depends on the parameters). ``methods`` limits the
    check to those methods (others get NaN with the reason): every step costs a full
    explanation, which for perturbation methods means thousands of detector runs."""

    name = "sanity"
    needs = "method"
    higher_is_better: ClassVar[dict[str, bool]] = {f"sanity_{m}": False for m in MEASURES}

    def __init__(
        self,
        mode: RandomisationMode = "cascading",
        depth: int = 3,
        seed: int = 0,
        region: SanityRegion = "box",
        methods: Sequence[str] | None = None,
    ) -> None:
        if mode not in ("cascading", "independent"):
            raise ValueError(f"mode must be 'cascading' or 'independent', got {mode!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if region not in ("box", "image"):
            raise ValueError(f"region must be 'box' or 'image', got {region!r}")
        self.mode: RandomisationMode = mode
        self.depth = depth
        self.seed = seed
        self.region: SanityRegion = region
        self.methods = None if methods is None else list(methods)

    def params(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "depth": self.depth,
            "seed": self.seed,
            "region": self.region,
            "methods": self.methods,
        }

    def compute(
        self,
        batch: ExplainedBatch,
        detector: Detector | None = None,
        method: ExplanationMethod | None = None,
    ) -> MetricResult:
        self._require(detector, method)
        assert detector is not None and method is not None
        skipped = None
        if self.methods is not None and method.name not in self.methods:
            skipped = f"sanity checks are limited to {', '.join(self.methods)}"
        elif not detector.parameter_blocks(self.depth):
            skipped = f"{detector.name} declares no parameter blocks to re-initialise"
        if skipped is not None:
            nan = np.full(len(batch), np.nan)
            return MetricResult.build(
                {f"sanity_{m}": nan for m in MEASURES},
                {f"sanity_{m}": [skipped] * len(batch) for m in MEASURES},
            )
        curve = sanity_check(
            detector,
            method,
            batch.image,
            batch.targets,
            self.mode,
            self.depth,
            self.seed,
            before=list(batch.maps),
            region=self.region,
        )
        values, reasons = {}, {}
        for m in MEASURES:
            sim = curve.similarity[m]
            if self.mode == "cascading":
                summary = sim[:, -1]
            else:
                counts = np.isfinite(sim).sum(axis=1)
                summary = np.where(
                    counts > 0, np.nansum(sim, axis=1) / np.maximum(counts, 1), np.nan
                )
            values[f"sanity_{m}"] = summary
            reasons[f"sanity_{m}"] = [
                next((r for r in curve.reasons[t] if r is not None), None)
                for t in range(len(batch))
            ]
        curves = {f"sanity_{name}": c for name, c in sanity_curves(curve)}
        return MetricResult.build(values, reasons, curves)
