"""Compare NMS strategies on a crowd dataset: the paper's Table 5, Table 7 and Fig. 9.

``compare_strategies`` runs each strategy's whole pipeline (``strategy.run``: the detector's
pre-NMS candidates, then the strategy) on every image, times it, and scores the kept
detections with the CrowdDet metrics (``metrics/crowd.py``). Results are a tidy long pandas
frame (one row per detector, strategy and metric), from which ``table5`` / ``table7`` are
pivoted. ``sweep_odam_thresholds`` reuses one set of ODAM correlations per image for every
(T_l, T_h) pair (Fig. 9).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from xaibench.metrics.crowd import (
    CrowdReport,
    crowd_flags,
    evaluate_crowd,
    jaccard_index,
    summarise_ji,
)

from xaibench.datasets.crowdhuman import CrowdRecord
from xaibench.detector import Detector
from xaibench.registry import NMS
from xaibench.types import Detections, Sample

SWEEP_LOW: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
SWEEP_HIGH: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class StrategyRun:
    """One strategy on a dataset: per-image records (kept detections and GT), per-image kept
    detections, seconds per image of the whole pipeline, and the crowd report."""

    strategy: str
    params: dict[str, Any]
    records: list[CrowdRecord] = field(default_factory=list)
    kept: list[Detections] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    report: CrowdReport | None = None


def sample_record(sample: Sample, detections: Detections, label: int | None) -> CrowdRecord:
    """The CrowdDet record of a sample and its kept detections (of ``label`` if given)."""
    if label is not None:
        detections = detections.index(detections.labels == label)
    return CrowdRecord.from_sample(
        sample,
        detections.boxes.detach().cpu().numpy(),
        detections.scores.detach().cpu().numpy(),
        label=label,
    )


def compare_strategies(
    detector: Detector,
    samples: Sequence[Sample],
    strategies: Sequence[str],
    params: dict[str, dict[str, Any]] | None = None,
    label: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, StrategyRun]:
    """Run every strategy's pipeline on every sample (strategies interleaved per image, so
    that load affects them alike) and score them. ``params`` maps a strategy to its
    settings; ``label``: only that class counts (GT of other labels become ignore)."""
    params = params or {}
    built = {name: NMS.build(name, **params.get(name, {})) for name in strategies}
    runs = {name: StrategyRun(name, s.params()) for name, s in built.items()}
    if samples:  # one untimed pass: first-call costs (loading a FeatureNMS head) stay out
        for strategy in built.values():
            strategy.run(detector, samples[0].image)
    for done, sample in enumerate(samples, start=1):
        for name, strategy in built.items():
            start = time.perf_counter()
            output = strategy.run(detector, sample.image)
            runs[name].seconds.append(time.perf_counter() - start)
            kept = output.detections
            runs[name].kept.append(kept)
            runs[name].records.append(sample_record(sample, kept, label))
        if progress is not None:
            progress(done)
    for run in runs.values():
        run.report = evaluate_crowd(run.records)
    return runs


def results_frame(runs: dict[str, StrategyRun], detector: str) -> pd.DataFrame:
    """Tidy long frame: detector, strategy, metric, value, params (json), reason."""
    rows = []
    for name, run in runs.items():
        assert run.report is not None
        values = {
            **run.report.values(),
            "seconds_per_image": float(np.mean(run.seconds)) if run.seconds else np.nan,
            "images": len(run.records),
        }
        for t, v in run.report.ji_per_threshold.items():
            values[f"ji@{t:.1f}"] = float(v)
        for metric, value in values.items():
            rows.append(
                {
                    "detector": detector,
                    "strategy": name,
                    "metric": metric,
                    "value": float(value),
                    "params": json.dumps(run.params, sort_keys=True, default=str),
                    "reason": run.report.reasons.get(metric, ""),
                }
            )
    return pd.DataFrame(
        rows, columns=["detector", "strategy", "metric", "value", "params", "reason"]
    )


def _wide(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (detector, strategy), one column per metric."""
    return results.pivot_table(
        index=["detector", "strategy"], columns="metric", values="value", sort=False
    )


def table5(results: pd.DataFrame) -> pd.DataFrame:
    """Paper Table 5 layout: one row per detector and strategy; AP50 and JI in %, MR^-2 in %,
    seconds per image of the whole pipeline."""
    wide = _wide(results)
    out = pd.DataFrame(
        {
            "AP50": 100 * wide["ap50"],
            "JI": 100 * wide["ji"],
            "MR-2": 100 * wide["mr2"],
            "s/img": wide["seconds_per_image"],
        }
    )
    return out.reset_index()


def table7(results: pd.DataFrame) -> pd.DataFrame:
    """Paper Table 7 layout: recall (%) of all, sparse and crowd GTs per strategy (at its best
    JI score threshold), with the GT counts; then the crowd and sparse recall of everything
    the strategy kept (score > 0.05)."""
    wide = _wide(results)
    out = pd.DataFrame(
        {
            "total": 100 * wide["recall_all"],
            "sparse": 100 * wide["recall_sparse"],
            "crowd": 100 * wide["recall_crowd"],
            "GT sparse": wide["recall_num_sparse"].astype(int),
            "GT crowd": wide["recall_num_crowd"].astype(int),
            "score >": wide["ji_threshold"],
            "crowd, all candidates": 100 * wide["recall_any_crowd"],
            "sparse, all candidates": 100 * wide["recall_any_sparse"],
        }
    )
    return out.reset_index()


# ---------------------------------------------------------------------------------------------
# Fig. 9: T_l x T_h


def sweep_odam_thresholds(
    detector: Detector,
    samples: Sequence[Sample],
    params: dict[str, Any] | None = None,
    low: Sequence[float] = SWEEP_LOW,
    high: Sequence[float] = SWEEP_HIGH,
    label: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """Best JI of Odam-NMS for every (T_l, T_h): tidy frame t_low, t_high, ji (one set of
    ODAM maps and correlations per image, shared by all pairs)."""
    strategy = NMS.build("odamnms", **(params or {}))
    per_pair: dict[tuple[float, float], list[CrowdRecord]] = {(a, b): [] for a in low for b in high}
    for done, sample in enumerate(samples, start=1):
        found = detector.detect([sample.image], nms=False)[0]
        pre = strategy.above_threshold(found)
        cands = found.index(pre)
        corr = (
            strategy.correlations(strategy.heat_maps(detector, sample.image, cands))
            if len(cands)
            else None
        )
        for a, b in per_pair:
            strategy.t_low, strategy.t_high = a, b
            if corr is None:
                out = strategy.finish(found, pre, pre, found.scores[pre])
            else:
                keep, scores = strategy.keep_from(cands, corr)
                out = strategy.finish(found, pre, keep, scores)
            per_pair[(a, b)].append(sample_record(sample, out.detections, label))
        if progress is not None:
            progress(done)
    rows = []
    for (a, b), records in per_pair.items():
        ji = summarise_ji(jaccard_index(records))
        rows.append({"t_low": a, "t_high": b, "ji": float(ji.max())})
    return pd.DataFrame(rows)


def plot_sweep(sweep: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Heat map of JI (%) over T_l (rows) x T_h (columns), as paper Fig. 9; the NMS corner
    (T_l = 0, T_h = 1) is starred."""
    grid = sweep.pivot(index="t_low", columns="t_high", values="ji") * 100
    fig = Figure(figsize=(6.5, 5))
    ax = fig.subplots()
    sns.heatmap(grid, annot=True, fmt=".1f", cmap="viridis", ax=ax, cbar_kws={"label": "JI (%)"})
    if 0.0 in grid.index and 1.0 in grid.columns:
        r, c = list(grid.index).index(0.0), list(grid.columns).index(1.0)
        ax.plot(c + 0.5, r + 0.15, marker="*", color="black", markersize=12)
    ax.set_xlabel("T_h")
    ax.set_ylabel("T_l")
    ax.set_title(title or "Odam-NMS: best JI over T_l x T_h")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


# ---------------------------------------------------------------------------------------------
# Which boxes each strategy kept on one crowded image


def most_crowded(samples: Sequence[Sample]) -> int:
    """Index of the sample with the most crowd GTs (IoU > 0.5 with another GT); 0 if none."""
    counts = []
    for s in samples:
        boxes = np.array([g.box for g in s.instances], dtype=np.float64).reshape(-1, 4)
        ignore = np.array([g.ignore for g in s.instances], dtype=bool)
        counts.append(int(crowd_flags(boxes, ignore).sum()))
    return int(np.argmax(counts)) if counts else 0


def plot_kept(
    sample: Sample, runs: dict[str, StrategyRun], index: int, path: str | Path, min_score: float
) -> Path:
    """One panel per strategy: the image, its GT (white dashed; ignore grey) and the boxes the
    strategy kept on image ``index`` with score > ``min_score`` (coloured by score)."""
    fig = Figure(figsize=(3.2 * len(runs), 3.6))
    axes = np.atleast_1d(fig.subplots(1, len(runs)))
    cmap = sns.color_palette("rocket_r", as_cmap=True)
    for ax, (name, run) in zip(axes, runs.items(), strict=True):
        ax.imshow(sample.image)
        for g in sample.instances:
            x1, y1, x2, y2 = g.box
            colour = "grey" if g.ignore else "white"
            ax.add_patch(
                Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ls="--", lw=1, ec=colour)
            )
        kept = run.kept[index]
        shown = 0
        for box, score in zip(kept.boxes.tolist(), kept.scores.tolist(), strict=True):
            if score <= min_score:
                continue
            shown += 1
            x1, y1, x2, y2 = box
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.5, ec=cmap(score)))
        ax.set_title(f"{name}: {shown} kept (score > {min_score:g})", fontsize=9)
        ax.set_axis_off()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
