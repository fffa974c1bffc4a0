"""An installed (non-editable) wheel carries the schema every command validates against."""

from __future__ import annotations

import sys
from pathlib import Path

import runner
from runner.recipe.schema import SCHEMA_PATH

ROOT = Path(__file__).resolve().parents[1]


def test_the_schema_is_read_from_inside_the_package() -> None:
    assert SCHEMA_PATH.parent.parent == Path(runner.__file__).parent
    assert SCHEMA_PATH.resolve() == ROOT / "schemas" / "recipe.schema.json"  # one file, linked


def test_the_wheel_includes_it() -> None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "schemas/*.json" in project["tool"]["setuptools"]["package-data"]["runner"]
