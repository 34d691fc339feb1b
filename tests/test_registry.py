"""The plugin registry: registration, lookup with helpful errors, wildcards, entry points."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from xaibench.registry import ALL_REGISTRIES, Registry, UnknownNameError, plugin_name


def test_register_get_and_list() -> None:
    things = Registry("things")

    @things.register("odam-like")
    class A:
        pass

    things.register("other", int)
    assert things.get("odam-like") is A
    assert things.names() == ["odam-like", "other"]
    assert things.names("odam*") == ["odam-like"]
    assert things.build("other") == 0
    with pytest.raises(ValueError, match="already registered"):
        things.register("other", float)


def test_unknown_name_shows_closest_and_known() -> None:
    things = Registry("things")
    things.register("gradcam", object)
    things.register("gradcampp", object)
    with pytest.raises(UnknownNameError) as err:
        things.get("gradcan")
    assert "Did you mean 'gradcam'?" in str(err.value)
    assert "Known things: gradcam, gradcampp" in str(err.value)


def test_known_names_are_listed_the_closest_first() -> None:
    things = Registry("things")
    for name in ("bbam", "drise", "drise-feature", "odam"):
        things.register(name, object)
    with pytest.raises(UnknownNameError) as err:
        things.get("drise-feat")
    assert str(err.value).endswith("Known things: drise-feature, drise, odam, bbam")


def test_entry_points_are_discovered_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    things = Registry("things")
    ep = EntryPoint(name="mine", value="collections:OrderedDict", group="xaibench.things")
    monkeypatch.setattr(
        "xaibench.registry.entry_points", lambda group: [ep] if group == "xaibench.things" else []
    )
    import collections

    assert things.get("mine") is collections.OrderedDict


def test_builtin_plugins_register_through_entry_points() -> None:
    assert "odam" in ALL_REGISTRIES["methods"]
    assert "fcos_resnet50_fpn" in ALL_REGISTRIES["detectors"]
    assert "coco" in ALL_REGISTRIES["datasets"]
    assert set(ALL_REGISTRIES) == {"detectors", "methods", "metrics", "nms", "recipes", "datasets"}


def test_plugin_name_of_a_label() -> None:
    assert plugin_name("odam") == "odam"
    assert plugin_name("odam@p3") == "odam"
    for bad in ("", "@p3", "odam@"):
        with pytest.raises(ValueError, match="NAME@VARIANT"):
            plugin_name(bad)
