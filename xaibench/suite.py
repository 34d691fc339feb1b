"""Suite files: what ``xaibench run`` computes, as YAML validated at the edge (pydantic).

A suite lists datasets, detectors, methods and metrics (each with its parameters), the
instance selection, limits, the seed, the executor and the output store; every list entry's
``name`` is its label in tables. ``load_suite`` reads a file (or the embedded default,
``xaibench/suites/default.yaml``), applies ``--set PATH=VALUE`` overrides and validates; a bad
suite raises ``SuiteError`` naming the file, the field path (``methods[2].params.n``) and what
was expected, before any work. ``check_plugins`` then checks every name against its registry
(unknown names list the known ones, the closest first) and builds each method and metric once
so that bad parameters fail early too. ``preset: NAME`` (``xaibench.presets``) merges a
named bundle of metric and method parameters (e.g. ``paper``: the official ODAM evaluation
conventions) into the entries it lists, under the parameters an entry sets itself
(``apply_preset``). Relative paths are relative to the working directory.
"""

from __future__ import annotations

import inspect
import re
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from xaibench.params import ParamError, checked_params
from xaibench.registry import METHODS, METRICS, UnknownNameError, plugin_name
from xaibench.types import check_attribute

DEFAULT_SUITE = "default"
"""The embedded suite ``xaibench run`` runs without an argument."""


class SuiteError(ValueError):
    """A suite that cannot run: the file, the field path and what was expected."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticData(_Strict):
    """Synthetic scenes (``xaibench.datasets.synthetic``), generated into ``STORE/data/NAME``."""

    name: str
    kind: Literal["synthetic"]
    mode: Literal["objects", "crowd"] = "objects"
    num_images: int = Field(64, ge=1)
    seed: int = Field(0, ge=0)
    split: str = "val"
    image_size: tuple[int, int] = (160, 160)
    options: dict[str, Any] = Field(default_factory=dict)


class CocoData(_Strict):
    """A COCO json file and the folder of its ``file_name``s."""

    name: str
    kind: Literal["coco"]
    annotations: Path
    images: Path


class CrowdHumanData(_Strict):
    """A CrowdHuman ``.odgt`` file and the folder of its images."""

    name: str
    kind: Literal["crowdhuman"]
    odgt: Path
    images: Path


DatasetSpec = Annotated[SyntheticData | CocoData | CrowdHumanData, Field(discriminator="kind")]


class DetectorSpec(_Strict):
    """``detector``: the registered name (default: ``name``); ``weights`` (a file, "DEFAULT" or
    none) and ``params`` go to the detector's builder."""

    name: str
    detector: str | None = None
    weights: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def registered(self) -> str:
        return self.detector or self.name

    def build_params(self) -> dict[str, Any]:
        return self.params if self.weights is None else {**self.params, "weights": self.weights}


class MethodSpec(_Strict):
    """``method``: the registered name (default: ``plugin_name(name)``, so ``odam@p3`` is
    ODAM); ``params`` go to its constructor."""

    name: str
    method: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def registered(self) -> str:
        return self.method or plugin_name(self.name)

    @field_validator("name")
    @classmethod
    def _label(cls, value: str) -> str:
        plugin_name(value)  # NAME or NAME@VARIANT
        return value


class MetricSpec(_Strict):
    """A registered metric and its constructor's ``params``."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class SelectionSpec(_Strict):
    """``mode`` paper | all | top-k; ``params`` go to ``select_instances``."""

    mode: Literal["paper", "all", "top-k"] = "paper"
    params: dict[str, Any] = Field(default_factory=dict)


class Limits(_Strict):
    """The first ``images`` images of each dataset; at most ``instances`` per image (best
    scores first)."""

    images: int | None = Field(None, ge=1)
    instances: int | None = Field(None, ge=1)


class ExecutorSpec(_Strict):
    """``local`` (in this process) or ``ray`` (``address`` of a cluster, else a local
    ``ray.init`` with ``num_cpus``; ``gpus_per_task`` where the cluster has GPUs, default 1)."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    gpus_per_task: float | None = Field(None, gt=0)


class Reference(_Strict):
    """Published figures shown beside the measured ones: ``values[method label][metric
    column]`` as published, times ``scale`` in the benchmark's units (0.01 for a percentage
    the benchmark reports as a fraction); ``dataset`` and ``detector`` are the suite labels
    whose tables show them (null: every one)."""

    source: str
    dataset: str | None = None
    detector: str | None = None
    scale: float = Field(1.0, gt=0)
    values: dict[str, dict[str, float]]


class Suite(_Strict):
    """A whole benchmark run (see the module docstring and the README)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]+$")
    seed: int = 0
    datasets: list[DatasetSpec] = Field(min_length=1)
    detectors: list[DetectorSpec] = Field(min_length=1)
    methods: list[MethodSpec] = Field(min_length=1)
    metrics: list[MetricSpec] = Field(min_length=1)
    preset: str | None = None
    """A metric preset (``xaibench.presets``), e.g. ``paper``; None: the plugins' defaults."""
    selection: SelectionSpec = Field(default_factory=SelectionSpec)
    attribute: str = "score"
    limits: Limits = Field(default_factory=Limits)
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)
    store: Path | None = None
    references: list[Reference] = Field(default_factory=list)
    label_map: dict[str, str | None] = Field(default_factory=dict)
    """Dataset category -> detector class name (null: ignore the category)."""

    @field_validator("metrics", mode="before")
    @classmethod
    def _metric_names(cls, value: Any) -> Any:
        """A metric may be given by name alone."""
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    _attribute = field_validator("attribute")(staticmethod(check_attribute))

    @model_validator(mode="after")
    def _unique_labels(self) -> Suite:
        for field in ("datasets", "detectors", "methods", "metrics"):
            labels = [entry.name for entry in getattr(self, field)]
            for i, label in enumerate(labels):
                if label in labels[:i]:
                    raise ValueError(
                        f"{field}[{i}].name {label!r} is used twice; give each entry its own "
                        "label (e.g. odam@p3, odam@p5)"
                    )
        return self

    @property
    def store_dir(self) -> Path:
        """The output folder (``results.sqlite`` inside); default ``outputs/run/NAME``."""
        return self.store if self.store is not None else Path("outputs/run") / self.name


def suite_path(name_or_path: str | Path | None) -> Path:
    """The file of a suite: a path, or the name of an embedded suite (default: ``default``)."""
    if name_or_path is None:
        name_or_path = DEFAULT_SUITE
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    embedded = files("xaibench") / "suites" / f"{name_or_path}.yaml"
    if not embedded.is_file():
        raise SuiteError(f"no suite file {path} and no embedded suite {name_or_path!r}")
    return Path(str(embedded))


def load_suite(
    name_or_path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Suite:
    """Read, override (``PATH=VALUE``, the value parsed as YAML) and validate a suite."""
    path = suite_path(name_or_path)
    if not path.is_file():
        raise SuiteError(f"{path}: no such suite file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SuiteError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise SuiteError(f"{path}: expected a mapping of suite fields, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item, path)
    return validate_suite(raw, path)


def validate_suite(raw: dict[str, Any], where: str | Path = "suite") -> Suite:
    """``Suite`` from a mapping; errors name ``where``, the field path and the expectation."""
    try:
        return Suite.model_validate(raw)
    except ValidationError as err:
        lines = [f"{_field_path(e['loc'])}: {_expected(e)}" for e in err.errors()]
        raise SuiteError(f"{where}: " + "; ".join(lines)) from None


_KINDS = ("synthetic", "coco", "crowdhuman")


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i > 0 and isinstance(loc[i - 1], int) and part in _KINDS and loc[0] == "datasets":
            continue  # the discriminator's branch, not a field
        else:
            out += f".{part}" if out else str(part)
    return out or "(suite)"


def _expected(error: dict[str, Any]) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return "unknown field (not allowed here)"
    if error["type"] == "union_tag_invalid":
        return f"kind must be one of {', '.join(_KINDS)}"
    if error["type"] == "missing":
        return "missing (required)"
    return f"{message} (got {error['input']!r})" if "input" in error else message


_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def apply_override(raw: dict[str, Any], item: str, where: str | Path = "suite") -> None:
    """Set ``PATH=VALUE`` in ``raw`` (``datasets[0].annotations=x.json``,
    ``methods[1].params.n=100``); VALUE is parsed as YAML (numbers, null, lists, mappings)."""
    left, sep, value = item.partition("=")
    steps = [(name, int(index) if index else None) for name, index in _STEP.findall(left)]
    if not sep or not steps or "".join(_STEP.sub("", left).split(".")):
        raise SuiteError(f"--set expects PATH=VALUE (e.g. methods[0].params.n=100), got {item!r}")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError as err:
        raise SuiteError(f"--set {item!r}: value is not valid YAML: {err}") from err
    node: Any = raw
    keys = [name or index for name, index in steps]
    for step, key in enumerate(keys):
        last = step == len(keys) - 1
        shown = left if last else _render(keys[: step + 1])
        if isinstance(key, int):
            if not isinstance(node, list) or not -len(node) <= key < len(node):
                size = len(node) if isinstance(node, list) else 0
                raise SuiteError(f"{where}: --set {shown}: no entry {key} (the list has {size})")
        elif not isinstance(node, dict):
            raise SuiteError(f"{where}: --set {shown}: {_render(keys[:step])} is not a mapping")
        if last:
            node[key] = parsed
        else:
            if isinstance(key, str) and key not in node:
                node[key] = {}
            node = node[key]


def _render(keys: list[Any]) -> str:
    return "".join(
        f"[{k}]" if isinstance(k, int) else (f".{k}" if i else k) for i, k in enumerate(keys)
    )


def apply_preset(suite: Suite, where: str | Path = "suite") -> Suite:
    """The suite with its ``preset``'s parameters merged into the metric and method entries
    whose registered names the preset lists (an entry's own parameters win); the suite itself
    when it names no preset. An unknown preset is a ``SuiteError`` listing the known ones."""
    from xaibench.registry import PRESETS

    if suite.preset is None:
        return suite
    try:
        preset = PRESETS.get(suite.preset)
    except UnknownNameError as err:
        raise SuiteError(f"{where}: preset: {err}") from None
    methods = [
        m.model_copy(update={"params": preset.merge("methods", m.registered, m.params)})
        for m in suite.methods
    ]
    metrics = [
        m.model_copy(update={"params": preset.merge("metrics", m.name, m.params)})
        for m in suite.metrics
    ]
    return suite.model_copy(update={"methods": methods, "metrics": metrics})


def check_plugins(suite: Suite, where: str | Path = "suite", detectors: bool = True) -> None:
    """Every method and metric name is registered and builds with its params (once, before
    any work); detector names are registered (unless ``detectors`` is False: the caller
    builds them). Raises ``SuiteError``."""
    from xaibench.registry import DETECTORS

    for i, spec in enumerate(suite.detectors if detectors else []):
        _known(DETECTORS, spec.registered, f"detectors[{i}].detector", where)
    for i, spec in enumerate(suite.methods):
        build_plugin(METHODS, spec.registered, spec.params, f"methods[{i}]", where)
    for i, spec in enumerate(suite.metrics):
        build_plugin(METRICS, spec.name, spec.params, f"metrics[{i}]", where)


def _known(registry: Any, name: str, field: str, where: str | Path) -> Any:
    try:
        return registry.get(name)
    except UnknownNameError as err:
        raise SuiteError(f"{where}: {field}: {err}") from None


def build_plugin(
    registry: Any, name: str, params: dict[str, Any], field: str, where: str | Path
) -> Any:
    """``registry.build(name, **params)``; a failure is a ``SuiteError`` naming
    ``FIELD.params.KEY`` where it can tell which parameter is wrong."""
    factory = _known(registry, name, f"{field}.name", where)
    accepted = parameters(factory)
    if accepted is not None:
        for key in params:
            if key not in accepted:
                raise SuiteError(
                    f"{where}: {field}.params.{key}: unknown parameter of {registry.kind[:-1]} "
                    f"{name!r}; expected one of {', '.join(accepted) or '(none)'}"
                )
    try:
        params = checked_params(factory, params)
    except ParamError as err:
        raise SuiteError(f"{where}: {field}.params.{err}") from None
    try:
        return factory(**params)
    except (TypeError, ValueError) as err:
        key = next((k for k in params if re.match(rf"\W*{re.escape(k)}\b", str(err))), None)
        at = f"{field}.params.{key}" if key else f"{field}.params"
        raise SuiteError(f"{where}: {at}: {name}: {err}") from None


def parameters(factory: Any) -> list[str] | None:
    """The keyword parameters ``factory`` takes (through the ``**kwargs`` a subclass hands
    to its bases); None when it takes any keyword."""
    owners = [k for k in getattr(factory, "__mro__", ()) if "__init__" in vars(k)] or [factory]
    names: list[str] = []
    for owner in owners:
        params = inspect.signature(owner).parameters.values()
        names += [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return [n for n in dict.fromkeys(names) if n != "self"]
    return None
