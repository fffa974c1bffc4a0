"""The shape of runner/models/chatglm/: imports only go one way (no cycle, function-level imports
included), models/ never reaches up into the commands, the test oracle stays out of the wheel,
and importing any of its modules loads no heavy library."""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "runner" / "models" / "chatglm"
# The command layer: models/ is below it and is called by it, never the reverse.
COMMANDS = ("runner.cli", "runner.run", "runner.use", "runner.export", "runner.launch")
HEAVY = ("torch", "transformers", "peft", "tokenizers", "safetensors", "sentencepiece")


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module a file imports, at the top or inside a function, by its full name (for
    `from a import b`, both `a` and `a.b`: b may be a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to the file's package
                package = path.relative_to(root).with_suffix("").parts[: -node.level]
                base = ".".join([*package, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = path.stem
        prefix = "runner.models.chatglm."
        graph[name] = {
            m[len(prefix) :].split(".")[0] for m in imported_modules(path) if m.startswith(prefix)
        } - {name}
    return graph


def test_the_package_imports_form_no_cycle() -> None:
    graph = package_graph()
    assert {"config", "names", "tokenizer", "weights", "adapters"} <= set(graph)
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as e:  # pragma: no cover - the failure message
        pytest.fail(f"import cycle in runner/models/chatglm: {e.args[1]}")
    assert set(order) == set(graph)
    assert graph["__init__"] == set(), "__init__.py re-exports nothing: callers pick the module"


def test_late_and_relative_imports_count(tmp_path: Path) -> None:
    """What the cycle check reads: an import inside a function, or a relative one, is an edge."""
    module = tmp_path / "runner" / "models" / "chatglm" / "names.py"
    module.parent.mkdir(parents=True)
    module.write_text(
        "def f():\n    from runner.models.chatglm.adapters import convert_adapter\n"
        "    from .weights import split_qkv_rows\n    from . import files\n",
        encoding="utf-8",
    )
    assert imported_modules(module, tmp_path) == {
        "runner.models.chatglm.adapters",
        "runner.models.chatglm.adapters.convert_adapter",
        "runner.models.chatglm.weights",
        "runner.models.chatglm.weights.split_qkv_rows",
        "runner.models.chatglm",
        "runner.models.chatglm.files",
    }


def test_models_never_import_the_commands() -> None:
    offenders = {
        f"{path.relative_to(ROOT)}: {module}"
        for path in sorted((ROOT / "runner" / "models").rglob("*.py"))
        for module in imported_modules(path)
        if module in COMMANDS or module.startswith(tuple(c + "." for c in COMMANDS))
    }
    assert offenders == set()


def test_the_reference_forward_is_a_test_file_only() -> None:
    assert (ROOT / "tests" / "chatglm_reference.py").is_file()
    assert not list((ROOT / "runner").rglob("chatglm_reference.py"))
    users = {
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "runner").rglob("*.py"))
        if any("chatglm_reference" in m for m in imported_modules(path))
    }
    assert users == set()


def test_importing_the_package_loads_no_heavy_library() -> None:
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module('runner.models.chatglm.' + name)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.strip() == "[]"
