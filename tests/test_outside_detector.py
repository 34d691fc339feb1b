"""An outside detector joins through ``xaibench.adapter``: the README's CenterNet-style example,
installed as a package with an ``xaibench.detectors`` entry point, runs ``xaibench explain``,
``compare`` and ``evaluate``; on a hand-built head whose evidence is known ODAM finds it,
and the fast path equals the exact one. The black-box adapter, the batch limit and the
checked ``Detections`` builder are tested here too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from xaibench.adapter import DenseDetector, PredictDetector
from xaibench.datasets.synthetic import generate_synthetic
from xaibench.types import Target, checked_detections

ROOT = Path(__file__).resolve().parents[1]


def readme_adapter() -> str:
    """The Python example of the README's "A new detector" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## A new detector") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```\n", start)]


def readme_module() -> types.ModuleType:
    module = types.ModuleType("tiny_centernet")
    exec(compile(readme_adapter(), "README.md:tiny_centernet", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def centernet() -> types.ModuleType:
    return readme_module()


def test_the_readme_example_is_about_thirty_lines() -> None:
    code = [line for line in readme_adapter().splitlines() if line.strip()]
    assert len(code) <= 32


# -- the package, installed through its entry point -------------------------------------------


def install(site: Path) -> dict[str, str]:
    """Write the package ``tiny_centernet`` (the README's code) and its distribution metadata
    with the entry point into ``site``; the environment of a Python that has it on its path."""
    site.mkdir()
    (site / "tiny_centernet.py").write_text(readme_adapter())
    info = site / "tiny_centernet-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-centernet\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[xaibench.detectors]\ntiny-centernet = tiny_centernet:build\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    return env


def xaibench(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    code = "import sys; from xaibench.cli import app; sys.exit(app(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )


def test_an_installed_outside_detector_runs_explain_compare_and_evaluate(tmp_path) -> None:
    env = install(tmp_path / "site")
    scenes = generate_synthetic(tmp_path / "data", 2, seed=7, split="eval")
    image = sorted(scenes.images_dir.glob("*.png"))[0]

    listed = xaibench(env, "list", "*centernet*", "--kind", "detectors")
    assert listed.returncode == 0, listed.stderr
    assert "tiny-centernet" in listed.stdout

    out = tmp_path / "explain"
    done = xaibench(env, "explain", str(image), "-d", "tiny-centernet", "--top-k", "2",
                    "-a", "combined", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    payload = json.loads((out / f"{image.stem}.detections.json").read_text())
    explained = [d for d in payload["detections"] if d["explained"]]
    assert len(explained) == 2
    heat = np.load(out / explained[0]["maps"]["odam:combined"]["npy"])
    assert heat.shape == (160, 160) and heat.max() > 0

    # factories get only what the user gives: this one has no weights, --weights is refused
    refused = xaibench(env, "explain", str(image), "-d", "tiny-centernet", "--weights", "w.pt",
                       "--out", str(tmp_path / "refused"))  # fmt: skip
    assert refused.returncode == 2
    assert "--weights weights: not a setting of build" in " ".join(
        refused.stderr.replace("│", " ").split()
    )

    out = tmp_path / "compare"
    done = xaibench(env, "compare", str(image), "--methods", "odam,gradcampp,drise",
                    "-d", "tiny-centernet", "--top-k", "1", "-p", "drise.n=16",
                    "-p", "drise.progress=false", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    assert Image.open(out / f"{image.stem}_comparison.png").size[0] > 3 * 200

    out = tmp_path / "evaluate"
    done = xaibench(env, "evaluate", "-a", str(scenes.annotation_file), "-i",
                    str(scenes.images_dir), "-d", "tiny-centernet", "-m", "odam",
                    "--metric", "pointing-game", "--metric", "deletion",
                    "--selection", "top-k", "--selection-param", "top_k=1",
                    "--selection-param", "match_iou=0.0", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    rows = pd.read_csv(out / "instances.csv")
    assert len(rows) == 2 and set(rows["detector"]) == {"tiny-centernet"}
    assert rows["deletion"].notna().all()
    # the seeded (untrained) model's best box overlaps no object: recorded with the reason
    assert rows["reason"].str.contains("no matched ground-truth instance").all()


# -- a hand-built head whose evidence is known -------------------------------------------------


def hand_built(centernet: types.ModuleType) -> DenseDetector:
    """The README's model with weights set by hand: p1 = mean grey of 3 x 3 pixels (stride 2),
    p2 channel 0 = mean of 3 x 3 cells of p1 (stride 4), the tower passes channel 0 through
    its centre tap, so class 1's logit at a cell = 20 * p2[0, cell] - 10 and class 2's is -10;
    boxes are 16 x 16 px around the cell centre."""
    detector = centernet.build(("square", "other"))
    m = detector.model
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.stem[0].weight[0] = 1 / 27
        m.down[0].weight[0, 0] = 1 / 9
        m.tower[0].weight[0, 0, 1, 1] = 1.0
        m.heat.weight[0, 0] = 20.0
        m.heat.bias.fill_(-10.0)
        m.size.bias.fill_(float(np.log(2.0)))  # half size 2 cells = 8 px
    return detector


def two_squares() -> np.ndarray:
    image = np.zeros((64, 96, 3), dtype=np.uint8)
    image[8:24, 8:24] = 255  # square A: cells 2..5
    image[36:52, 64:80] = 255  # square B: rows 9..12, cols 16..19
    return image


def test_odam_finds_the_known_evidence_of_each_square(centernet) -> None:
    from xaibench.methods.gradcam import GradCAM
    from xaibench.methods.odam import ODAM

    detector, image = hand_built(centernet), two_squares()
    trace = detector.trace(image)
    det = trace.detections
    assert det.scores[0] > 0.99 and set(det.labels[det.scores > 0.5].tolist()) == {1}
    centres = (det.boxes[:, :2] + det.boxes[:, 2:]) / 2
    a = int(torch.where((centres[:, 0] < 32) & (det.scores > 0.99))[0][0])
    b = int(torch.where((centres[:, 0] > 48) & (det.scores > 0.99))[0][0])
    # the score's gradient reaches p2 only at the detection's own cell (centre tap): the map
    # is that cell, spread bilinearly over its 4 x 4 px and the neighbouring cell centres
    for i in (a, b):
        heat = ODAM().explain(detector, image, [Target(i)], trace)[0].map
        cy, cx = (int(det.provenance.y[i]) + 0.5) * 4, (int(det.provenance.x[i]) + 0.5) * 4
        py, px = np.unravel_index(np.argmax(heat), heat.shape)
        assert abs(py + 0.5 - cy) <= 2 and abs(px + 0.5 - cx) <= 2
        near = np.zeros_like(heat, dtype=bool)
        near[int(cy) - 6 : int(cy) + 6, int(cx) - 6 : int(cx) + 6] = True
        assert heat[~near].max() == 0 and heat[near].max() > 0
        exact = ODAM(mode="exact").explain(detector, image, [Target(i)], trace)[0].map
        np.testing.assert_allclose(heat, exact, rtol=1e-5, atol=1e-8)
    # Grad-CAM's channel weights light both squares for either detection (not instance-specific)
    cam = GradCAM().explain(detector, image, [Target(a), Target(b)], trace)
    for s in cam:
        assert s.map[8:24, 8:24].mean() > 0.5 * s.map.max()
        assert s.map[36:52, 64:80].mean() > 0.5 * s.map.max()


@pytest.mark.parametrize("smoothing", ["none", "gaussian"])
def test_fast_path_equals_exact_on_seeded_weights_including_edge_cells(
    centernet, smoothing
) -> None:
    from xaibench.methods.gradcam import GradCAM, GradCAMPlusPlus
    from xaibench.methods.odam import ODAM

    detector = centernet.build(seed=3)
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    trace = detector.trace(image)
    p = trace.detections.provenance
    h, w = trace.features["p2"].shape[-2:]
    edge = torch.where((p.y == 0) | (p.x == 0) | (p.y == h - 1) | (p.x == w - 1))[0].tolist()
    assert edge, "no detection at the layer's edge to test the clamped windows on"
    targets = [Target(i, a) for i in [0, 1, *edge[:3]] for a in ("score", "x1", "y2")]
    for method in (ODAM(smoothing=smoothing), GradCAM(), GradCAMPlusPlus()):
        fast = method.explain(detector, image, targets, trace)
        method.mode = "exact"
        exact = method.explain(detector, image, targets, trace)
        assert sum(e.map.max() > 0 for e in exact) > len(exact) / 2  # not all ReLU'd away
        for f, e in zip(fast, exact, strict=True):
            np.testing.assert_allclose(f.map, e.map, rtol=1e-4, atol=1e-6 * e.map.max())


def test_exact_gradients_reach_an_earlier_layer_and_bbam_reads_the_units(centernet) -> None:
    from xaibench.methods.bbam import BBAM

    detector = hand_built(centernet)
    image = two_squares()
    trace = detector.trace(image)
    assert trace.layer_names() == ["fpn", "p1", "p2"]
    (windows,) = trace.gradients([Target(0)], layer="p1", mode="fast")  # p1: exact only
    g = windows.gradients[0, 0]
    assert windows.layer == "p1" and g.shape == (32, 48)
    # the p2 cell reads 3 x 3 cells of p1 around (2y, 2x) (stride 2, padding 1)
    y, x = int(trace.detections.provenance.y[0]), int(trace.detections.provenance.x[0])
    rows, cols = torch.where(g != 0)
    assert rows.min() >= 2 * y - 1 and rows.max() <= 2 * y + 1
    assert cols.min() >= 2 * x - 1 and cols.max() <= 2 * x + 1
    images = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    score, box = trace.provenance_outputs(images, [0])
    assert float(score[0].detach()) == pytest.approx(float(trace.detections.scores[0]), abs=1e-6)
    torch.testing.assert_close(box[0], trace.detections.boxes[0])
    heat = BBAM(iterations=2, progress=False).explain(detector, image, [Target(0)], trace)[0]
    assert heat.map.shape == image.shape[:2]


def test_feature_masks_and_drise_never_pass_more_than_max_batch(centernet) -> None:
    from xaibench.methods.drise import DRISE, FeatureDRISE

    detector = hand_built(centernet)
    detector.max_batch = 3
    seen: list[int] = []
    head = detector.model.head
    detector.model.head = lambda f: (seen.append(f.shape[0]), head(f))[1]  # type: ignore[method-assign]
    image = two_squares()
    trace = detector.trace(image)
    for method in (DRISE(n=10, batch_size=8, progress=False),
                   FeatureDRISE(layer="p2", n=10, batch_size=8, progress=False)):  # fmt: skip
        seen.clear()
        method.explain(detector, image, [Target(0)], trace)
        assert seen and max(seen) <= 3 and sum(seen) >= 10
    with pytest.raises(KeyError, match=r"a level the head reads \('p2'\)"):
        trace.detect_with_feature_masks(torch.ones(1, 4, 4), layer="p1")


def test_odam_nms_runs_on_one_trace_of_the_outside_detectors_candidates(centernet) -> None:
    from conftest import assert_one_pass_odam_nms

    # the one-stage trace serves the adapter too: its pre-NMS candidates in one pass
    detector = centernet.build(seed=3)
    image = np.random.default_rng(1).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    assert_one_pass_odam_nms(detector, image)


def test_a_model_breaking_the_contract_is_named(centernet) -> None:
    image = two_squares()

    class NoHeadLayer(centernet.TinyCenterNet):
        def features(self, x):
            return {"p1": self.stem(x)}

    class WrongDecode(centernet.TinyCenterNet):
        def decode(self, cells, yx):
            probs, boxes = super().decode(cells, yx)
            return probs[:, 1:], boxes  # the background column left out

    with pytest.raises(KeyError, match=r"NoHeadLayer\.features gave p1; head_layer 'p2'"):
        DenseDetector(NoHeadLayer(2), ["bg", "a", "b"]).detect([image])
    with pytest.raises(ValueError, match=r"WrongDecode\.decode must give class_probs \(T, 3\)"):
        DenseDetector(WrongDecode(2), ["bg", "a", "b"]).detect([image])
    with pytest.raises(ValueError, match="class_names must name the background"):
        DenseDetector(centernet.TinyCenterNet(1), ["square"])


# -- black box ---------------------------------------------------------------------------------


def test_a_predict_function_is_a_black_box_detector_for_drise() -> None:
    """``predict`` sees a fixed box whose score is the mean brightness of its left half: the
    D-RISE map of that box is brighter there than on its right half."""
    from xaibench.methods.drise import DRISE

    calls: list[int] = []

    def predict(images):
        calls.append(len(images))
        out = []
        for im in images:
            s = float(im[16:48, 16:32].mean())
            probs = torch.tensor([[1 - s, s]])
            out.append((torch.tensor([[16.0, 16.0, 48.0, 48.0]]), torch.tensor([s]),
                        torch.tensor([1]), probs))  # fmt: skip
        return out

    detector = PredictDetector(predict, ["__background__", "thing"], "box", max_batch=4)
    image = np.full((64, 64, 3), 200, dtype=np.uint8)
    (det,) = detector.detect([image])
    assert det.labels.tolist() == [1] and det.scores[0] == pytest.approx(200 / 255)
    drise = DRISE(n=256, grid=8, batch_size=32, progress=False, mean_subtraction=True)
    heat = drise.explain(detector, image, [Target(0)])[0].map
    assert max(calls) <= 4  # D-RISE's batch of 32 masked images, 4 at a time
    assert heat[16:48, 16:32].mean() > 3 * abs(heat[16:48, 32:48].mean())
    with pytest.raises(NotImplementedError, match="black box"):
        detector.trace(image)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"boxes": [[0.1, 0.1, 0.5, 0.5]]}, "normalised"),
        ({"boxes": [[10.0, 10.0, 5.0, 20.0]]}, "x2 >= x1"),
        ({"boxes": [[0.0, 0.0, 500.0, 20.0]]}, "beyond twice the image"),
        ({"labels": [0]}, r"labels must lie in 1..2 \(0 is the background\)"),
        ({"class_probs": [[0.1, 0.9]]}, r"class_probs must have shape \(1, 3\)"),
        ({"scores": [1.5]}, r"scores must lie in \[0, 1\]"),
        ({"scores": [0.5, 0.4]}, r"scores must have shape \(1,\)"),
    ],
)
def test_checked_detections_name_the_mistake(change, message) -> None:
    fields = {
        "boxes": [[10.0, 10.0, 30.0, 40.0]],
        "scores": [0.9],
        "labels": [2],
        "class_probs": [[0.1, 0.0, 0.9]],
    }
    with pytest.raises(ValueError, match=message):
        checked_detections(**{**fields, **change}, num_classes=3, image_size=(100, 120))
    ok = checked_detections(**fields, num_classes=3, image_size=(100, 120), where="x")
    assert ok.provenance.class_index.tolist() == [2] and ok.provenance.x.tolist() == [20]


def test_sanity_checks_randomise_the_models_modules_from_the_head(centernet) -> None:
    """The score of the hand-built head reads neither ``offset`` nor ``size``: re-initialising
    them leaves its ODAM map as it was (Spearman 1); re-initialising the whole network
    changes it."""
    from xaibench.methods.odam import ODAM
    from xaibench.metrics.sanity import sanity_check

    detector, image = hand_built(centernet), two_squares()
    curve = sanity_check(detector, ODAM(), image, [Target(0)], region="image")
    assert curve.steps == ["offset", "size", "heat", "tower.0", "down.0", "stem.0"]
    spearman = curve.similarity["spearman"][0]
    assert spearman[:2].tolist() == pytest.approx([1.0, 1.0])
    assert spearman[-1] < 0.9


class GroupedBlocks(DenseDetector):
    """A detector that declares its own blocks for sanity checks: the feature extractor as
    one, then the heat-map head, then the box outputs the score never reads."""

    def parameter_blocks(self, depth: int = 3) -> list[tuple[str, list[str]]]:
        return [
            ("features", ["stem.0", "down.0", "tower.0"]),
            ("heat", ["heat"]),
            ("box", ["size", "offset"]),
        ]


class NoBlocks(DenseDetector):
    def parameter_blocks(self, depth: int = 3) -> list[tuple[str, list[str]]]:
        return []


def test_sanity_checks_follow_the_blocks_a_detector_declares(centernet) -> None:
    from xaibench.methods.odam import ODAM
    from xaibench.metrics.sanity import SanityCheck, sanity_check

    from xaibench.metric import ExplainedBatch

    built, image = hand_built(centernet), two_squares()
    detector = GroupedBlocks(built.model, built.class_names)
    curve = sanity_check(detector, ODAM(), image, [Target(0)], region="image")
    assert curve.steps == ["box", "heat", "features"]
    spearman = curve.similarity["spearman"][0]
    assert spearman[0] == pytest.approx(1.0) and spearman[-1] < 0.9

    blind = NoBlocks(built.model, built.class_names, name="blind")
    with pytest.raises(ValueError, match="blind declares no parameter blocks"):
        sanity_check(blind, ODAM(), image, [Target(0)])
    trace = blind.trace(image)
    maps = np.stack([s.map for s in ODAM().explain(blind, image, [Target(0)], trace=trace)])
    batch = ExplainedBatch(image, maps, [Target(0)], trace.detections, [], np.array([-1]))
    result = SanityCheck().compute(batch, blind, ODAM())
    assert np.isnan(result.values["sanity_spearman"]).all()
    assert "no parameter blocks" in result.reasons["sanity_spearman"][0]
