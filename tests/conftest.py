"""Shared fixtures: a small recipe on files the tests write themselves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from datakit import TEST_TINY, session_cache

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n: the workers share the cores; a torch thread pool per core in every worker
    # would oversubscribe them (read by torch at import, so before any test imports it)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

SMALL_RECIPE = """\
[recipe]
name = "small"
seed = 1
output_dir = "{run_dir}"

[model]
name_or_path = "builtin:tiny-glm"

[model.tiny]
corpus = "corpus.jsonl"

[dataset]
path = "data"
heldout_split = "dev"

[template]
prompt = "Q: {{{{ q }}}}\\nA: "
response = "{{{{ a }}}}"
"""


@pytest.fixture
def small_recipe(tmp_path: Path) -> Path:
    """A valid recipe whose data, corpus and run dir live in tmp_path."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(20)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (data / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": "some text"}) + "\n")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(SMALL_RECIPE.format(run_dir=tmp_path / "run"), encoding="utf-8")
    return recipe


@pytest.fixture(scope="session")
def recipe_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The session's model cache (datakit.session_cache): each tiny model is built once."""
    return session_cache(tmp_path_factory)


# the longest files, longest first (`pytest --durations`), in the order that balances two
# workers: a worker is handed a file when it has at most two tests left, so the first and third
# go to one worker, the second and fourth to the other, and the rest to whichever is free
LONGEST = (
    "test_launch_e2e.py",
    "test_e2e.py",
    "test_attacks.py",
    "test_faults.py",
    "test_use_e2e.py",
    "test_compile.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`pytest -n` hands each file to one worker in collection order: the long end-to-end files
    go first so that they start at once and the short ones fill the gaps, instead of one long
    file starting last and running alone. Then the other files with slow tests."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        if name in LONGEST:
            return LONGEST.index(name)
        return len(LONGEST) if item.path in slow_files else len(LONGEST) + 1

    items.sort(key=rank)  # stable: the order within a file is kept


def pytest_sessionstart(session: pytest.Session) -> None:
    """A whole-suite `pytest -n` run: the controller builds the demo's tiny model into the
    workers' shared cache (datakit.session_cache) with every core before they start, instead of
    one worker building it on one core while the others wait for it on theirs."""
    config = session.config
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(config.option, "numprocesses", 0):
        return
    whole = all(Path(a).resolve() == ROOT / "tests" for a in config.args) and not (
        config.option.markexpr or config.option.keyword
    )
    if not whole:  # a few files or `-m "not slow"`: the tests that need the model build it
        return
    from runner.models.resolve import materialize
    from runner.recipe import load_recipe

    cache = os.environ.get("RECIPE_TEST_CACHE") or os.environ.get("RECIPE_CACHE")
    if not cache:
        cache = str(config._tmp_path_factory.getbasetemp() / "recipe-cache")  # type: ignore[attr-defined]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECIPE_CACHE", cache)
        materialize(load_recipe(ROOT / "recipes" / "adgen-tiny.toml", TEST_TINY), lambda _: None)
