"""The shape of the code: `runner` has no import circles, and every library internal the
Trainer subclass overrides exists in the installed libraries.

A circle hidden in a function-level import still means neither module can be read (or moved)
without the other, so the graph counts imports at any depth (module level and inside
functions). `from runner.x import y` is an edge to runner.x.y when y is a module, else to
runner.x; a package's own `__init__` counts as the package. Imports under `if TYPE_CHECKING:`
are left out: they never run, and they are how an annotation names a class without the
dependency (runner.recipe.model annotates with confine's Confinement, which reads the model)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "runner"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The runner module `name` is, or the nearest enclosing one (None: not runner's)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def is_type_checking(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of `tree` except the bodies of `if TYPE_CHECKING:` (their `else` runs)."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if is_type_checking(node):
            assert isinstance(node, ast.If)
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names]
            targets = [t if t in known else base for t in targets]
        else:
            continue
        for target in targets:
            hit = resolve(target, known)
            if hit is not None and hit != module:
                found.add(hit)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports_of(m, p, known) for m, p in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_function_level_and_from_imports() -> None:
    graph = import_graph()
    assert "runner.recipe.load" in graph["runner.recipe"]  # from runner.recipe.load import ...
    assert "runner.models.load" in graph["runner.stages.quantize_load"]  # inside run()
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    typed = ast.parse("if TYPE_CHECKING:\n    import a\nelse:\n    import b\nimport c\n")
    names = {n.names[0].name for n in runtime_nodes(typed) if isinstance(n, ast.Import)}
    assert names == {"b", "c"}


def test_runner_has_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_overridden_library_name_exists() -> None:
    """A library upgrade that renames or drops what the runner overrides fails here, by name,
    instead of in a training run (runner/training/trainer.py lists them)."""
    pytest.importorskip("torch")
    from runner.training.trainer import OVERRIDES, missing

    gone = [
        f"{o.library} {o.version()}: {o.target} ({problem})"
        for o in OVERRIDES
        if (problem := missing(o))
    ]
    assert not gone, "overridden library names missing: " + "; ".join(gone)
    assert len(OVERRIDES) == len({o.target for o in OVERRIDES}) >= 8


OVERRIDE_FIX = "; install a version pyproject.toml lists (see docs/compatibility.md)"


def test_a_missing_target_stops_the_run_naming_the_library_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("torch")
    import peft
    import transformers
    from peft.tuners import tuners_utils

    from runner.errors import StageError
    from runner.throughput import Meter
    from runner.training.trainer import RunnerTrainer, clean_fsdp_prefixes

    monkeypatch.delattr(transformers.Trainer, "_track_num_input_tokens")
    with pytest.raises(StageError) as e:
        RunnerTrainer(meter=Meter(0), packed=object())  # type: ignore[arg-type]
    assert str(e.value) == (
        f"train: transformers {transformers.__version__} has no "
        "transformers.Trainer._track_num_input_tokens, which the runner overrides (tokens seen "
        "leave a packed row's pad segment out, and are counted on the CPU (the Trainer's count "
        "reads a GPU sum back: a sync every micro-batch))" + OVERRIDE_FIX
    )
    monkeypatch.delattr(tuners_utils, "_get_tuner_state_dict_key_prefixes")
    with pytest.raises(StageError) as e:
        clean_fsdp_prefixes()
    assert str(e.value) == (
        f"train: peft {peft.__version__} has no "
        "peft.tuners.tuners_utils._get_tuner_state_dict_key_prefixes, which the runner "
        "overrides (FSDP-QLoRA: peft finds the adapter's keys under FSDP's nested wrapper "
        "names)" + OVERRIDE_FIX
    )


def test_an_attribute_set_in_init_is_checked_on_an_instance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    import torch

    from runner.errors import StageError
    from runner.training.trainer import keep_training_layout

    layer = bnb.nn.Linear4bit(8, 8)
    model = torch.nn.Sequential(layer)
    keep_training_layout(model)
    assert layer.support_avx512bf16_for_cpu is False
    del layer.support_avx512bf16_for_cpu
    init = bnb.nn.Linear4bit.__init__

    def without(self: object, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)
        del self.support_avx512bf16_for_cpu  # type: ignore[attr-defined]

    monkeypatch.setattr(bnb.nn.Linear4bit, "__init__", without)
    with pytest.raises(StageError) as e:
        keep_training_layout(model)
    assert str(e.value) == (
        f"train: bitsandbytes {bnb.__version__} has no "
        "bitsandbytes.nn.Linear4bit.support_avx512bf16_for_cpu, which the runner overrides "
        "(evaluation during training must not repack 4-bit weights for the CPU inference "
        "kernel)" + OVERRIDE_FIX
    )
