"""Sharing recipes: the reference page in sync with the schema, documented enum values, editor
checking with taplo, the pre-commit hook and `recipe validate --format json` for CI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from runner.cli import cli
from runner.recipe.reference import PAGE, render_reference
from runner.recipe.schema import load_schema

ROOT = Path(__file__).resolve().parents[1]


def test_reference_page_is_in_sync_with_the_schema() -> None:
    page = ROOT / PAGE
    assert page.read_text(encoding="utf-8") == render_reference(), (
        f"{PAGE} is out of date: run `just docs` (recipe reference --output {PAGE})"
    )


def test_reference_command_writes_the_page(tmp_path: Path) -> None:
    out = tmp_path / "ref.md"
    result = CliRunner().invoke(cli, ["reference", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8") == render_reference()
    assert "reference" not in CliRunner().invoke(cli, ["--help"]).output  # hidden


def test_reference_lists_every_key_with_type_default_and_values() -> None:
    page = render_reference()
    assert "| `extends` | string (not empty) or array of string (not empty) | *unset* |" in page
    assert "## `[model.tiny]`" in page
    assert "| `r` | integer (>= 1, <= 1024) | `8` | " in page
    assert '`"nf4"`: 4-bit NormalFloat' in page
    assert "| `name` | string (matches `^[A-Za-z0-9][A-Za-z0-9._-]*$`), **required** |" in page

    def keys(node: dict[str, Any], prefix: str) -> list[str]:
        out = []
        for key, sub in node.get("properties", {}).items():
            if sub.get("type") == "object" and "properties" in sub:
                out += [f"## `[{prefix}{key}]`", *keys(sub, f"{prefix}{key}.")]
            else:
                out.append(f"| `{key}` |")
        return out

    for needle in keys(load_schema(), ""):
        assert needle in page, needle


def test_readme_links_the_reference_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Recipe reference", 1)[1].split("\n## ", 1)[0]
    assert f"]({PAGE})" in section


def enums(node: Any, path: str = "$") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        if "enum" in node:
            found.append((path, node))
        for key, sub in node.items():
            found += enums(sub, f"{path}.{key}")
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            found += enums(sub, f"{path}[{i}]")
    return found


def test_every_enum_value_is_explained_for_editors() -> None:
    found = enums(load_schema())
    assert len(found) >= 10
    for path, node in found:
        docs = node.get("x-taplo", {}).get("docs", {}).get("enumValues")
        assert isinstance(docs, list) and len(docs) == len(node["enum"]), path
        assert all(isinstance(d, str) and len(d) > 10 for d in docs), path


def test_extends_is_in_the_schema() -> None:
    extends = load_schema()["properties"]["extends"]
    assert extends["description"]
    assert [b["type"] for b in extends["anyOf"]] == ["string", "array"]


def taplo() -> str:
    found = shutil.which("taplo") or shutil.which("taplo", path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip("taplo is not installed (pip install taplo, part of the dev extra)")
    return found


def taplo_check(cwd: Path, *files: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [taplo(), "check", *files], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_taplo_validates_the_shipped_recipes_against_the_schema() -> None:
    recipes = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").glob("*.toml"))
    result = taplo_check(ROOT, *recipes)
    assert result.returncode == 0, result.stderr


def test_taplo_config_applies_the_schema_to_recipes(tmp_path: Path) -> None:
    """.taplo.toml checks a recipe without a #:schema line; a file that only extends another
    may leave out required keys, but not misspell one."""
    shutil.copy(ROOT / ".taplo.toml", tmp_path)
    shutil.copytree(ROOT / "schemas", tmp_path / "schemas")
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    tiny = (ROOT / "recipes" / "adgen-tiny.toml").read_text(encoding="utf-8").splitlines()[1:]
    (recipes / "bad.toml").write_text(
        "\n".join(tiny).replace("learning_rate =", "learning_rat ="), encoding="utf-8"
    )
    (recipes / "child.toml").write_text(
        'extends = "adgen-tiny.toml"\n[model.tiny]\nhidden_size = 512\n[lora]\nr = 16\n',
        encoding="utf-8",
    )
    (recipes / "bad-child.toml").write_text('extends = "x.toml"\n[lora]\nr = 0\n', encoding="utf-8")
    bad = taplo_check(tmp_path, "recipes/bad.toml")
    assert bad.returncode != 0 and "learning_rat" in bad.stdout + bad.stderr
    assert taplo_check(tmp_path, "recipes/child.toml").returncode == 0
    bad_child = taplo_check(tmp_path, "recipes/bad-child.toml")
    assert bad_child.returncode != 0 and "minimum" in bad_child.stdout + bad_child.stderr


def test_pre_commit_hooks_run_recipe_validate_on_recipes() -> None:
    yaml = pytest.importorskip("yaml")
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))
    assert [h["id"] for h in hooks] == ["recipe-validate", "recipe-validate-system"]
    for hook in hooks:
        assert hook["entry"] == "recipe validate"
        assert hook.get("pass_filenames", True)
        files = re.compile(hook["files"])
        assert files.search("recipes/adgen.toml")
        assert not files.search("recipes/adgen.toml.lock")
        assert not files.search("pyproject.toml")
    assert {h["language"] for h in hooks} == {"python", "system"}


def test_validate_json_lists_every_problem(tmp_path: Path) -> None:
    several = ROOT / "tests" / "cases" / "several-errors" / "recipe.toml"
    broken = ROOT / "tests" / "cases" / "broken-toml" / "recipe.toml"
    good = ROOT / "recipes" / "adgen-tiny.toml"
    result = CliRunner().invoke(
        cli, ["validate", "--format", "json", str(good), str(several), str(broken)]
    )
    assert result.exit_code == 2
    found = json.loads(result.output)
    assert found[0] == {
        "file": str(several),
        "line": 11,
        "path": "$.lora.r",
        "message": "'eight' is not of type 'integer'",
    }
    assert [(p["file"], p["line"], p["path"]) for p in found] == [
        (str(several), 11, "$.lora.r"),
        (str(several), 12, "$.lora.lora_alhpa"),
        (str(several), 14, "$.train.optim"),
        (str(several), 15, "$.train.bf16"),
        (str(broken), 10, None),
    ]
    assert found[-1]["message"] == "invalid TOML: Expected ']' at the end of a table declaration"


def test_validate_json_with_set_and_no_problems(small_recipe: Path) -> None:
    result = CliRunner().invoke(cli, ["validate", "--format", "json", str(small_recipe)])
    assert (result.exit_code, json.loads(result.output)) == (0, [])
    result = CliRunner().invoke(
        cli, ["validate", "--format", "json", str(small_recipe), "--set", "lora.r=0"]
    )
    assert result.exit_code == 2
    assert json.loads(result.output) == [
        {
            "file": str(small_recipe),
            "line": None,
            "path": "$.lora.r",
            "message": "0 is less than the minimum of 1 (from --set lora.r=0)",
        }
    ]


def test_show_new_reference_and_json_validate_import_no_torch(
    small_recipe: Path, tmp_path: Path
) -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from runner.cli import cli\n"
        "recipe, folder = sys.argv[1], sys.argv[2]\n"
        "for args in (['show', recipe], ['validate', '--format', 'json', recipe],\n"
        "             ['new', 'x', '--dir', folder], ['reference']):\n"
        "    r = CliRunner().invoke(cli, args)\n"
        "    assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'datasets')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(small_recipe), str(tmp_path / "new")], check=True
    )
