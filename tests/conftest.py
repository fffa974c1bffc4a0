"""Shared fixtures: a small recipe on files the tests write themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datakit import session_cache

ROOT = Path(__file__).resolve().parents[1]

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
