"""The paper-reproduction suites under ``leaderboards/*/suite.yaml`` validate as committed and
run, end to end, on a tiny COCO-format stand-in for val2017 so that they cannot rot.

The stand-in: two synthetic scenes written as real COCO json (``load_synthetic``), the
suite's dataset paths pointed at them with ``--set`` overrides (as a user points them at
val2017). The suite's torchvision detectors (COCO weights, not available here) are replaced
by evidence detectors whose boxes are the first scene's ground truth, so that the paper's own
selection (IoU > 0.9 with the ground truth, score > 0.1) keeps real instances; D-RISE is cut
to a few masks. Each run must give a finite value for every (detector, method, metric
column) of the table, and its leaderboard the paper's figures beside the FCOS table only.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from xaibench.detectors.evidence import EvidenceDetector, EvidenceObject

from xaibench.datasets.coco import CocoDataset
from xaibench.datasets.synthetic import CLASS_NAMES, load_synthetic
from xaibench.leaderboard import build_leaderboard
from xaibench.leaderboard.board import comparison
from xaibench.leaderboard.html import write_index
from xaibench.leaderboard.report import markdown_document
from xaibench.leaderboard.tables import decimals
from xaibench.registry import METRICS
from xaibench.runner import run_suite
from xaibench.store import STORE_FILE, load_results
from xaibench.suite import Suite, build_plugin, check_plugins, load_suite

ROOT = Path(__file__).resolve().parents[1]
SUITES = sorted((ROOT / "leaderboards").glob("paper-*/suite.yaml"))
TABLES = {"paper-table1", "paper-table3a", "paper-table4"}
STRIDE = 4


def test_the_paper_tables_have_suites() -> None:
    assert {p.parent.name for p in SUITES} == TABLES
    for path in SUITES:
        readme = path.with_name("README.md").read_text()
        assert f"xaibench run leaderboards/{path.parent.name}/suite.yaml" in readme


@pytest.fixture(scope="module")
def val2017(tmp_path_factory: pytest.TempPathFactory) -> CocoDataset:
    """Two synthetic scenes as COCO json and PNGs, standing in for val2017."""
    return load_synthetic(tmp_path_factory.mktemp("coco"), num_images=2, seed=11, split="val")


def ground_truth_detector(data: CocoDataset, label: str) -> EvidenceDetector:
    """A detector that finds the first scene's objects exactly (boxes = ground truth), each
    scoring 0.9 on the unperturbed scene from the pixels inside its box (grid-aligned)."""
    sample = data[0]
    image = sample.image.astype(np.float64) / 255.0
    objects = []
    for inst in sample.instances:
        if inst.ignore:
            continue
        x1, y1, x2, y2 = (float(v) for v in inst.box)
        region = (
            int(np.ceil(x1 / STRIDE)) * STRIDE,
            int(np.ceil(y1 / STRIDE)) * STRIDE,
            max(int(np.floor(x2 / STRIDE)) * STRIDE, int(np.ceil(x1 / STRIDE) + 1) * STRIDE),
            max(int(np.floor(y2 / STRIDE)) * STRIDE, int(np.ceil(y1 / STRIDE) + 1) * STRIDE),
        )
        evidence = image[region[1] : region[3], region[0] : region[2]].mean()
        gain = 10.0
        bias = float(np.log(0.9 / 0.1) - gain * evidence)  # sigmoid(gain * e + bias) = 0.9
        box = (x1, y1, x2, y2)
        objects.append(EvidenceObject(box, int(inst.label), region, gain=gain, bias=bias))
    names = ["__background__", *CLASS_NAMES]
    return EvidenceDetector(objects, class_names=names, stride=STRIDE, name=label)


def stand_in(path: Path, data: CocoDataset, store: Path) -> Suite:
    """The suite at ``path`` on the stand-in: paths, limits and D-RISE's masks overridden."""
    suite = load_suite(path)
    sets = [
        f"datasets[0].annotations={data.annotation_file}",
        f"datasets[0].images={data.image_dir}",
        "limits.images=1",
        "limits.instances=1",
        f"store={store}",
    ]
    sets += [
        f"methods[{i}].params.n=4"
        for i, m in enumerate(suite.methods)
        if m.registered.startswith("drise")
    ]
    sets += [  # 20 perturbation steps, the detector read every 10: 3 points per curve
        f"metrics[{i}]={{name: {m.name}, params: {{steps: 20}}}}"
        for i, m in enumerate(suite.metrics)
        if m.name in ("deletion", "insertion")
    ]
    return load_suite(path, sets)


def table_columns(suite: Suite) -> set[str]:
    """The metric columns of the suite's table."""
    metrics = [build_plugin(METRICS, m.name, m.params, "metric", "suite") for m in suite.metrics]
    return {c for m in metrics for c in m.higher_is_better}


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.parent.name)
def test_suite_validates_and_its_references_name_its_methods_and_columns(path: Path) -> None:
    suite = load_suite(path)
    check_plugins(suite, path)  # every detector, method and metric registered and buildable
    assert suite.name == path.parent.name
    assert [d.weights for d in suite.detectors] == ["DEFAULT", "DEFAULT"]
    assert {d.registered for d in suite.detectors} == {
        "fcos_resnet50_fpn",
        "fasterrcnn_resnet50_fpn",
    }
    assert {m.name for m in suite.methods} == {"gradcam", "gradcampp", "drise", "odam"}
    assert suite.selection.mode == "paper" and suite.attribute == "score"
    assert suite.preset == "paper"  # the official scripts' conventions
    assert suite.datasets[0].kind == "coco"
    assert suite.references and all(r.detector == "fcos" for r in suite.references)
    columns = table_columns(suite)
    for ref in suite.references:
        assert set(ref.values) == {m.name for m in suite.methods}
        for figures in ref.values.values():
            assert set(figures) <= columns, f"{path}: {set(figures) - columns}"


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.parent.name)
def test_suite_runs_on_a_coco_stand_in_and_shows_the_papers_figures(
    path: Path, val2017: CocoDataset, tmp_path: Path
) -> None:
    suite = stand_in(path, val2017, tmp_path / "store")
    detectors = {d.name: ground_truth_detector(val2017, d.name) for d in suite.detectors}
    report = run_suite(suite, where=path, progress=False, detector_factory=detectors.__getitem__)
    assert report.failed == 0 and report.done == report.total == 2 * 4
    results, _ = load_results(tmp_path / "store" / STORE_FILE, report.run_id)
    assert set(results["dataset"]) == {"coco-val2017"}
    official = {"box_convention=odam", "insertion_start=zero", "drise_masking=float"}
    stored = {part for c in results["convention"].dropna() for part in c.split(";") if part}
    assert stored and stored <= official  # the paper preset's conventions, nothing else
    finite = results[np.isfinite(pd.to_numeric(results["value"]))]
    got = set(zip(finite["detector"], finite["method"], finite["column"], strict=True))
    columns = table_columns(suite)
    want = {(d.name, m.name, c) for d in suite.detectors for m in suite.methods for c in columns}
    assert got == want, f"missing {want - got}"
    board = build_leaderboard(tmp_path / "store", resamples=99)
    compared = comparison(board)
    published = board.references
    assert len(compared) == len(published) > 0  # every figure beside its measured cell
    assert set(compared["detector"]) == {"fcos"}
    merged = compared.merge(published, on=["method", "column"])
    assert np.allclose(merged["published"], merged["value"])
    md = markdown_document(board, {}, tmp_path)  # the tables; plots are tested elsewhere
    page = write_index(board, {}, tmp_path / "index.html").read_text()
    fcos, frcnn = md.split("## coco-val2017 / fcos")[1].split("## coco-val2017 / faster-rcnn")
    source = suite.references[0].source
    assert f"[1] published: {source}" in fcos and "[1]" not in frcnn
    odam = next(line for line in fcos.splitlines() if line.startswith("| odam"))
    for value in published[published["method"] == "odam"]["value"]:
        assert f"{value:.{decimals(value)}f}" in odam
    assert f"[1] published: {html.escape(source)}" in page
