"""Methods x metrics over a COCO-format dataset, for one or more detectors.

Per image: detect (through the white-box trace when a method needs it), select the instances
to explain (``xaibench.selection``), explain all of them in one call per method, score the
maps with every metric. Results are stored first, aggregated after:

- ``instances.csv``: one row per (detector, method, explained instance): ids, box, score,
  match, seconds per map, every metric column, and ``reason`` for each NaN. A row is appended
  after each image, so an interrupted run keeps everything done; with ``resume`` the images
  already in the file are skipped. A failing image or method is recorded with its reason.
- ``curves.csv``: the points of every curve (deletion, insertion, VEA, sanity) per instance;
- ``settings.json``: the settings and the dataset (a resumed run must use the same ones);
- ``summary.csv`` / ``summary.md``: mean and 95% confidence interval (t interval) per
  detector, method and metric column (``summarise``); PNG plots of the curves (``plot_all``).

Metrics whose ``scope`` is ``"detector"`` (feature drift) ignore the explanation method and
run once per image, in rows whose method is ``DETECTOR_ROWS``.
"""

from __future__ import annotations

import csv
import json
import math
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator
from rich.progress import Progress
from scipy import stats

from xaibench.datasets.coco import CocoDataset
from xaibench.detector import Detector
from xaibench.labels import label_mapping
from xaibench.method import ExplanationMethod
from xaibench.metric import Curve, ExplainedBatch, Metric, MetricResult
from xaibench.plots import plot_curves
from xaibench.registry import DETECTORS, METHODS, METRICS
from xaibench.selection import SELECTION_MODES, select_instances
from xaibench.types import ATTRIBUTES, Detections, Instance, Saliency, Sample, Target

DETECTOR_ROWS = "(detector)"
"""The method name of rows written by detector-scope metrics (feature drift)."""

BASE_COLUMNS: tuple[str, ...] = (
    "detector",
    "method",
    "image_id",
    "file_name",
    "detection",
    "attribute",
    "label",
    "class_name",
    "score",
    "x1",
    "y1",
    "x2",
    "y2",
    "gt_id",
    "match_iou",
    "seconds",
)
CURVE_COLUMNS: tuple[str, ...] = (
    "detector",
    "method",
    "image_id",
    "detection",
    "curve",
    "point",
    "x",
    "x_name",
    "x_label",
    "y",
    "y_label",
)


class EvaluationSettings(BaseModel):
    """What to run. ``*_params`` map a registered name to its keyword arguments;
    ``selection_params`` go to ``select_instances``; ``max_images`` / ``max_instances``
    (per image, best scores first) scale the run down."""

    model_config = ConfigDict(extra="forbid")

    detectors: list[str] = Field(min_length=1)
    methods: list[str] = Field(min_length=1)
    metrics: list[str] = Field(min_length=1)
    detector_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    method_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    metric_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    attribute: str = "score"
    selection: str = "paper"
    selection_params: dict[str, Any] = Field(default_factory=dict)
    max_images: int | None = Field(default=None, ge=1)
    max_instances: int | None = Field(default=None, ge=1)
    resume: bool = True

    @field_validator("attribute")
    @classmethod
    def _attribute(cls, value: str) -> str:
        if value not in (*ATTRIBUTES, "combined"):
            raise ValueError(f"attribute must be one of {', '.join((*ATTRIBUTES, 'combined'))}")
        return value

    @field_validator("selection")
    @classmethod
    def _selection(cls, value: str) -> str:
        if value not in SELECTION_MODES:
            raise ValueError(f"selection must be one of {', '.join(SELECTION_MODES)}")
        return value

    @field_validator("detectors", "methods", "metrics")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        repeated = sorted({v for v in value if value.count(v) > 1})
        if repeated:
            raise ValueError(f"names must be unique, repeated: {', '.join(repeated)}")
        return value


@dataclass
class EvaluationResult:
    """The stored per-instance table, the summary table and the files written."""

    instances: pd.DataFrame
    summary: pd.DataFrame
    files: dict[str, Path]
    notes: list[str]


# -- building blocks ---------------------------------------------------------------------------


def _relabel(instances: Sequence[Instance], mapping: dict[int, int]) -> list[Instance]:
    return [
        Instance(
            box=inst.box,
            label=mapping.get(inst.label, inst.label),
            mask=inst.mask,
            ignore=inst.ignore,
            id=inst.id,
            visible_box=inst.visible_box,
        )
        for inst in instances
    ]


def metric_columns(metrics: Sequence[Metric]) -> list[str]:
    """Every metric's columns, in order."""
    return [c for m in metrics for c in m.higher_is_better]


class _Writer:
    """Appends rows to a CSV whose header is fixed when it is created."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path = path
        self.columns = list(columns)
        if path.exists():
            with path.open(newline="") as f:
                header = next(csv.reader(f), [])
            if header != self.columns:
                raise ValueError(
                    f"{path} was written with other columns ({', '.join(header)}); use another "
                    "output folder or resume=False to start again"
                )
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(self.columns)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writerows(rows)
            f.flush()


def _done_images(path: Path) -> set[tuple[str, str]]:
    """(detector, image id) pairs already in an instances.csv."""
    if not path.exists():
        return set()
    done = pd.read_csv(path, usecols=["detector", "image_id"], dtype=str)
    return set(zip(done["detector"], done["image_id"], strict=True))


def _error(err: BaseException) -> str:
    last = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
    where = f" ({Path(last[0].filename).name}:{last[0].lineno})" if last else ""
    return f"{type(err).__name__}: {err}{where}"


# -- one image ---------------------------------------------------------------------------------


@dataclass
class _Context:
    detector_name: str
    detector: Detector
    methods: dict[str, ExplanationMethod]
    metrics: list[Metric]
    settings: EvaluationSettings
    labels: dict[int, int]


def _instance_rows(
    ctx: _Context,
    method: str,
    sample: Sample,
    detections: Detections,
    targets: Sequence[Target],
    gt_index: Sequence[int],
    ious: Sequence[float],
    seconds: Sequence[float],
) -> list[dict[str, Any]]:
    rows = []
    names = ctx.detector.class_names
    for target, g, iou, sec in zip(targets, gt_index, ious, seconds, strict=True):
        i = target.index
        label = int(detections.labels[i])
        box = [float(v) for v in detections.boxes[i]]
        rows.append(
            {
                "detector": ctx.detector_name,
                "method": method,
                "image_id": sample.image_id,
                "file_name": sample.file_name,
                "detection": i,
                "attribute": target.attribute,
                "label": label,
                "class_name": names[label] if 0 <= label < len(names) else str(label),
                "score": float(detections.scores[i]),
                "x1": box[0],
                "y1": box[1],
                "x2": box[2],
                "y2": box[3],
                "gt_id": sample.instances[g].id if g >= 0 else None,
                "match_iou": iou,
                "seconds": sec,
                "reason": "",
            }
        )
    return rows


def _add_result(
    rows: list[dict[str, Any]], curves: list[dict[str, Any]], result: MetricResult
) -> None:
    """Merge a metric's values, reasons and curve points into the rows of its batch."""
    for r, row in enumerate(rows):
        for column, values in result.values.items():
            row[column] = float(values[r])
        why = result.reason(r)
        if why:
            row["reason"] = "; ".join(x for x in (row["reason"], why) if x)
        for name, curve in result.curves.items():
            names = curve.x_names or [""] * len(curve.x)
            for p, (x, y) in enumerate(zip(curve.x, curve.y[r], strict=True)):
                curves.append(
                    {
                        "detector": row["detector"],
                        "method": row["method"],
                        "image_id": row["image_id"],
                        "detection": row["detection"],
                        "curve": name,
                        "point": p,
                        "x": float(x),
                        "x_name": names[p],
                        "x_label": curve.x_label,
                        "y": float(y),
                        "y_label": curve.y_label,
                    }
                )


def _score(
    ctx: _Context,
    metrics: Sequence[Metric],
    batch: ExplainedBatch,
    method: ExplanationMethod | None,
    rows: list[dict[str, Any]],
    curves: list[dict[str, Any]],
) -> None:
    for metric in metrics:
        try:
            result = metric.compute(batch, ctx.detector, method)
        except Exception as err:  # one failing metric must not lose the others
            message = f"{metric.name} failed: {_error(err)}"
            for row in rows:
                row["reason"] = "; ".join(x for x in (row["reason"], message) if x)
            continue
        _add_result(rows, curves, result)


def evaluate_image(
    ctx: _Context, sample: Sample
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows (instances, curve points) of one image for every method and metric."""
    detector = ctx.detector
    image = sample.image
    instances = _relabel(sample.instances, ctx.labels)
    sample = Sample(sample.image, sample.image_id, instances, sample.file_name)
    # every method explains the same detections: those of the trace when one is needed
    white = any(m.access == "white-box" for m in ctx.methods.values())
    trace = detector.trace(image) if white else None
    detections = trace.detections if trace is not None else detector.detect([image])[0]
    s = ctx.settings
    selected = select_instances(detections, instances, s.selection, **s.selection_params)  # type: ignore[arg-type]
    if s.max_instances is not None:
        selected = selected[: s.max_instances]
    if not selected:
        return [], []
    targets = [Target(x.detection, s.attribute) for x in selected]  # type: ignore[arg-type]
    gt_index = [x.gt if x.gt is not None else -1 for x in selected]
    ious = [x.iou for x in selected]
    rows: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    height, width = image.shape[:2]
    # all maps first (from the one trace), then the metrics, which run the detector again
    explained: dict[str, list[Saliency] | str] = {}
    for label, method in ctx.methods.items():
        try:
            explained[label] = method.explain(detector, image, targets, trace=trace)
        except Exception as err:
            explained[label] = f"{label} failed: {_error(err)}"
    per_detector = [m for m in ctx.metrics if m.scope == "detector"]
    if per_detector:
        empty = np.zeros((len(targets), height, width), np.float32)  # maps are not used
        batch = ExplainedBatch(image, empty, targets, detections, instances, np.asarray(gt_index))
        detector_rows = _instance_rows(
            ctx, DETECTOR_ROWS, sample, detections, targets, gt_index, ious, [math.nan] * len(ious)
        )
        _score(ctx, per_detector, batch, None, detector_rows, curves)
        rows.extend(detector_rows)
    explanation_metrics = [m for m in ctx.metrics if m.scope != "detector"]
    for label, maps in explained.items():
        seconds = [math.nan] * len(ious) if isinstance(maps, str) else [m.seconds for m in maps]
        method_rows = _instance_rows(
            ctx, label, sample, detections, targets, gt_index, ious, seconds
        )
        if isinstance(maps, str):
            for row in method_rows:
                row["reason"] = maps
        else:
            stacked = np.stack([m.map for m in maps])
            batch = ExplainedBatch(
                image, stacked, targets, detections, instances, np.asarray(gt_index)
            )
            _score(ctx, explanation_metrics, batch, ctx.methods[label], method_rows, curves)
        rows.extend(method_rows)
    return rows, curves


# -- the run -------------------------------------------------------------------------------


def run_evaluation(
    dataset: CocoDataset,
    settings: EvaluationSettings,
    out: str | Path,
    progress: bool = True,
    build_detector: Callable[[str], Detector] | None = None,
) -> EvaluationResult:
    """Evaluate ``settings`` on ``dataset``, writing into ``out`` (see the module docstring).
    ``build_detector`` (name -> Detector) replaces ``DETECTORS.build`` (e.g. for an
    already-built detector)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"instances": out / "instances.csv", "curves": out / "curves.csv"}
    if not settings.resume:
        for path in files.values():
            path.unlink(missing_ok=True)
    files["settings"] = _check_settings(settings, dataset, out / "settings.json")
    metrics = [METRICS.build(n, **settings.metric_params.get(n, {})) for n in settings.metrics]
    columns = [*BASE_COLUMNS, *metric_columns(metrics), "reason"]
    instances_csv = _Writer(files["instances"], columns)
    curves_csv = _Writer(files["curves"], CURVE_COLUMNS)
    done = _done_images(files["instances"])
    count = len(dataset) if settings.max_images is None else min(settings.max_images, len(dataset))
    methods = {m: METHODS.build(m, **settings.method_params.get(m, {})) for m in settings.methods}
    with Progress(disable=not progress) as bar:
        for name in settings.detectors:
            task = bar.add_task(f"{name}", total=count)
            detector = (
                build_detector(name)
                if build_detector is not None
                else DETECTORS.build(name, **settings.detector_params.get(name, {}))
            )
            ctx = _Context(
                name,
                detector,
                methods,
                metrics,
                settings,
                label_mapping(dataset.class_names, detector.class_names),
            )
            for index in range(count):
                image_id = str(dataset.image_ids[index])
                if (name, image_id) in done:
                    bar.advance(task)
                    continue
                try:
                    rows, curve_rows = evaluate_image(ctx, dataset[index])
                except Exception as err:  # record the image's failure and go on
                    rows = [{"detector": name, "image_id": image_id, "reason": _error(err)}]
                    curve_rows = []
                curves_csv.append(curve_rows)
                instances_csv.append(rows)  # last: its rows mark the image as done
                bar.advance(task)
    table = pd.read_csv(files["instances"])
    higher = {c: better for m in metrics for c, better in m.higher_is_better.items()}
    summary = summarise(table, higher)
    files |= write_summary(summary, out)
    files |= plot_all(pd.read_csv(files["curves"]), out / "plots")
    notes = [note for m in metrics for note in m.notes(table)]
    if notes:
        with (out / "summary.md").open("a") as f:
            f.write("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return EvaluationResult(table, summary, files, notes)


def _check_settings(settings: EvaluationSettings, dataset: CocoDataset, path: Path) -> Path:
    """Write ``settings.json`` (settings and dataset); when resuming, refuse stored results
    made with other settings (``max_images`` may grow)."""
    record = {
        "settings": settings.model_dump(exclude={"resume", "max_images"}),
        "dataset": {"annotations": str(dataset.annotation_file), "images": str(dataset.image_dir)},
    }
    text = json.dumps(record, indent=2, sort_keys=True, default=str)
    if settings.resume and path.exists() and path.read_text() != text:
        raise ValueError(
            f"{path.parent} holds results of other settings (see {path}); use another output "
            "folder or resume=False to start again"
        )
    path.write_text(text)
    return path


# -- aggregates ----------------------------------------------------------------------------------


def mean_ci(values: np.ndarray) -> tuple[float, float, int]:
    """(mean, 95% CI half-width by the t distribution, n) of the finite values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return math.nan, math.nan, 0
    if len(v) == 1 or np.all(v == v[0]):
        return float(v.mean()), 0.0 if len(v) > 1 else math.nan, len(v)
    return float(v.mean()), float(stats.sem(v) * stats.t.ppf(0.975, len(v) - 1)), len(v)


def summarise(instances: pd.DataFrame, higher_is_better: dict[str, bool]) -> pd.DataFrame:
    """Long table: detector, method, metric, n, mean, ci95 (half-width), higher_is_better;
    one row per group and metric column that has values."""
    records = []
    columns = [c for c in higher_is_better if c in instances.columns]
    for (detector, method), group in instances.groupby(["detector", "method"], sort=False):
        for column in columns:
            mean, ci, n = mean_ci(pd.to_numeric(group[column], errors="coerce").to_numpy())
            if n:
                records.append(
                    {
                        "detector": detector,
                        "method": method,
                        "metric": column,
                        "n": n,
                        "mean": mean,
                        "ci95": ci,
                        "higher_is_better": higher_is_better[column],
                    }
                )
    return pd.DataFrame(
        records,
        columns=["detector", "method", "metric", "n", "mean", "ci95", "higher_is_better"],
    )


def wide_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per detector and method, one column per metric ("mean ± ci95 (n)"), the
    column names marked ↑ (higher is better) or ↓."""
    if summary.empty:
        return pd.DataFrame(columns=["detector", "method"])
    cells = summary.assign(
        cell=[
            f"{m:.3g} ± {c:.2g} (n={n})" if np.isfinite(c) else f"{m:.3g} (n={n})"
            for m, c, n in zip(summary["mean"], summary["ci95"], summary["n"], strict=True)
        ],
        column=[
            f"{metric} {'↑' if up else '↓'}"
            for metric, up in zip(summary["metric"], summary["higher_is_better"], strict=True)
        ],
    )
    order = list(dict.fromkeys(cells["column"]))
    wide = cells.pivot_table(
        index=["detector", "method"], columns="column", values="cell", aggfunc="first", sort=False
    )
    return wide.reindex(columns=order).fillna("-").reset_index()


def write_summary(summary: pd.DataFrame, out: Path) -> dict[str, Path]:
    """``summary.csv`` (long) and ``summary.md`` (wide, Markdown)."""
    csv_path, md_path = out / "summary.csv", out / "summary.md"
    summary.to_csv(csv_path, index=False)
    md_path.write_text(
        "# Evaluation summary\n\nmean ± 95% confidence interval (t), n instances; "
        "↑ higher is better, ↓ lower is better.\n\n"
        + wide_table(summary).to_markdown(index=False)
        + "\n"
    )
    return {"summary_csv": csv_path, "summary_md": md_path}


def plot_all(curves: pd.DataFrame, folder: Path) -> dict[str, Path]:
    """One PNG per curve name (e.g. deletion, insertion, vea), one line per detector and
    method, mean and 95% CI over instances. Curves over named steps (sanity checks over a
    detector's blocks) get one PNG per detector: ``<curve>_<detector>.png``."""
    files: dict[str, Path] = {}
    for name, group in curves.groupby("curve", sort=False):
        per_detector = group["x_name"].notna().any()
        parts = group.groupby("detector", sort=False) if per_detector else [(None, group)]
        for detector, part in parts:
            stem = str(name) if detector is None else f"{name}_{detector}"
            series = [
                (f"{d} / {m}" if detector is None else str(m), _curve(g))
                for (d, m), g in part.groupby(["detector", "method"], sort=False)
            ]
            files[f"plot_{stem}"] = plot_curves(
                series, folder / f"{stem}.png", title=stem, zero_line=bool(per_detector)
            )
    return files


def _curve(points: pd.DataFrame) -> Curve:
    """The curve of one detector and method from its rows of ``curves.csv``."""
    wide = points.pivot_table(
        index=["image_id", "detection"], columns="point", values="y", aggfunc="first"
    )
    first = points.drop_duplicates("point").sort_values("point")
    names = ["" if pd.isna(v) else str(v) for v in first["x_name"]]
    return Curve(
        first["x"].to_numpy(),
        wide.reindex(columns=first["point"]).to_numpy(),
        str(first["x_label"].iloc[0]),
        str(first["y_label"].iloc[0]),
        names if any(names) else None,
    )
