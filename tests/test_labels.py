"""Dataset categories matched to detector classes: VOC annotations against a COCO detector."""

from __future__ import annotations

import json

import pytest
from torchvision.models.detection import FCOS_ResNet50_FPN_Weights
from typer.testing import CliRunner

from xaibench.cli import app
from xaibench.datasets.synthetic import generate_synthetic
from xaibench.labels import (
    IGNORED,
    LabelMappingError,
    label_mapping,
    load_label_map,
    rename_categories,
)

COCO = FCOS_ResNet50_FPN_Weights.DEFAULT.meta["categories"]  # with "__background__", "N/A"
VOC = [
    "_background_", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
VOC_TO_COCO = {
    "aeroplane": "airplane",
    "motorbike": "motorcycle",
    "sofa": "couch",
    "tvmonitor": "tv",
}


def test_voc_names_that_coco_lacks_are_an_error_listing_them() -> None:
    with pytest.raises(LabelMappingError) as err:
        label_mapping(VOC, COCO)
    message = str(err.value)
    for name in VOC_TO_COCO:
        assert repr(name) in message
    for matched in ("'diningtable'", "'pottedplant'", "'person'", "'_background_'"):
        assert matched not in message.split("Detector classes")[0]
    assert "--label-map" in message


def test_a_label_map_renames_and_spelling_variants_match() -> None:
    mapping = label_mapping(VOC, COCO, label_map=VOC_TO_COCO)
    named = {VOC[i]: COCO[j] if j != IGNORED else None for i, j in mapping.items()}
    assert named["sofa"] == "couch" and named["aeroplane"] == "airplane"
    assert named["motorbike"] == "motorcycle" and named["tvmonitor"] == "tv"
    assert named["pottedplant"] == "potted plant" and named["diningtable"] == "dining table"
    assert named["person"] == "person" and named["horse"] == "horse"
    assert named["_background_"] is None  # skipped, never "person" (label 0 -> 1 by index)


@pytest.mark.parametrize("name", ["_background_", "__background__", "Background", "BACKGROUND"])
def test_background_categories_are_skipped(name: str) -> None:
    mapping = label_mapping(["__background__", name, "person"], COCO)
    assert mapping == {0: IGNORED, 1: IGNORED, 2: COCO.index("person")}


def test_unmatched_categories_can_be_ignored_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="sofa"):
        mapping = label_mapping(["__background__", "sofa", "dog"], COCO, unmatched="ignore")
    assert mapping == {0: IGNORED, 1: IGNORED, 2: COCO.index("dog")}
    with pytest.warns(UserWarning, match="null: 'sofa'"):
        mapping = label_mapping(["sofa", "dog"], COCO, label_map={"sofa": None})
    assert mapping == {0: IGNORED, 1: COCO.index("dog")}


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_label_map_files(tmp_path, suffix: str) -> None:
    path = tmp_path / f"voc{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({**VOC_TO_COCO, "boat": None}))
    else:
        path.write_text("".join(f"{k}: {v}\n" for k, v in VOC_TO_COCO.items()) + "boat: null\n")
    assert load_label_map(path) == {**VOC_TO_COCO, "boat": None}
    assert rename_categories(["sofa", "boat", "dog"], path) == ["couch", None, "dog"]
    bad = tmp_path / "bad.json"
    bad.write_text('["sofa", "couch"]')
    with pytest.raises(LabelMappingError, match=r"bad\.json"):
        load_label_map(bad)


def test_evaluate_refuses_unmatched_categories_and_takes_a_label_map(tmp_path) -> None:
    scenes = generate_synthetic(tmp_path / "data", 1, seed=3, split="val")  # circle, square, ...
    names = ["__background__", "disc", "square", "triangle"]  # the detector says "disc"
    fcos = "fcos_resnet50_fpn"
    args = [
        "evaluate", "-a", str(scenes.annotation_file), "-i", str(scenes.images_dir),
        "-d", fcos, "--detector-param", f"{fcos}.class_names={json.dumps(names)}",
        "--detector-param", f"{fcos}.min_size=128",
        "--detector-param", f"{fcos}.max_size=128",
        "-m", "odam", "--metric", "energy-pg", "--selection", "top-k",
        "--selection-param", "top_k=1", "--out", str(tmp_path / "run"), "--no-resume",
    ]  # fmt: skip
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2, refused.output
    assert "'circle'" in refused.output
    label_map = tmp_path / "names.json"
    label_map.write_text(json.dumps({"circle": "disc"}))
    result = CliRunner().invoke(app, [*args, "--label-map", str(label_map)])
    assert result.exit_code == 0, result.output


def test_a_detector_without_class_names_takes_the_labels_by_index() -> None:
    with pytest.warns(UserWarning, match="no names"):
        mapping = label_mapping(["__background__", "sofa", "dog"], ["class0", "class1", "class2"])
    assert mapping == {0: 0, 1: 1, 2: 2}
