"""A suite made concrete: datasets opened, plugins built, work cut into keyed units.

``Workspace.open`` builds what a suite names once (bad parameters fail here, before any
work, as ``SuiteError`` naming the field); ``Workspace.plan`` lists the units, grouped by
(dataset, detector, image) so that one image is read and detected once for all its units.

A unit's ``config`` (JSON) holds everything that changes its numbers and ``unit_key`` is its
hash: the dataset (label, content hash of the annotation file and of the image file), the
detector (label, registered name, parameters with the builder's defaults, weights file hash,
hash of the built model's parameters and buffers), the method (label, registered name,
effective parameters: given ones and what ``params()`` reports, defaults included), the
metrics' effective parameters, the selection, attribute, instance limit, label map, seed and
the xaibench version. A suite whose settings changed therefore reruns only the units they
touch; a fixed or replaced image or annotation file is noticed by its content.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

import xaibench
from xaibench.datasets.coco import CocoDataset
from xaibench.datasets.crowdhuman import CrowdHumanDataset
from xaibench.datasets.synthetic import load_synthetic
from xaibench.detector import Detector
from xaibench.evaluate import DETECTOR_ROWS, UnitContext
from xaibench.labels import label_mapping
from xaibench.method import ExplanationMethod
from xaibench.metric import Metric
from xaibench.registry import DETECTORS, METHODS, METRICS
from xaibench.store import Unit
from xaibench.suite import (
    CocoData,
    CrowdHumanData,
    Suite,
    SuiteError,
    apply_preset,
    build_plugin,
    check_plugins,
)

Dataset = CocoDataset | CrowdHumanDataset


def versions() -> dict[str, str]:
    """Versions recorded with every run and unit."""
    return {
        "xaibench": xaibench.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes; ``"missing"`` when there is no such file."""
    if not path.is_file():
        return "missing"
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def module_sha256(detector: Detector) -> str | None:
    """Hex SHA-256 of a detector's parameters and buffers (names, dtypes, shapes, bytes);
    None for a detector without a torch module."""
    try:
        module = detector.torch_module()
    except (TypeError, NotImplementedError):
        return None
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def image_path(dataset: Dataset, index: int) -> Path:
    """The file of image ``index`` (it may not exist)."""
    if isinstance(dataset, CrowdHumanDataset):
        image_id = dataset.image_ids[index]
        try:
            return dataset.image_path(image_id)
        except FileNotFoundError:
            return dataset.image_dir / image_id
    info = dataset.coco.imgs[dataset.image_ids[index]]
    return dataset.image_dir / str(info["file_name"])


def annotation_file(dataset: Dataset) -> Path:
    return dataset.odgt_file if isinstance(dataset, CrowdHumanDataset) else dataset.annotation_file


def _json(value: Any) -> Any:
    """A JSON-safe, deterministic stand-in for parameter values (arrays by their hash)."""
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    if isinstance(value, np.ndarray | torch.Tensor):
        array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
        return {"array_sha256": hashlib.sha256(array.tobytes()).hexdigest()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Path):
        return str(value)
    return f"{type(value).__module__}.{type(value).__qualname__}"


def defaults(factory: Any) -> dict[str, Any]:
    """The keyword defaults of a builder (a function or class)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def unit_key(config: dict[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class Workspace:
    """The built plugins and opened datasets of one suite (in one process).

    ``detector_factory`` (label -> Detector) replaces building a detector from the suite
    (e.g. already-built ones); ``datasets`` may be given already opened, by label."""

    suite: Suite
    where: str = "suite"
    detector_factory: Callable[[str], Detector] | None = None
    datasets: dict[str, Dataset] = field(default_factory=dict)
    methods: dict[str, ExplanationMethod] = field(default_factory=dict)
    metrics: list[Metric] = field(default_factory=list)
    _detectors: dict[str, Detector] = field(default_factory=dict)
    _contexts: dict[tuple[str, str], UnitContext] = field(default_factory=dict)

    @classmethod
    def open(
        cls,
        suite: Suite,
        where: str | Path = "suite",
        detector_factory: Callable[[str], Detector] | None = None,
        datasets: dict[str, Dataset] | None = None,
    ) -> Workspace:
        """Merge the suite's preset (``apply_preset``), check its names, build its methods and
        metrics once and open its datasets (generating synthetic ones into
        ``STORE/data/NAME``); detectors are built on use."""
        suite = apply_preset(suite, where)
        check_plugins(suite, where, detectors=detector_factory is None)
        space = cls(suite, str(where), detector_factory, dict(datasets or {}))
        for i, spec in enumerate(suite.methods):
            space.methods[spec.name] = build_plugin(
                METHODS, spec.registered, spec.params, f"methods[{i}]", where
            )
        space.metrics = [
            build_plugin(METRICS, spec.name, spec.params, f"metrics[{i}]", where)
            for i, spec in enumerate(suite.metrics)
        ]
        for i, spec in enumerate(suite.datasets):
            if spec.name not in space.datasets:
                space.datasets[spec.name] = space._open_dataset(i)
        return space

    def _open_dataset(self, i: int) -> Dataset:
        spec = self.suite.datasets[i]
        try:
            if isinstance(spec, CocoData):
                return CocoDataset(spec.annotations, spec.images)
            if isinstance(spec, CrowdHumanData):
                return CrowdHumanDataset(spec.odgt, spec.images)
            root = self.suite.store_dir / "data" / spec.name
            return load_synthetic(
                root, spec.num_images, spec.seed, spec.mode, spec.image_size, spec.split,
                **spec.options,
            )  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SuiteError(f"{self.where}: datasets[{i}] ({spec.name}): {err}") from err

    def detector(self, label: str) -> Detector:
        """The suite's detector ``label``, built once per process."""
        if label not in self._detectors:
            index = [d.name for d in self.suite.detectors].index(label)
            spec = self.suite.detectors[index]
            if self.detector_factory is not None:
                self._detectors[label] = self.detector_factory(label)
            else:
                at = f"detectors[{index}]"
                self._detectors[label] = build_plugin(
                    DETECTORS, spec.registered, spec.build_params(), at, self.where
                )
        return self._detectors[label]

    def context(self, dataset: str, detector: str) -> UnitContext:
        """The ``UnitContext`` of one dataset and detector (built once)."""
        key = (dataset, detector)
        if key not in self._contexts:
            s = self.suite
            data = self.datasets[dataset]
            built = self.detector(detector)
            names = [s.label_map.get(n, n) for n in data.class_names]
            self._contexts[key] = UnitContext(
                dataset, data, detector, built, self.methods, self.metrics,
                label_mapping(names, built.class_names), s.selection.mode,
                s.selection.params, s.attribute, s.limits.instances, s.seed,
            )  # fmt: skip
        return self._contexts[key]

    def image_count(self, dataset: str) -> int:
        n = len(self.datasets[dataset])
        limit = self.suite.limits.images
        return n if limit is None else min(limit, n)

    def detector_identity(self, label: str) -> dict[str, Any]:
        """What identifies a detector's numbers (see the module docstring)."""
        spec = next(d for d in self.suite.detectors if d.name == label)
        built = self.detector(label)
        params = spec.build_params()
        weights = params.get("weights")
        weights_hash = None
        if isinstance(weights, str) and weights != "DEFAULT":
            weights_hash = file_sha256(Path(weights))
        factory = DETECTORS.get(spec.registered) if spec.registered in DETECTORS else None
        return {
            "label": label,
            "name": spec.registered,
            "params": _json({**defaults(factory), **params}),
            "weights_sha256": weights_hash,
            "state_sha256": module_sha256(built),
            "class_names": list(built.class_names),
        }

    def plan(self) -> list[list[Unit]]:
        """Every unit of the suite, grouped by (dataset, detector, image), in suite order."""
        s = self.suite
        explanation = {m.name: _json(m.params()) for m in self.metrics if m.scope != "detector"}
        per_detector = {m.name: _json(m.params()) for m in self.metrics if m.scope == "detector"}
        methods = [
            (spec.name, spec.registered, {
                "label": spec.name, "name": spec.registered,
                "params": _json({**spec.params, **self.methods[spec.name].params()}),
            })
            for spec in s.methods
        ]  # fmt: skip
        if per_detector:
            methods.insert(0, (DETECTOR_ROWS, DETECTOR_ROWS, DETECTOR_ROWS))
        common = {
            "xaibench": xaibench.__version__,
            "selection": _json(s.selection.model_dump()),
            "attribute": s.attribute,
            "instances": s.limits.instances,
            "seed": s.seed,
            "label_map": s.label_map,
        }
        groups: list[list[Unit]] = []
        position = 0
        for spec in s.datasets:
            data = self.datasets[spec.name]
            count = self.image_count(spec.name)
            files = [image_path(data, i) for i in range(count)]
            hashes = [file_sha256(f) for f in files]
            dataset = {
                "label": spec.name,
                "kind": spec.kind,
                "annotations_sha256": file_sha256(annotation_file(data)),
            }
            for det in s.detectors:
                identity = self.detector_identity(det.name)
                for i in range(count):
                    image_id = str(data.image_ids[i])
                    image = {"id": image_id, "file": files[i].name, "sha256": hashes[i]}
                    group = []
                    for label, name, method in methods:
                        metrics = per_detector if label == DETECTOR_ROWS else explanation
                        config = {
                            **common, "dataset": dataset, "image": image, "detector": identity,
                            "method": method, "metrics": metrics,
                        }  # fmt: skip
                        group.append(
                            Unit(
                                unit_key(config),
                                spec.name,
                                det.name,
                                label,
                                name,
                                image_id,
                                files[i].name,
                                i,
                                json.dumps(config, sort_keys=True),
                                position,
                            )
                        )
                        position += 1
                    groups.append(group)
        return groups
