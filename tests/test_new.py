"""`recipe new`: a commented starter recipe (and its prompt template) that validates as is."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import cli
from runner.data.templates import Renderer, template_sources
from runner.plan import compute_plan
from runner.recipe import load_recipe
from runner.recipe.starters import STARTERS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("starter", STARTERS)
def test_starter_validates_as_written(tmp_path: Path, starter: str) -> None:
    result = CliRunner().invoke(cli, ["new", "my-run", "--from", starter, "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    recipe_file, prompt = tmp_path / "my-run.toml", tmp_path / "my-run.prompt.j2"
    assert result.output == f"wrote {recipe_file}\nwrote {prompt}\n"
    check = CliRunner().invoke(cli, ["validate", str(recipe_file)])
    assert check.exit_code == 0, check.output
    text = recipe_file.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0].startswith("#:schema ")
    assert (tmp_path / lines[0].removeprefix("#:schema ")).resolve() == (
        ROOT / "schemas" / "recipe.schema.json"
    ).resolve()
    assert sum(line.lstrip().startswith("#") or " # " in line for line in lines) > 20  # commented
    recipe = load_recipe(recipe_file)
    assert recipe.name == "my-run"
    sources = template_sources(recipe)
    row = {"content": "类型#裙*颜色#红色", "summary": "红色的裙子"}
    # the prompt file's final newline is kept: the response starts on its own line
    assert Renderer(sources).render(row, 0) == ("用户: 类型#裙*颜色#红色\n", "广告: 红色的裙子")


def test_tiny_starter_plans_on_the_shipped_demo_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["new", "tiny.toml", "--from", "adgen-tiny"])
    assert result.exit_code == 0, result.output
    plan = compute_plan(load_recipe(tmp_path / "tiny.toml"))  # finds the data, corpus, template
    assert {st.status for st in plan} == {"pending"}


def test_default_starter_is_adgen(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["new", "x", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert load_recipe(tmp_path / "x.toml").get("model.name_or_path") == "THUDM/chatglm3-6b"


def test_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "x.prompt.j2").write_text("mine")
    result = CliRunner().invoke(cli, ["new", "x", "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output == (
        f"{tmp_path / 'x.prompt.j2'}: already exists; recipe new never "
        "overwrites: choose another NAME or --dir, or move it away\n"
    )
    assert (tmp_path / "x.prompt.j2").read_text() == "mine"
    assert not (tmp_path / "x.toml").exists()  # nothing written when anything exists


def test_bad_name(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["new", "my run", "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output == (
        "recipe new my run: a recipe name is letters, digits, '.', '_' and "
        "'-', starting with a letter or digit; e.g. recipe new my-adgen\n"
    )
    assert list(tmp_path.iterdir()) == []
