"""What every framework wrapper shares, whatever the architecture: the framework adapter a
wrapper implements (``NetworkDetector``) and the trace built on it (``NetworkTrace``).

A wrapper supplies pre-processing with its geometry, the backbone's feature levels by name,
the rest of the network from those levels to detections with provenance, and where its
backbone stages live. The architecture traces (``detectors/dense.py`` for one-stage,
``detectors/roi.py`` for two-stage detectors) add the head and the fast path.

Coordinates: boxes of detections in original pixels (xyxy); the network works in resized-input
pixels (``InputGeometry`` maps between them). Feature levels are named ``p<k>`` (stride 2^k).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import batched_nms

from xaibench.detector import Detector, FeatureWindows, GradientMode, WhiteBoxTrace
from xaibench.feature_masks import check_masks, masks_to_layer
from xaibench.geometry import InputGeometry
from xaibench.images import to_chw_tensor
from xaibench.targets import UnitOutputs, target_values
from xaibench.types import ATTRIBUTES, Detections, Target

Features = dict[str, torch.Tensor]
"""Feature levels by name (``Detector.feature_levels`` order), each (N, C, h, w)."""


class NetworkDetector(Detector):
    """A wrapped torch detector: the framework adapter. ``detect`` and the traces are written
    once on these methods; a framework implements them once for all its architectures."""

    stage_module: str | None = None
    """Dotted path of the module whose children are the backbone stages (``backbone.<name>``
    layers), e.g. ``"backbone.body"``; None: no stage layers."""

    framework: str = "network"
    """The default detector name."""

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str] | None = None,
        name: str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """``model`` in eval mode on ``device`` (default: where its parameters are);
        ``class_names`` as the framework reads them (``_class_names``); ``name`` defaults to
        the framework's."""
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else _parameter_device(model)
        self.model.to(self.device)
        self.name = name or self.framework
        self.class_names = self._class_names(class_names)

    def _class_names(self, given: Sequence[str] | None) -> list[str]:
        """``class_names[label]``, label 0 the background, from the names given (or None)."""
        raise NotImplementedError(f"{type(self).__name__} does not name its classes")

    @abstractmethod
    def prepare(self, images: Sequence[np.ndarray]) -> tuple[Any, list[InputGeometry]]:
        """The framework's batch input of uint8 (or float [0, 1]) RGB images, and each image's
        geometry."""

    @abstractmethod
    def prepare_differentiable(self, images: torch.Tensor, geometry: InputGeometry) -> Any:
        """The batch input of ``images`` (B, 3, H, W) float in [0, 1] of the size of
        ``geometry.original``, differentiable with respect to them."""

    @abstractmethod
    def repeat_input(self, inputs: Any, copies: int) -> Any:
        """A batch input of ``copies`` copies of the one image of ``inputs``."""

    @abstractmethod
    def features(self, inputs: Any) -> Features:
        """The backbone's feature levels of a batch input, by level name."""

    @abstractmethod
    def detect_from_features(
        self, inputs: Any, features: Features, geometry: list[InputGeometry], nms: bool = True
    ) -> list[Detections]:
        """The rest of the network and post-processing, one ``Detections`` per image."""

    @torch.no_grad()
    def detect(
        self, images: Sequence[np.ndarray], batch_size: int = 8, nms: bool = True
    ) -> list[Detections]:
        step = self.batch_limit(batch_size)
        results: list[Detections] = []
        for start in range(0, len(images), step):
            inputs, geometry = self.prepare(images[start : start + step])
            results.extend(self.detect_from_features(inputs, self.features(inputs), geometry, nms))
        return results


class NetworkTrace(WhiteBoxTrace):
    """One image through a ``NetworkDetector``: its feature levels are computed once, and
    gradients on them start from those levels (leaves), so only the heads run again.
    Backbone stages and ``module:<name>`` layers re-run the network with the layer's output
    made a leaf; other outputs of ``features`` (layers the levels are computed from) re-run it
    from the image. ``mode="exact"`` is one autograd backward per target; the architectures'
    fast paths return windows of the layers (``_fast``).

    Subclasses set ``detections`` and implement ``_values`` (and the fast path)."""

    detector: NetworkDetector
    detections: Detections

    def __init__(self, detector: NetworkDetector, image: np.ndarray) -> None:
        self.detector, self.image = detector, image
        with torch.no_grad():
            self.image_list, (self.geometry,) = detector.prepare([image])
            self.features = detector.features(self.image_list)
        self.image_size = self.geometry.original

    # family-specific ---------------------------------------------------------------
    @abstractmethod
    def _values(
        self, features: Features, targets: Sequence[Target], batch: list[int] | None = None
    ) -> torch.Tensor:
        """Target values (T,) computed from ``features`` (row ``batch[t]`` of them for target
        t; row 0 for all by default)."""

    def _has_fast_path(self, layer: str) -> bool:
        return False

    def _fast(
        self, targets: Sequence[Target], layer: str, margin: int | Callable[[torch.Tensor], int]
    ) -> list[FeatureWindows]:
        raise NotImplementedError(f"{type(self).__name__} has no fast path on {layer!r}")

    # names -----------------------------------------------------------------------
    def layer_names(self) -> list[str]:
        path = self.detector.stage_module
        stages = [] if path is None else self.detector.model.get_submodule(path).named_children()
        named = dict.fromkeys([*self.features, *self.detector.feature_levels])
        return ["fpn", *named, *(f"backbone.{n}" for n, _ in stages)]

    def _is_level(self, layer: str) -> bool:
        return layer == "fpn" or layer in self.detector.feature_levels

    def _module_for(self, layer: str) -> nn.Module:
        """The module named by ``layer`` (a backbone stage or ``module:<dotted.name>``);
        ``KeyError`` listing the known layers otherwise."""
        if layer.startswith("module:"):
            path = layer.removeprefix("module:")
        elif layer.startswith("backbone.") and self.detector.stage_module is not None:
            path = f"{self.detector.stage_module}.{layer.removeprefix('backbone.')}"
        else:
            raise KeyError(
                f"unknown layer {layer!r}; known: {', '.join(self.layer_names())}, "
                "or 'module:<dotted.name>'"
            )
        try:
            return self.detector.model.get_submodule(path)
        except AttributeError as err:
            raise KeyError(
                f"layer {layer!r}: the model has no module {path!r}; known: "
                f"{', '.join(self.layer_names())}, or 'module:<dotted.name>'"
            ) from err

    # gradients -------------------------------------------------------------------
    def gradients(
        self,
        targets: Sequence[Target],
        layer: str = "fpn",
        mode: GradientMode = "fast",
        margin: int | Callable[[torch.Tensor], int] = 0,
    ) -> list[FeatureWindows]:
        self._check(targets, mode)
        if layer not in ("fpn", "roi", *self.features, *self.detector.feature_levels):
            self._module_for(layer)  # a clear error for an unknown layer
        if not targets:
            return []
        if mode == "fast" and self._has_fast_path(layer):
            return self._fast(targets, layer, margin)
        return self._exact(targets, layer)

    def target_values(self, targets: Sequence[Target]) -> torch.Tensor:
        self._check(targets)
        with torch.no_grad():
            return self._values(self.features, targets)

    def _exact(self, targets: Sequence[Target], layer: str) -> list[FeatureWindows]:
        """The reference: one autograd backward of each target's value to its layer."""
        with torch.enable_grad():
            if self._is_level(layer):
                leaves = {k: v.detach().requires_grad_(True) for k, v in self.features.items()}
                values = self._values(leaves, targets)
            elif layer in self.features:
                leaves, values = self._values_from_image(layer, targets)
            else:
                leaves, values = self._values_from_hooked(layer, targets)
            return self._layer_gradients(leaves, values, targets, layer)

    def _values_from_image(self, layer: str, targets: Sequence[Target]):
        """Re-run the network from the image (made differentiable) through ``features``;
        returns ({layer: its output}, target values)."""
        pixels = to_chw_tensor(self.image, "image")[None].to(self.detector.device)
        pixels.requires_grad_(True)
        inputs = self.detector.prepare_differentiable(pixels, self.geometry)
        features = self.detector.features(inputs)
        return {layer: features[layer]}, self._values(features, targets)

    def _values_from_hooked(self, layer: str, targets: Sequence[Target]):
        """Re-run the network with ``layer``'s output (or its first map) replaced by a leaf;
        returns ({layer: leaf}, target values)."""
        captured: dict[str, torch.Tensor] = {}

        def hook(_m: nn.Module, _i: Any, output: Any) -> Any:
            if isinstance(output, torch.Tensor):
                captured[layer] = output.detach().requires_grad_(True)
                return captured[layer]
            if isinstance(output, dict) and output:
                key = next(iter(output))
                captured[layer] = output[key].detach().requires_grad_(True)
                return type(output)({**output, key: captured[layer]})
            raise TypeError(f"layer {layer!r} does not output a tensor")

        handle = self._module_for(layer).register_forward_hook(hook)
        try:
            features = self.detector.features(self.image_list)
        finally:
            handle.remove()
        if layer not in captured:
            raise ValueError(f"layer {layer!r} is not used by the backbone")
        return captured, self._values(features, targets)

    def _target_layer(self, target: Target, layer: str) -> str:
        """The layer ``target`` is explained on: its own pyramid level for ``"fpn"``."""
        if layer == "fpn":
            level = int(self.detections.provenance.level[target.index])
            return self.detector.feature_levels[level]
        return layer

    def _layer_gradients(
        self,
        layers: dict[str, torch.Tensor],
        values: torch.Tensor,
        targets: Sequence[Target],
        layer: str,
    ) -> list[FeatureWindows]:
        """One autograd backward of each target's value (``values`` (T,), with their graph) to
        its layer among ``layers`` ({name: (1, C, h, w)}); each window the whole layer."""
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(targets):
            groups.setdefault(self._target_layer(t, layer), []).append(i)
        out = []
        for name, rows in groups.items():
            a = layers[name]
            if a.dim() != 4 or a.shape[0] != 1:
                raise ValueError(
                    f"layer {name!r} has shape {tuple(a.shape)}; expected (1, C, h, w)"
                )
            grads = [
                torch.autograd.grad(values[i], a, retain_graph=True, allow_unused=True)[0]
                for i in rows
            ]
            grads = [torch.zeros_like(a) if g is None else g for g in grads]
            out.append(self._windows(name, rows, targets, a.detach()[0], torch.cat(grads)))
        return out

    # windows ---------------------------------------------------------------------
    def to_image(self, windows: FeatureWindows, maps: torch.Tensor) -> torch.Tensor:
        if windows.roi_boxes is not None:
            return self.geometry.boxes_grid_to_original(maps, windows.roi_boxes)
        return self.geometry.windows_to_original(maps, windows.origin, windows.layer_size)

    def _windows(
        self,
        layer: str,
        rows: list[int],
        targets: Sequence[Target],
        activation: torch.Tensor,
        gradients: torch.Tensor,
        origin: torch.Tensor | None = None,
        windows: torch.Tensor | None = None,
    ) -> FeatureWindows:
        """Windows on a spatial layer ``activation`` (C, h, w) for ``targets[rows]``; without
        ``windows`` the window is the whole layer."""
        layer_size = (int(activation.shape[-2]), int(activation.shape[-1]))
        if windows is None:
            windows = activation[None].expand(len(rows), -1, -1, -1)
            origin = torch.zeros(len(rows), 2, dtype=torch.long)
        return FeatureWindows(
            layer=layer,
            target_index=torch.tensor(rows, dtype=torch.long),
            activations=windows,
            gradients=gradients.detach(),
            origin=origin,
            layer_size=layer_size,
            boxes_on_layer=self.geometry.boxes_to_layer(self._boxes(targets, rows), layer_size),
            layer_activations=activation,
        )

    def _empty_windows(
        self, layer: str, rows: list[int], targets: Sequence[Target], fmap: torch.Tensor
    ) -> FeatureWindows:
        """One-cell windows with zero gradient, for targets that do not depend on ``fmap``."""
        zeros = fmap.new_zeros(len(rows), fmap.shape[0], 1, 1)
        origin = torch.zeros(len(rows), 2, dtype=torch.long)
        return self._windows(layer, rows, targets, fmap, zeros, origin=origin, windows=zeros)

    def _margin(
        self,
        margin: int | Callable[[torch.Tensor], int],
        rows: list[int],
        targets: Sequence[Target],
        fmap: torch.Tensor,
    ) -> int:
        """``margin`` in cells, or computed from the targets' boxes on this layer."""
        if not callable(margin):
            return int(margin)
        layer_size = (int(fmap.shape[-2]), int(fmap.shape[-1]))
        return int(margin(self.geometry.boxes_to_layer(self._boxes(targets, rows), layer_size)))

    def _boxes(self, targets: Sequence[Target], rows: list[int]) -> torch.Tensor:
        """The detected boxes (original pixels) of ``targets[rows]``."""
        det = torch.tensor([targets[i].index for i in rows], dtype=torch.long)
        return self.detections.boxes[det.to(self.detections.boxes.device)]

    def _unit_targets(
        self,
        targets: Sequence[Target],
        scores: torch.Tensor,
        boxes: torch.Tensor,
        class_probs: torch.Tensor,
    ) -> torch.Tensor:
        """Target values (T,) from each target's unit outputs: score (T,), box (T, 4,
        resized-input pixels), class probabilities (T, K + 1)."""
        outputs = UnitOutputs(scores, self.geometry.boxes_to_original(boxes), class_probs)
        return target_values(targets, outputs)

    # feature-space perturbation and fixed output units (D-RISE in feature space, BBAM) ----
    @torch.no_grad()
    def detect_with_feature_masks(
        self, masks: torch.Tensor, layer: str = "fpn", batch_size: int = 8
    ) -> list[Detections]:
        """Pyramid levels (``fpn`` = all of them, or one ``p<k>``) are masked on this trace's
        features and only the heads re-run; a backbone stage or ``module:<name>`` is masked by
        a forward hook and the whole network re-runs on the batch."""
        step = self.detector.batch_limit(batch_size)
        levels = self.detector.feature_levels
        if layer == "roi":
            raise KeyError("feature masks apply to spatial layers, not 'roi'")
        if layer in self.features and layer not in levels:
            raise KeyError(
                f"feature masks on {layer!r}: the network cannot be re-run from it; mask a "
                f"level the head reads ({', '.join(map(repr, levels))}) or 'fpn'"
            )
        module = None if self._is_level(layer) else self._module_for(layer)
        masks = check_masks(masks).to(self.detector.device)
        out: list[Detections] = []
        for start in range(0, masks.shape[0], step):
            chunk = masks[start : start + step]
            b = chunk.shape[0]
            inputs = self.detector.repeat_input(self.image_list, b)
            if module is not None:
                handle = module.register_forward_hook(_masking_hook(chunk, self.geometry))
                try:
                    features = self.detector.features(inputs)
                finally:
                    handle.remove()
            else:
                features = {
                    name: _masked(f, chunk, self.geometry)
                    if layer in ("fpn", name)
                    else f.expand(b, -1, -1, -1)
                    for name, f in self.features.items()
                    if name in levels
                }
            geometry = [self.geometry] * b
            out.extend(self.detector.detect_from_features(inputs, features, geometry, True))
        return out

    def provenance_outputs(
        self, images: torch.Tensor, indices: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The detector's own input transform (made differentiable), backbone and head on
        ``images``, read at the units of detections ``indices``."""
        indices = self._check_unit_images(images, indices)
        inputs = self.detector.prepare_differentiable(
            images.to(self.detector.device), self.geometry
        )
        features = self.detector.features(inputs)
        targets = [Target(i, a) for a in ATTRIBUTES for i in indices]
        batch = list(range(len(indices))) * len(ATTRIBUTES)
        values = self._values(features, targets, batch=batch).view(len(ATTRIBUTES), len(indices))
        return values[0], values[1:].T * values.new_tensor([-1.0, -1.0, 1.0, 1.0])


def _parameter_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def suppress(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    iou: float,
    limit: int,
    nms: bool,
) -> torch.Tensor:
    """Indices of the candidates kept: class-wise NMS at ``iou``, the ``limit`` best; all of
    them, in order, without ``nms``."""
    if not nms:
        return torch.arange(len(scores), device=scores.device)
    return batched_nms(boxes.float(), scores, labels, iou)[:limit]


def _masked(level: torch.Tensor, masks: torch.Tensor, geometry: InputGeometry) -> torch.Tensor:
    """A level (1, C, h, w) times each of ``masks`` (B, h_m, w_m) placed on it -> (B, C, h, w)."""
    return level * masks_to_layer(masks, geometry, tuple(level.shape[-2:]))[:, None].to(level)


def _masking_hook(masks: torch.Tensor, geometry: InputGeometry) -> Callable[..., Any]:
    """A forward hook multiplying a module's output (B, C, h, w), or each map of a dict of
    them, by ``masks`` (B, h_m, w_m) over the original image placed on its cells."""

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return _masked(output, masks, geometry)
        if isinstance(output, dict):
            return type(output)((k, _masked(v, masks, geometry)) for k, v in output.items())
        raise TypeError(f"cannot mask a module output of type {type(output).__name__}")

    return hook
