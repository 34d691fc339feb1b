"""The FeatureNMS embedding head: its loss by hand, the recipe, saving and loading."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from xaibench.detectors.featurenms import (
    EmbeddingConfig,
    embed,
    load_embedding,
    pull_push_loss,
    save_embedding,
)
from xaibench.detectors.torchvision import wrap
from xaibench.detectors.zoo import build_small_fcos, build_small_frcnn

from xaibench.datasets.synthetic import load_synthetic
from xaibench.registry import NMS, RECIPES


def test_pull_push_loss_by_hand():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.0, -1.0]])
    groups = torch.tensor([0, 0, 1, -1])  # the last one matches no GT: left out
    # same GT: d01 = sqrt(2) -> sqrt(2) - 0.8; different GTs: d02 = sqrt(0.8), d12 = sqrt(0.4)
    expected = (math.sqrt(2) - 0.8) + ((1.2 - math.sqrt(0.8)) + (1.2 - math.sqrt(0.4))) / 2
    assert pull_push_loss(e, groups).item() == pytest.approx(expected, rel=1e-6)
    # pairs already within / beyond the margins cost nothing
    close = torch.tensor([[1.0, 0.0], [0.96, 0.28]])  # d = 0.28
    assert pull_push_loss(close, torch.tensor([0, 0])).item() == pytest.approx(0.0)
    assert pull_push_loss(e[[0, 3]], torch.tensor([0, 1])).item() == pytest.approx(0.0)


def tiny(build, **kwargs):
    torch.manual_seed(0)
    model = build(2)
    if hasattr(model, "roi_heads"):
        model.roi_heads.score_thresh = 0.0
    else:
        model.score_thresh = 0.0
    return wrap(model, ["__background__", "person"], "tiny", "cpu")


@pytest.fixture(scope="module")
def crowd(tmp_path_factory):
    root = tmp_path_factory.mktemp("crowd")
    return load_synthetic(root, num_images=2, mode="crowd", image_size=(96, 96))


@pytest.mark.parametrize("build", [build_small_fcos, build_small_frcnn])
def test_recipe_trains_saves_and_loads_the_head(build, crowd, tmp_path):
    detector = tiny(build)
    before = {k: v.clone() for k, v in detector.torch_module().state_dict().items()}
    # random weights: candidates barely overlap people, so any overlap assigns them
    config = EmbeddingConfig(
        iterations=3, batch_size=1, max_candidates=8, score_threshold=0.0, assign_iou=0.0
    )
    head, info = RECIPES.get("featurenms-embedding")(detector, crowd, config, progress=False)
    assert info["iterations"] == 3 and 0 < info["final_loss"] < np.inf
    after = detector.torch_module().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen detector
    candidates, embeddings = embed(detector, head, crowd[0].image)
    assert embeddings.shape == (len(candidates), config.dim)
    assert torch.linalg.norm(embeddings, dim=1) == pytest.approx(torch.ones(len(candidates)))
    path = save_embedding(tmp_path / "head.pt", head, detector, config, info)
    loaded = load_embedding(detector, path)
    assert torch.allclose(embed(detector, loaded, crowd[0].image)[1], embeddings)
    out = NMS.build("featurenms", embedding=str(path)).run(detector, crowd[0].image)
    assert len(out.keep) >= 1 and out.keep.tolist() == sorted(
        out.keep.tolist(), key=lambda i: -out.candidates.scores[i]
    )


def test_fine_tuning_changes_and_stores_the_detector(crowd, tmp_path):
    detector = tiny(build_small_fcos)
    config = EmbeddingConfig(
        iterations=2,
        batch_size=1,
        max_candidates=8,
        score_threshold=0.0,
        assign_iou=0.0,
        fine_tune=True,
    )
    before = detector.torch_module().backbone.fpn.layer_blocks[0][0].weight.clone()
    head, info = RECIPES.get("featurenms-embedding")(detector, crowd, config, progress=False)
    tuned = detector.torch_module().backbone.fpn.layer_blocks[0][0].weight.clone()
    assert not torch.equal(before, tuned)
    path = save_embedding(tmp_path / "tuned.pt", head, detector, config, info)
    fresh = tiny(build_small_fcos)
    load_embedding(fresh, path)
    assert torch.equal(fresh.torch_module().backbone.fpn.layer_blocks[0][0].weight, tuned)


def test_missing_or_bad_files_say_what_to_do(tmp_path):
    detector = tiny(build_small_fcos)
    with pytest.raises(FileNotFoundError, match="featurenms-embedding"):
        load_embedding(detector, tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"xx")
    with pytest.raises(ValueError, match=r"bad\.pt is not a FeatureNMS embedding file"):
        load_embedding(detector, tmp_path / "bad.pt")
