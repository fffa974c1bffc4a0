"""check-jsonschema style: each folder under cases/ is a recipe.toml and its expected output."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import cli

CASES = sorted(p for p in (Path(__file__).parent / "cases").iterdir() if p.is_dir())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_validate_reports_exactly(case: Path) -> None:
    recipe = case / "recipe.toml"
    result = CliRunner().invoke(cli, ["validate", str(recipe)])
    expected = (case / "expected.txt").read_text(encoding="utf-8").replace("{file}", str(recipe))
    assert result.exit_code == 2, result.output
    assert result.output == expected
    assert "Traceback" not in result.output


def test_shipped_recipes_validate() -> None:
    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.toml"))
    assert recipes
    result = CliRunner().invoke(cli, ["validate", *map(str, recipes)])
    assert result.exit_code == 0, result.output
    assert result.output.count(": ok") == len(recipes)


def test_shipped_recipes_open_with_schema_line_and_header() -> None:
    for recipe in (Path(__file__).parents[1] / "recipes").glob("*.toml"):
        lines = recipe.read_text(encoding="utf-8").splitlines()
        assert lines[0] == "#:schema ../schemas/recipe.schema.json", recipe
        assert any("recipe run" in line for line in lines[:25] if line.startswith("#")), recipe
