"""ARCHITECTURE.md's layers hold: imports go down (recipe/ stays "TOML in, a Recipe out"; data/
and models/ never reach up into the stages), the run directory's paths are spelled only in
runner/rundir.py, and the modules the plan needs load no heavy library."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "runner"


def imports(path: Path) -> set[str]:
    """Every runner module a file imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m == "runner" or m.startswith("runner.")}


def offenders(folder: str, allowed: tuple[str, ...]) -> dict[str, list[str]]:
    out = {}
    for path in sorted((RUNNER / folder).rglob("*.py")):
        bad = sorted(
            m
            for m in imports(path)
            if not any(m == a or m.startswith(a + ".") for a in allowed) and m != "runner"
        )
        if bad:
            out[path.relative_to(ROOT).as_posix()] = bad
    return out


def test_recipe_imports_only_itself_and_errors() -> None:
    assert offenders("recipe", ("runner.recipe", "runner.errors", "runner.schemas")) == {}


@pytest.mark.parametrize("folder", ["data", "models"])
def test_data_and_models_never_import_stages_or_commands(folder: str) -> None:
    upward = ("runner.stages", "runner.cli", "runner.run", "runner.use", "runner.export")
    found = {
        path.relative_to(ROOT).as_posix(): sorted(
            m for m in imports(path) if any(m == u or m.startswith(u + ".") for u in upward)
        )
        for path in sorted((RUNNER / folder).rglob("*.py"))
    }
    assert {k: v for k, v in found.items() if v} == {}


# Paths in a run directory as the runner names them; spelled out anywhere else, a layout change
# would miss them.
RUN_DIR_PATHS = re.compile(
    r"""["'](data/formatted|data/tokenized|adapter|train/final|train/log_history\.json|"""
    r"""train/stop-requested|model/load\.json|compare\.md|compare\.jsonl|report\.html|"""
    r"""recipe\.resolved\.toml|logs|logs/run\.log|logs/launch|logs/launch\.log|state|"""
    r"""checkpoints|\.lock)["']"""
)


# The same spellings that are no run-directory path.
NOT_RUN_DIR = (
    'from_pretrained(base_model, "adapter")',  # the model card's snippet, in the user's folder
    'recipe_file.name + ".lock"',  # RECIPE.lock next to the recipe
    '["optimizer"]["state"]',  # a torch optimizer state dict's key
)


def test_run_directory_paths_are_spelled_only_in_rundir() -> None:
    found = []
    for path in sorted(RUNNER.rglob("*.py")):
        if path.name == "rundir.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#")[0]
            if RUN_DIR_PATHS.search(code) and not any(n in code for n in NOT_RUN_DIR):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []


def test_plan_side_modules_import_no_heavy_library() -> None:
    code = (
        "import sys\n"
        "import runner.rundir, runner.state, runner.precision, runner.plan, runner.lockfile\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'datasets')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
