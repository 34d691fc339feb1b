"""Methods x metrics over a dataset for one or more detectors: the units of work.

A unit is one method (a suite label, ``odam@p3``) on one image with one detector. Per image:
detect (the white-box trace, so that every method explains the same detections), select the
instances to explain (``xaibench.selection``; deterministic per detector and image, so all
methods explain the same instances and paired tests can match them), explain them in one call,
score the maps with every metric (``evaluate_units``). A unit gives ``UnitRows``: one row per
instance and metric column (``value`` NaN with a ``reason`` where undefined; a failing metric
gives NaN and its error in every column it owns), the curve points and one row per instance.
An image that cannot be read, detected or matched fails every unit on it (stage ``image``), a
method that raises fails its unit (stage ``method``, its instances kept with the reason).

Metrics whose ``scope`` is ``"detector"`` (feature drift) ignore the explanation method and
run in their own unit per image, whose method is ``DETECTOR_ROWS``.

``run_evaluation`` (``xaibench evaluate``) runs such units through the suite runner into the
results store ``OUT/results.sqlite`` and writes, from the store:

- ``instances.csv``: one row per (detector, method, explained instance): ids, box, score,
  match, seconds per map, every metric column, and ``reason`` for each NaN or failure;
- ``curves.csv``: the points of every curve (deletion, insertion, VEA, sanity) per instance;
- ``settings.json``: the settings and the dataset (a resumed run must use the same ones);
- ``summary.csv`` / ``summary.md``: mean and 95% confidence interval (t interval) per
  detector, method and metric column (``summarise``); PNG plots of the curves (``plot_all``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy import stats

from xaibench.detector import Detector, WhiteBoxTrace
from xaibench.method import ExplanationMethod
from xaibench.metric import Curve, ExplainedBatch, Metric, MetricResult, format_conventions
from xaibench.plots import plot_curves
from xaibench.registry import plugin_name
from xaibench.selection import SELECTION_MODES, SelectedInstance, select_instances
from xaibench.store import Unit, UnitRows
from xaibench.types import Detections, Instance, Sample, Target, check_attribute

DETECTOR_ROWS = "(detector)"
"""The method label of units and rows written by detector-scope metrics (feature drift)."""

BASE_COLUMNS: tuple[str, ...] = (
    "dataset",
    "detector",
    "method",
    "method_name",
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
    "dataset",
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
    """What ``xaibench evaluate`` runs. ``methods`` are labels (``odam``, or ``odam@p3`` for a
    method listed more than once); ``*_params`` map a label or registered name to its keyword
    arguments; ``selection_params`` go to ``select_instances``; ``max_images`` /
    ``max_instances`` (per image, best scores first) scale the run down; ``preset`` names a
    metric preset (``xaibench.presets``, e.g. ``paper``) merged under the given parameters."""

    model_config = ConfigDict(extra="forbid")

    detectors: list[str] = Field(min_length=1)
    methods: list[str] = Field(min_length=1)
    metrics: list[str] = Field(min_length=1)
    detector_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    method_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    metric_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    preset: str | None = None
    attribute: str = "score"
    selection: str = "paper"
    selection_params: dict[str, Any] = Field(default_factory=dict)
    max_images: int | None = Field(default=None, ge=1)
    max_instances: int | None = Field(default=None, ge=1)
    seed: int = 0
    resume: bool = True

    _attribute = field_validator("attribute")(staticmethod(check_attribute))

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
            raise ValueError(
                f"names must be unique, repeated: {', '.join(repeated)} (list a method twice "
                "as NAME@VARIANT, e.g. odam@p3 and odam@p5)"
            )
        return value

    @field_validator("methods")
    @classmethod
    def _labels(cls, value: list[str]) -> list[str]:
        for label in value:
            plugin_name(label)
        return value


@dataclass
class EvaluationResult:
    """The per-instance table, the summary table, the files written, the metrics' notes
    and the run's report (``xaibench.runner.RunReport``)."""

    instances: pd.DataFrame
    summary: pd.DataFrame
    files: dict[str, Path]
    notes: list[str]
    report: Any = None
    results: pd.DataFrame | None = None


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


def error_text(err: BaseException) -> str:
    """``Type: message (file:line)`` of an exception, for stored reasons."""
    last = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
    where = f" ({Path(last[0].filename).name}:{last[0].lineno})" if last else ""
    return f"{type(err).__name__}: {err}{where}"


def seed_unit(seed: int, unit: Unit) -> None:
    """Seed Python, NumPy and torch from the suite's seed and the unit's identity, so a unit
    gives the same numbers whatever ran before it in the process (resume, Ray workers)."""
    text = f"{seed}/{unit.dataset}/{unit.detector}/{unit.method}/{unit.image_id}"
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


# -- one image ---------------------------------------------------------------------------------


@dataclass
class UnitContext:
    """What the units of one dataset and detector share: the built plugins (``methods`` by
    label) and the run's settings; ``labels`` maps dataset labels to detector labels."""

    dataset_name: str
    dataset: Any
    detector_name: str
    detector: Detector
    methods: dict[str, ExplanationMethod]
    metrics: list[Metric]
    labels: dict[int, int]
    selection: str = "paper"
    selection_params: dict[str, Any] | None = None
    attribute: str = "score"
    max_instances: int | None = None
    seed: int = 0


@dataclass
class PreparedImage:
    """An image with its detections, the trace they came from and the selected instances."""

    sample: Sample
    trace: WhiteBoxTrace | None
    detections: Detections
    selected: list[SelectedInstance]

    @property
    def gt_index(self) -> np.ndarray:
        return np.asarray([x.gt if x.gt is not None else -1 for x in self.selected])


def prepare_image(ctx: UnitContext, index: int) -> PreparedImage:
    """Read image ``index``, relabel its ground truth, detect (through the trace, falling back
    to black-box detection for a detector without one) and select the instances."""
    sample = ctx.dataset[index]
    instances = _relabel(sample.instances, ctx.labels)
    sample = Sample(sample.image, sample.image_id, instances, sample.file_name)
    try:
        trace: WhiteBoxTrace | None = ctx.detector.trace(sample.image)
    except NotImplementedError:
        trace = None
    detections = trace.detections if trace is not None else ctx.detector.detect([sample.image])[0]
    selected = select_instances(
        detections,
        instances,
        ctx.selection,  # type: ignore[arg-type]
        **(ctx.selection_params or {}),
    )
    if ctx.max_instances is not None:
        selected = selected[: ctx.max_instances]
    return PreparedImage(sample, trace, detections, selected)


def _instance_rows(
    ctx: UnitContext, unit: Unit, image: PreparedImage, seconds: Sequence[float]
) -> list[dict[str, Any]]:
    rows = []
    names = ctx.detector.class_names
    det = image.detections
    for x, sec in zip(image.selected, seconds, strict=True):
        i = x.detection
        label = int(det.labels[i])
        box = [float(v) for v in det.boxes[i]]
        rows.append(
            {
                "dataset": unit.dataset,
                "detector": unit.detector,
                "method": unit.method,
                "method_name": unit.method_name,
                "image_id": str(image.sample.image_id),
                "file_name": image.sample.file_name,
                "detection": i,
                "attribute": ctx.attribute,
                "label": label,
                "class_name": names[label] if 0 <= label < len(names) else str(label),
                "score": float(det.scores[i]),
                "x1": box[0],
                "y1": box[1],
                "x2": box[2],
                "y2": box[3],
                "gt_id": None if x.gt is None else str(image.sample.instances[x.gt].id),
                "match_iou": x.iou,
                "seconds": sec,
            }
        )
    return rows


def _metric_rows(
    rows: Sequence[dict[str, Any]],
    metric: Metric,
    result: MetricResult | str,
    method: ExplanationMethod | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(results rows, curve points) of one metric over a unit's instances; ``result`` is the
    error text where the metric failed. Each row records the conventions of ``method`` and
    ``metric`` (``format_conventions``)."""
    convention = format_conventions(
        method.conventions() if method is not None else {}, metric.conventions()
    )
    out, curves = [], []
    for r, row in enumerate(rows):
        for column, up in metric.higher_is_better.items():
            failed = isinstance(result, str)
            value = math.nan if failed else float(result.values[column][r])
            why = result if failed else result.reasons[column][r]
            out.append(
                {
                    **row,
                    "metric": metric.name,
                    "column": column,
                    "value": value,
                    "reason": None if why is None else str(why),
                    "higher_is_better": int(up),
                    "convention": convention,
                }
            )
        if isinstance(result, str):
            continue
        for name, curve in result.curves.items():
            names = curve.x_names or [""] * len(curve.x)
            for p, (x, y) in enumerate(zip(curve.x, curve.y[r], strict=True)):
                curves.append(
                    {
                        **{k: row[k] for k in ("dataset", "detector", "method", "image_id")},
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
    return out, curves


def _score(
    ctx: UnitContext,
    metrics: Sequence[Metric],
    batch: ExplainedBatch,
    method: ExplanationMethod | None,
    rows: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    results: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    for metric in metrics:
        try:
            result: MetricResult | str = metric.compute(batch, ctx.detector, method)
        except Exception as err:  # one failing metric must not lose the others
            result = f"{metric.name} failed: {error_text(err)}"
        more, points = _metric_rows(rows, metric, result, method)
        results += more
        curves += points
    return results, curves


def evaluate_unit(ctx: UnitContext, unit: Unit, image: PreparedImage) -> UnitRows:
    """The rows of one unit (a method, or ``DETECTOR_ROWS``) on a prepared image."""
    started = time.perf_counter()
    seed_unit(ctx.seed, unit)
    targets = [Target(x.detection, ctx.attribute) for x in image.selected]  # type: ignore[arg-type]
    sample = image.sample
    if not targets:
        return UnitRows("done", seconds=time.perf_counter() - started)
    if unit.method == DETECTOR_ROWS:
        metrics = [m for m in ctx.metrics if m.scope == "detector"]
        h, w = sample.image.shape[:2]
        empty = np.zeros((len(targets), h, w), np.float32)  # maps are not used
        rows = _instance_rows(ctx, unit, image, [math.nan] * len(targets))
        batch = ExplainedBatch(
            sample.image, empty, targets, image.detections, sample.instances, image.gt_index
        )
        results, curves = _score(ctx, metrics, batch, None, rows)
        return UnitRows("done", results, curves, rows, seconds=time.perf_counter() - started)
    method = ctx.methods[unit.method]
    try:
        maps = method.explain(ctx.detector, sample.image, targets, trace=image.trace)
    except Exception as err:
        reason = f"{unit.method} failed: {error_text(err)}"
        rows = _instance_rows(ctx, unit, image, [math.nan] * len(targets))
        for row in rows:
            row["reason"] = reason
        return UnitRows(
            "failed", instances=rows, reason=reason, stage="method",
            seconds=time.perf_counter() - started,
        )  # fmt: skip
    rows = _instance_rows(ctx, unit, image, [m.seconds for m in maps])
    batch = ExplainedBatch(
        sample.image,
        np.stack([m.map for m in maps]),
        targets,
        image.detections,
        sample.instances,
        image.gt_index,
    )
    metrics = [m for m in ctx.metrics if m.scope != "detector"]
    results, curves = _score(ctx, metrics, batch, method, rows)
    return UnitRows("done", results, curves, rows, seconds=time.perf_counter() - started)


def evaluate_units(ctx: UnitContext, units: Sequence[Unit]) -> Iterator[tuple[Unit, UnitRows]]:
    """Each unit's rows, one by one; ``units`` are on one image of ``ctx``'s dataset and
    detector, which is read, detected and matched once for all of them."""
    if not units:
        return
    started = time.perf_counter()
    seed_unit(ctx.seed, units[0])
    try:
        image = prepare_image(ctx, units[0].index)
    except Exception as err:  # a bad image fails its units; the run goes on
        reason = f"image {units[0].image_id}: {error_text(err)}"
        seconds = (time.perf_counter() - started) / len(units)
        for unit in units:
            yield unit, UnitRows("failed", reason=reason, stage="image", seconds=seconds)
        return
    for unit in units:
        yield unit, evaluate_unit(ctx, unit, image)


# -- xaibench evaluate: the runner on one dataset -------------------------------------------------


def evaluation_suite(dataset: Any, settings: EvaluationSettings, out: Path) -> Any:
    """The suite that ``xaibench evaluate`` runs: its settings on one dataset (a COCO or
    CrowdHuman dataset, labelled by its annotation file's stem). Method parameters given
    for a registered name apply to all its labels; those for a label override them."""
    from xaibench.suite import Suite

    if hasattr(dataset, "odgt_file"):
        data = {"kind": "crowdhuman", "odgt": dataset.odgt_file, "images": dataset.image_dir}
        stem = Path(dataset.odgt_file).stem
    else:
        data = {"kind": "coco", "annotations": dataset.annotation_file, "images": dataset.image_dir}
        stem = Path(dataset.annotation_file).stem
    p = settings.method_params
    return Suite.model_validate(
        {
            "name": "evaluate",
            "seed": settings.seed,
            "datasets": [{"name": stem, **data}],
            "detectors": [
                {"name": d, "params": settings.detector_params.get(d, {})}
                for d in settings.detectors
            ],
            "methods": [
                {"name": m, "params": {**p.get(plugin_name(m), {}), **p.get(m, {})}}
                for m in settings.methods
            ],
            "metrics": [
                {"name": m, "params": settings.metric_params.get(m, {})} for m in settings.metrics
            ],
            "preset": settings.preset,
            "selection": {"mode": settings.selection, "params": settings.selection_params},
            "attribute": settings.attribute,
            "limits": {"images": settings.max_images, "instances": settings.max_instances},
            "store": out,
        }
    )


def run_evaluation(
    dataset: Any,
    settings: EvaluationSettings,
    out: str | Path,
    progress: bool = True,
    build_detector: Callable[[str], Detector] | None = None,
    retry_failed: bool = False,
) -> EvaluationResult:
    """Evaluate ``settings`` on ``dataset`` (a ``CocoDataset`` or ``CrowdHumanDataset``)
    into the results store ``out/results.sqlite`` and write the files of the module
    docstring from it. A resumed run (``settings.resume``) skips the units already done and
    refuses a folder holding other settings (``max_images`` may grow); without it the plan's
    units are computed again. Failed units stay failed unless ``retry_failed``.
    ``build_detector`` (name -> Detector) replaces building the detectors (e.g. already-built
    ones). Settings are written only once the run really starts, so a typo does not lock the
    folder."""
    from xaibench.registry import METRICS
    from xaibench.runner import run_suite
    from xaibench.store import load_instances, load_results, load_units
    from xaibench.suite import apply_preset

    out = Path(out)
    suite = apply_preset(evaluation_suite(dataset, settings, out), "evaluate")
    settings_file = out / "settings.json"
    record = {
        "settings": settings.model_dump(exclude={"resume", "max_images"}),
        "dataset": {
            "annotations": str(getattr(dataset, "annotation_file", None) or dataset.odgt_file),
            "images": str(dataset.image_dir),
        },
    }
    text = json.dumps(record, indent=2, sort_keys=True, default=str)

    def check_settings() -> None:
        if settings.resume and settings_file.exists() and settings_file.read_text() != text:
            raise ValueError(
                f"{out} holds results of other settings (see {settings_file}); use another "
                "--out folder, or --no-resume to start again"
            )
        out.mkdir(parents=True, exist_ok=True)
        settings_file.write_text(text)

    report = run_suite(
        suite,
        where="evaluate",
        store=out,
        fresh=not settings.resume,
        retry_failed=retry_failed,
        progress=progress,
        detector_factory=build_detector,
        datasets={suite.datasets[0].name: dataset},
        before_work=check_settings,
    )
    metrics = [METRICS.build(m.name, **m.params) for m in suite.metrics]
    results, curves = load_results(out, report.run_id)
    table = wide_rows(
        load_instances(out, report.run_id), results, load_units(out, report.run_id),
        metric_columns(metrics),
    )  # fmt: skip
    files = {"settings": settings_file}
    for name, frame in (("instances", table), ("curves", curves.drop(columns="unit_key"))):
        files[name] = out / f"{name}.csv"
        tmp = out / f".{name}.csv.tmp"
        frame.to_csv(tmp, index=False)
        tmp.replace(files[name])  # whole or not at all
    higher = {c: better for m in metrics for c, better in m.higher_is_better.items()}
    summary = summarise(table, higher)
    files |= write_summary(summary, out)
    files |= plot_all(curves, out / "plots")
    notes = [note for m in metrics for note in m.notes(table)]
    if notes:
        with (out / "summary.md").open("a") as f:
            f.write("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return EvaluationResult(table, summary, files, notes, report, results)


def wide_rows(
    instances: pd.DataFrame, results: pd.DataFrame, units: pd.DataFrame, columns: Sequence[str]
) -> pd.DataFrame:
    """One row per (unit, explained instance) with every metric column and ``reason`` (the
    unit's failure, and "column, column: why" for each NaN), plus one row per unit that
    failed before it had instances; in plan order. From the store's long tables."""
    keys = ["unit_key", "detection", "attribute"]
    base = instances.drop(columns=["reason"]).assign(failure=instances["reason"])
    if not results.empty:
        values = results.set_index([*keys, "column"])["value"].unstack("column")
        base = base.merge(values.reset_index(), on=keys, how="left")
        nan = results[results["reason"].notna()]
        why = (
            nan.groupby([*keys, "reason"], sort=False)["column"]
            .agg(lambda c: ", ".join(c))
            .reset_index()
            .assign(text=lambda f: f["column"] + ": " + f["reason"])
            .groupby(keys, sort=False)["text"]
            .agg("; ".join)
            .rename("metric_reasons")
            .reset_index()
        )
        base = base.merge(why, on=keys, how="left")
    else:
        base = base.assign(metric_reasons=None)
    base["reason"] = [
        "; ".join(str(x) for x in (a, b) if isinstance(x, str) and x)
        for a, b in zip(base["failure"], base["metric_reasons"], strict=True)
    ]
    lost = units[(units["status"] == "failed") & ~units["unit_key"].isin(instances["unit_key"])]
    empty = lost[["unit_key", "dataset", "detector", "method", "method_name", "image_id",
                  "file_name", "reason"]]  # fmt: skip
    position = units.set_index("unit_key")["position"]
    frame = pd.concat([base, empty], ignore_index=True) if len(empty) else base
    frame = frame.assign(_position=frame["unit_key"].map(position), _order=range(len(frame)))
    frame = frame.sort_values(["_position", "_order"], kind="stable")
    return frame.reindex(columns=[*BASE_COLUMNS, *columns, "reason"]).reset_index(drop=True)


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
    """Long table: (dataset,) detector, method, metric, n, mean, ci95 (half-width),
    higher_is_better; one row per group and metric column that has values. ``dataset``
    where ``instances`` has that column."""
    keys = [k for k in ("dataset", "detector", "method") if k in instances.columns]
    records = []
    columns = [c for c in higher_is_better if c in instances.columns]
    for group_key, group in instances.groupby(keys, sort=False):
        for column in columns:
            mean, ci, n = mean_ci(pd.to_numeric(group[column], errors="coerce").to_numpy())
            if n:
                records.append(
                    {
                        **dict(zip(keys, group_key, strict=True)),
                        "metric": column,
                        "n": n,
                        "mean": mean,
                        "ci95": ci,
                        "higher_is_better": higher_is_better[column],
                    }
                )
    return pd.DataFrame(records, columns=[*keys, "metric", "n", "mean", "ci95", "higher_is_better"])


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
    keys = [k for k in ("dataset", "detector", "method") if k in summary.columns]
    wide = cells.pivot_table(
        index=keys, columns="column", values="cell", aggfunc="first", sort=False
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
        per_detector = group["x_name"].fillna("").astype(str).ne("").any()  # named steps
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
