"""Bad data is reported as file:line (or row and column), through `recipe run --until format`:
invalid JSON, non-UTF-8 text, empty files, missing columns, empty prompts or responses, and no
rows left."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from datakit import qa_rows, write_jsonl, write_recipe

from runner.cli import cli


def run_format(recipe: Path, *args: str) -> Any:
    return CliRunner().invoke(cli, ["run", str(recipe), "--until", "format", *args])


def last_line(result: Any) -> str:
    return str(result.output.splitlines()[-1])


@pytest.mark.parametrize("name", ["train.jsonl", "train.json"])
def test_invalid_json_line_is_named(tmp_path: Path, name: str) -> None:
    recipe = write_recipe(tmp_path)
    (tmp_path / "data" / "train.jsonl").unlink()
    (tmp_path / "data" / "dev.jsonl").rename(tmp_path / "data" / f"dev{Path(name).suffix}")
    lines = [json.dumps(r) for r in qa_rows(4)]
    lines[2] = '{"q": "question 2", "a": broken}'
    bad = tmp_path / "data" / name
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_format(recipe)
    assert result.exit_code == 2, result.output
    assert last_line(result) == (
        f"{recipe.resolve()}: $.dataset.path: {bad}:3: invalid JSON "
        "(Expecting value); fix or delete that line"
    )


def test_invalid_json_document_is_named(tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path, dataset={"path": "rows.json", "heldout_split": None, "heldout_rows": 1}
    )
    bad = tmp_path / "rows.json"
    bad.write_text('[{"q": "a", "a": "b"},\n {"q": "c", "a": }]\n', encoding="utf-8")
    result = run_format(recipe)
    assert result.exit_code == 2, result.output
    assert last_line(result) == (
        f"{recipe.resolve()}: $.dataset.path: {bad}:2: invalid JSON (Expecting value); fix the file"
    )


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_non_utf8_file_is_named(tmp_path: Path, suffix: str) -> None:
    recipe = write_recipe(
        tmp_path, dataset={"path": f"rows{suffix}", "heldout_split": None, "heldout_rows": 1}
    )
    bad = tmp_path / f"rows{suffix}"
    if suffix == ".jsonl":
        body = '{"q": "a", "a": "b"}\n{"q": "caf\xe9", "a": "d"}\n'.encode("latin-1")
    else:
        body = "q,a\na,b\ncaf\xe9,d\n".encode("latin-1")
    bad.write_bytes(body)
    offset = body.index(b"\xe9")
    result = run_format(recipe)
    assert result.exit_code == 2, result.output
    line = 2 if suffix == ".jsonl" else 3
    assert last_line(result) == (
        f"{recipe.resolve()}: $.dataset.path: {bad}:{line}: not UTF-8 "
        f"(byte {offset}); convert the file to UTF-8"
    )


def test_empty_file_is_named(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path)
    (tmp_path / "data" / "train.jsonl").write_text("\n", encoding="utf-8")
    result = run_format(recipe)
    assert result.exit_code == 2, result.output
    assert last_line(result) == (
        f"{recipe.resolve()}: $.dataset.path: "
        f"{tmp_path / 'data' / 'train.jsonl'}: the file is empty; add rows "
        "or remove it"
    )


def test_missing_column_lists_the_available_ones(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, dataset={"columns": {"q": "question"}})
    result = run_format(recipe)
    assert result.exit_code == 2, result.output
    assert last_line(result) == (
        f"{recipe.resolve()}: $.dataset.columns: no column 'question'; the data has: q, a"
    )


def with_empty_responses(tmp_path: Path, **tables: Any) -> Path:
    recipe = write_recipe(tmp_path, dataset={"shuffle": False}, **tables)
    rows = qa_rows(16)
    for i in (2, 5):
        rows[i]["a"] = "  "
    rows[7]["q"] = ""
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    return recipe


def test_empty_prompts_and_responses_are_counted_and_dropped(tmp_path: Path) -> None:
    recipe = with_empty_responses(tmp_path, template={"prompt": "{{ q }}"})
    result = run_format(recipe)
    assert result.exit_code == 0, result.output
    assert (
        "format: warning: train: the template produced empty text in 3 rows (1 prompts, "
        '2 responses; e.g. rows 3, 6, 8): they were dropped (template.empty = "error" '
        "refuses them)\n"
    ) in result.output  # (progress bars may share its line)
    metrics = json.loads((tmp_path / "run" / "state" / "format.json").read_text())["metrics"]
    assert metrics["train_rows"] == 13 and metrics["dropped_empty"] == 3
    assert metrics["train_empty"] == {"prompt": 1, "response": 2, "rows": [3, 6, 8], "dropped": 3}


def test_empty_rows_refused_on_request(tmp_path: Path) -> None:
    recipe = with_empty_responses(tmp_path, template={"empty": "error"})
    result = run_format(recipe)
    assert result.exit_code == 2, result.output
    assert last_line(result) == (
        "template: the template produced an empty prompt or response in 2 "
        "train rows (rows 3, 6); fix the data or the template, or set "
        'template.empty = "drop" to drop them'
    )


def test_no_rows_left_is_an_error_not_a_trainer_crash(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, template={"response": "{{ a if false else '' }}"})
    result = run_format(recipe)
    assert result.exit_code == 2, result.output
    assert last_line(result) == (
        f"{recipe.resolve()}: no training rows left after formatting "
        "(all 16 rendered an empty prompt or response); check "
        "dataset.path, dataset.split and the templates"
    )
    recipe = write_recipe(
        tmp_path, template={"response": "{{ a }}"}, dataset={"split": "train[16:]"}
    )
    result = run_format(recipe)
    assert result.exit_code == 2, result.output
    assert last_line(result) == (
        f"{recipe.resolve()}: no training rows left after formatting "
        "(the split 'train[16:]' has no rows); check dataset.path, "
        "dataset.split and the templates"
    )


def test_every_row_dropped_by_tokenize_is_an_error(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tokenize={"max_length": 8, "truncation": "drop"})
    result = CliRunner().invoke(cli, ["run", str(recipe), "--until", "tokenize"])
    assert result.exit_code == 2, result.output
    assert last_line(result) == (
        f"{recipe.resolve()}: $.tokenize.max_length: every training row "
        "was dropped as longer than 8 tokens; raise max_length or use "
        'truncation = "cut_prompt"'
    )
