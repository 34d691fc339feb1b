"""Datasets: COCO json (real or synthetic), CrowdHuman odgt and the synthetic scene generator.

Importing this package registers the ``coco``, ``crowdhuman`` and ``synthetic`` entries of
``xaibench.registry.DATASETS``.
"""

from xaibench.datasets.coco import AnnotationError, CocoDataset
from xaibench.datasets.crowdhuman import CrowdHumanDataset, read_odgt
from xaibench.datasets.synthetic import (
    CLASS_NAMES,
    Scene,
    SceneObject,
    SyntheticOptions,
    SyntheticSplit,
    generate_synthetic,
    load_synthetic,
    render_scene,
)

__all__ = [
    "CLASS_NAMES",
    "AnnotationError",
    "CocoDataset",
    "CrowdHumanDataset",
    "Scene",
    "SceneObject",
    "SyntheticOptions",
    "SyntheticSplit",
    "generate_synthetic",
    "load_synthetic",
    "read_odgt",
    "render_scene",
]
