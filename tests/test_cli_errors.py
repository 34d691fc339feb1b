"""Ordinary mistakes in ``explain`` and ``compare`` end in one line naming the argument and
exit code 2; ``--debug`` or ``XAIBENCH_DEBUG=1`` shows the traceback instead."""

from __future__ import annotations

import pytest
from PIL import Image
from typer.testing import CliRunner
from xaibench.detectors.evidence import evidence_image

from xaibench.cli import app
from xaibench.cli.errors import typed_params
from xaibench.registry import METHODS

runner = CliRunner()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "toy.png"
    Image.fromarray(evidence_image()).save(path)
    return path


def explain(image, *args: str) -> list[str]:
    return ["explain", str(image), "-d", "evidence-toy", "--top-k", "1", *args]


def compare(image, *args: str) -> list[str]:
    return ["compare", str(image), "-d", "evidence-toy", "--methods", "odam,gradcam", *args]


def one_line_error(result, *expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for text in expected:
        assert text in lines[0], lines[0]


def flat(output: str) -> str:
    """Typer's usage-error box without its frame and line breaks."""
    return " ".join(output.replace("│", " ").split())


@pytest.mark.parametrize("command", [explain, compare])
def test_bad_images_name_the_image_argument(tmp_path, command) -> None:
    missing = tmp_path / "missing.png"
    one_line_error(runner.invoke(app, command(missing)), "error: IMAGE:", "missing.png")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    one_line_error(runner.invoke(app, command(not_an_image)), "error: IMAGE:", "notes.png")


@pytest.mark.parametrize("command", [explain, compare])
def test_unknown_detector_and_method_names(image, command) -> None:
    args = command(image)
    args[args.index("evidence-toy")] = "evidence-tyo"
    one_line_error(runner.invoke(app, args), "error: --detector:", "'evidence-toy'")
    if command is explain:
        result = runner.invoke(app, explain(image, "--method", "gradcamm"))
        one_line_error(result, "error: --method:", "'gradcam'")
    else:
        args = compare(image)
        args[args.index("odam,gradcam")] = "odam,gradcamm"
        one_line_error(runner.invoke(app, args), "error: --method:", "'gradcam'")


def test_wrong_type_and_unknown_method_params_are_named(image) -> None:
    result = runner.invoke(app, explain(image, "-m", "drise", "-p", "n=lots"))
    assert result.exit_code == 2 and "TypeError" not in result.output
    assert "--method-param n='lots': expected int" in flat(result.output)
    result = runner.invoke(app, explain(image, "-m", "drise", "-p", "masks_count=5"))
    assert result.exit_code == 2 and "masks_count: not a setting of DRISE" in flat(result.output)
    result = runner.invoke(app, compare(image, "-p", "gradcam.mode=quick"))
    assert result.exit_code == 2
    assert "--method-param gradcam.mode='quick': expected" in flat(result.output)
    result = runner.invoke(app, explain(image, "--detector-param", "stride=four"))
    assert result.exit_code == 2
    assert "--detector-param stride='four': expected int" in flat(result.output)


def test_a_value_that_fails_inside_the_method_names_the_method_param(image) -> None:
    result = runner.invoke(app, explain(image, "-p", "layer=no-such-layer"))
    one_line_error(result, "error: --method-param:", "no-such-layer")


@pytest.mark.parametrize("command", [explain, compare])
def test_an_output_path_that_is_a_file(tmp_path, image, command) -> None:
    taken = tmp_path / "taken"
    taken.write_text("")
    one_line_error(runner.invoke(app, command(image, "--out", str(taken))), "error: --out:")


def test_debug_flag_and_environment_variable_show_the_traceback(tmp_path, image) -> None:
    missing = [str(tmp_path / "missing.png")]
    result = runner.invoke(app, [*explain(missing[0]), "--debug"])
    assert result.exit_code == 1 and "does not exist" in str(result.exception)
    result = runner.invoke(app, compare(missing[0]), env={"XAIBENCH_DEBUG": "1"})
    assert result.exit_code == 1 and "does not exist" in str(result.exception)


def test_typed_params_converts_to_the_annotated_types() -> None:
    drise = METHODS.get("drise")
    assert typed_params(drise, {"n": 5, "p": 1}, "-p") == {"n": 5, "p": 1.0}
    assert typed_params(METHODS.get("odam"), {"layer": 0}, "-p") == {"layer": "0"}  # level "0"


@pytest.mark.parametrize("size", [(1, 1), (10000, 10)])
def test_images_no_detector_can_see_are_refused(tmp_path, size) -> None:
    odd = tmp_path / "odd.png"
    Image.new("RGB", size, "white").save(odd)
    one_line_error(runner.invoke(app, explain(odd)), "error: IMAGE:", "odd.png is")
