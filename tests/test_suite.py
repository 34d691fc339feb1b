"""Suite files: a bad suite fails before any work, naming the file, the field path and what
was expected; unknown names list the known ones, the closest first."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from xaibench.cli import app
from xaibench.suite import SuiteError, check_plugins, load_suite

GOOD = {
    "name": "tiny",
    "datasets": [{"name": "synth", "kind": "synthetic", "num_images": 2}],
    "detectors": [{"name": "evidence-toy"}],
    "methods": [{"name": "gradcam"}, {"name": "odam"}, {"name": "drise", "params": {"n": 10}}],
    "metrics": ["pointing-game", {"name": "deletion", "params": {"steps": 10}}],
}


def suite_file(folder: Path, text: str | dict) -> Path:
    path = folder / "suite.yaml"
    path.write_text(text if isinstance(text, str) else yaml.safe_dump(text, sort_keys=False))
    return path


def changed(path: str, value) -> dict:
    """GOOD with the field at ``path`` (dotted, list indices as numbers) set to ``value``
    (``...`` deletes it)."""
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
    node = raw
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return raw


def error_of(path: Path, overrides=()) -> str:
    with pytest.raises(SuiteError) as err:
        check_plugins(load_suite(path, list(overrides)), path)
    return str(err.value)


def test_the_good_suite_and_the_embedded_default_validate(tmp_path) -> None:
    suite = load_suite(suite_file(tmp_path, GOOD))
    check_plugins(suite)
    assert [m.name for m in suite.metrics] == ["pointing-game", "deletion"]
    default = load_suite()
    check_plugins(default)
    assert len(default.methods) == 6 and len(default.detectors) == 2


def test_the_committed_default_leaderboard_ran_the_embedded_default_suite() -> None:
    committed = Path(__file__).parents[1] / "leaderboards" / "default" / "suite.yaml"
    ran, embedded = load_suite(committed), load_suite()
    assert ran.store is not None and ran.store.name == embedded.store.name == "default"
    assert ran.model_copy(update={"store": embedded.store}) == embedded  # the run's own store


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("methods.2.params.n", "lots", "methods[2].params.n='lots': expected int"),
        ("methods.2.params.masks_count", 5, "methods[2].params.masks_count: unknown parameter"),
        ("methods.2.params.n", -5, "methods[2].params.n: drise: n and grid must be >= 1"),
        (
            "methods.0.name",
            "gradcan",
            "methods[0].name: unknown methods 'gradcan'. Did you mean 'gradcam'? Known",
        ),
        (
            "metrics.0",
            "pointing-gme",
            "metrics[0].name: unknown metrics 'pointing-gme'. Did you mean",
        ),
        (
            "detectors.0.name",
            "synthetic-fcoss",
            "detectors[0].detector: unknown detectors 'synthetic-fcoss'.",
        ),
        ("metrics.1.params.steps", "ten", "metrics[1].params.steps='ten': expected int"),
        ("datasets.0.kind", "voc", "datasets[0]: kind must be one of synthetic, coco, crowdhuman"),
        (
            "datasets.0.num_images",
            0,
            "datasets[0].num_images: Input should be greater than or equal to 1",
        ),
        ("limits", {"images": "many"}, "limits.images: Input should be a valid integer"),
        ("colour", "red", "colour: unknown field (not allowed here)"),
        ("detectors", ..., "detectors: missing (required)"),
        ("methods.1.name", "gradcam", "methods[1].name 'gradcam' is used twice"),
        ("attribute", "width", "attribute: attribute must be one of score,"),
        ("name", "my suite", "name: String should match pattern"),
    ],
)
def test_bad_fields_name_the_file_the_path_and_the_expectation(
    tmp_path, field: str, value, expected: str
) -> None:
    path = suite_file(tmp_path, changed(field, value))
    message = error_of(path)
    assert message.startswith(f"{path}: ")
    assert expected in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping of suite fields, got list"),
    ],
)
def test_files_that_are_not_suites(tmp_path, text: str, expected: str) -> None:
    assert expected in error_of(suite_file(tmp_path, text))


def test_overrides_name_the_set_option(tmp_path) -> None:
    path = suite_file(tmp_path, GOOD)
    assert "--set methods[5]: no entry 5 (the list has 3)" in error_of(path, ["methods[5].n=3"])
    assert "--set expects PATH=VALUE" in error_of(path, ["limits.images"])
    assert "limits.images: Input should be a valid integer" in error_of(path, ["limits.images=x"])
    assert load_suite(path, ["methods[2].params.n=7"]).methods[2].params == {"n": 7}


def test_the_command_fails_in_one_line_before_any_work(tmp_path) -> None:
    store = tmp_path / "store"
    path = suite_file(tmp_path, changed("methods.0.name", "gradcan") | {"store": str(store)})
    result = CliRunner().invoke(app, ["run", str(path), "--no-progress"])
    assert result.exit_code == 2
    assert "methods[0].name: unknown methods 'gradcan'" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not store.exists()
    missing = CliRunner().invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "no such suite file" in missing.output
