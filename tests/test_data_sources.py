"""Sources: local files of every kind, globs, folders, split slicing, shuffling, flattening,
renames, held-out rows and hub ids, through the format stage's in-memory `prepare`."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from datakit import qa_rows, write_jsonl, write_recipe

from runner.data.formatting import ROW, Formatted, prepare
from runner.data.sources import dataset_identity
from runner.errors import RecipeError
from runner.recipe import load_recipe

pytest.importorskip("datasets")


def formatted(recipe_file: Path, overrides: tuple[str, ...] = ()) -> Formatted:
    return prepare(load_recipe(recipe_file, overrides))


def prompts(ds: Any) -> list[str]:
    return list(ds["prompt"])


def write_file(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        write_jsonl(path, rows)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_each_file_type_loads_in_file_order(tmp_path: Path, suffix: str) -> None:
    write_file(tmp_path / f"rows{suffix}", qa_rows(10))
    recipe = write_recipe(
        tmp_path,
        tokenizer=False,
        dataset={
            "path": f"rows{suffix}",
            "heldout_split": None,
            "heldout_rows": 2,
            "shuffle": False,
        },
    )
    out = formatted(recipe)
    assert prompts(out.train) == [f"Q: question {i}\nA: " for i in range(8)]
    assert list(out.train["response"]) == [f"answer {i}" for i in range(8)]
    assert prompts(out.heldout) == [f"Q: question {i}\nA: " for i in (8, 9)]
    assert list(out.train[ROW]) == list(range(1, 9))


def test_folder_of_split_files_and_glob(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data" / "train-00000.jsonl", qa_rows(3))
    write_jsonl(tmp_path / "data" / "train-00001.jsonl", qa_rows(3, start=3))
    write_jsonl(tmp_path / "data" / "dev.jsonl", qa_rows(2, start=50))
    recipe = write_recipe(tmp_path, tokenizer=False, dataset={"shuffle": False})
    out = formatted(recipe)
    assert prompts(out.train) == [f"Q: question {i}\nA: " for i in range(6)]
    assert prompts(out.heldout) == ["Q: question 50\nA: ", "Q: question 51\nA: "]
    recipe = write_recipe(
        tmp_path,
        tokenizer=False,
        dataset={
            "path": "data/train-*.jsonl",
            "heldout_split": None,
            "heldout_rows": 1,
            "shuffle": False,
        },
    )
    out = formatted(recipe)
    assert len(out.train) == 5 and prompts(out.heldout) == ["Q: question 5\nA: "]


@pytest.mark.parametrize(
    ("split", "rows"),
    [
        ("train[:25%]", [1, 2, 3, 4]),
        ("train[2:5]", [3, 4, 5]),
        ("train[-3:]", [14, 15, 16]),
        ("train[75%:]", [13, 14, 15, 16]),
    ],
)
def test_split_slicing_keeps_file_row_numbers(tmp_path: Path, split: str, rows: list[int]) -> None:
    recipe = write_recipe(tmp_path, tokenizer=False, dataset={"split": split, "shuffle": False})
    out = formatted(recipe)
    assert list(out.train[ROW]) == rows
    assert prompts(out.train) == [f"Q: question {r - 1}\nA: " for r in rows]


def test_bad_split_spec_is_a_recipe_error(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tokenizer=False, dataset={"split": "train[a:b]"})
    with pytest.raises(RecipeError) as e:
        formatted(recipe)
    assert str(e.value) == (
        f"{recipe.resolve()}: $.dataset.split: bad split 'train[a:b]'; "
        "write e.g. train, train[:1%] or train[100:200]"
    )


def test_shuffle_follows_the_recipe_seed(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tokenizer=False)
    first = list(formatted(recipe).train[ROW])
    assert list(formatted(recipe).train[ROW]) == first  # same seed, same order
    assert sorted(first) == list(range(1, 17)) and first != sorted(first)
    assert list(formatted(recipe, ("recipe.seed=2",)).train[ROW]) != first
    assert list(formatted(recipe, ("dataset.shuffle=false",)).train[ROW]) == list(range(1, 17))


def test_flatten_nested_columns(tmp_path: Path) -> None:
    rows = [
        {"meta": {"title": f"t{i}", "info": {"lang": "en"}}, "a": f"answer {i}"} for i in range(6)
    ]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "dev.jsonl", rows[:2])
    recipe = write_recipe(
        tmp_path,
        tokenizer=False,
        dataset={"flatten": True, "shuffle": False, "columns": {"title": "meta_title"}},
        template={"prompt": "{{ title }} ({{ meta_info_lang }})"},
    )
    assert prompts(formatted(recipe).train)[:2] == ["t0 (en)", "t1 (en)"]
    # without flatten the nested value is reachable as a mapping
    recipe = write_recipe(
        tmp_path,
        tokenizer=False,
        dataset={"flatten": False, "shuffle": False, "columns": {}},
        template={"prompt": "{{ meta.title }} ({{ meta.info.lang }})"},
    )
    assert prompts(formatted(recipe).train)[:2] == ["t0 (en)", "t1 (en)"]


def test_flatten_clash_is_named(tmp_path: Path) -> None:
    rows = [{"meta": {"title": "x"}, "meta_title": "y", "a": "z"}] * 3
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "dev.jsonl", rows)
    recipe = write_recipe(tmp_path, tokenizer=False, dataset={"flatten": True})
    with pytest.raises(RecipeError) as e:
        formatted(recipe)
    assert str(e.value) == (
        f"{recipe.resolve()}: $.dataset.flatten: flattened column "
        "'meta_title' clashes with an existing column; rename one of them "
        "in the data"
    )


def test_column_rename_and_missing_column(tmp_path: Path) -> None:
    rows = [{"question": f"question {i}", "answer": f"answer {i}"} for i in range(5)]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "dev.jsonl", rows[:1])
    recipe = write_recipe(
        tmp_path,
        tokenizer=False,
        dataset={"columns": {"q": "question", "a": "answer"}, "shuffle": False},
    )
    assert prompts(formatted(recipe).train)[0] == "Q: question 0\nA: "
    recipe = write_recipe(
        tmp_path, tokenizer=False, dataset={"columns": {"q": "prompt_text", "a": "answer"}}
    )
    with pytest.raises(RecipeError) as e:
        formatted(recipe)
    assert str(e.value) == (
        f"{recipe.resolve()}: $.dataset.columns: no column 'prompt_text'; "
        "the data has: question, answer"
    )


def test_heldout_rows_come_from_the_end_of_the_shuffled_train_split(tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path, tokenizer=False, dataset={"heldout_split": None, "heldout_rows": 4}
    )
    out = formatted(recipe)
    train, held = set(out.train[ROW]), set(out.heldout[ROW])
    assert len(train) == 12 and len(held) == 4
    assert not train & held and train | held == set(range(1, 17))
    recipe = write_recipe(
        tmp_path, tokenizer=False, dataset={"heldout_split": None, "heldout_rows": 16}
    )
    with pytest.raises(RecipeError) as e:
        formatted(recipe)
    assert str(e.value) == (
        f"{recipe.resolve()}: $.dataset.heldout_rows: 16 rows held out but "
        "the split 'train' has only 16; lower heldout_rows"
    )


def test_named_heldout_split_with_slice(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tokenizer=False, dataset={"heldout_split": "dev[:3]"})
    write_jsonl(tmp_path / "data" / "dev.jsonl", qa_rows(10, start=100))
    out = formatted(recipe)
    assert prompts(out.heldout) == [f"Q: question {i}\nA: " for i in (100, 101, 102)]
    assert len(out.train) == 16


def test_max_rows(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tokenizer=False, dataset={"max_rows": 5})
    assert len(formatted(recipe).train) == 5


def test_hub_dataset_with_config_and_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    calls: list[tuple[Any, ...]] = []

    def fake_load(
        path: str, name: str | None = None, *, revision: str | None = None, split: str
    ) -> Any:
        calls.append((path, name, revision, split))
        start = 0 if split == "train" else 100
        return datasets.Dataset.from_list(qa_rows(8, start=start))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    recipe = write_recipe(
        tmp_path,
        tokenizer=False,
        dataset={
            "path": "someone/qa",
            "name": "en",
            "revision": "abc123",
            "split": "train[:50%]",
            "heldout_split": "validation[:2]",
            "shuffle": False,
        },
    )
    out = formatted(recipe)
    assert calls == [
        ("someone/qa", "en", "abc123", "train"),
        ("someone/qa", "en", "abc123", "validation"),
    ]
    assert prompts(out.train) == [f"Q: question {i}\nA: " for i in range(4)]
    assert prompts(out.heldout) == ["Q: question 100\nA: ", "Q: question 101\nA: "]
    assert dataset_identity(load_recipe(recipe)) == {
        "hub": "someone/qa",
        "name": "en",
        "revision": "abc123",
    }


def test_mixed_file_types_are_refused(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tokenizer=False)
    write_file(tmp_path / "data" / "extra.csv", qa_rows(3))
    with pytest.raises(RecipeError) as e:
        formatted(recipe)
    assert str(e.value) == (
        f"{recipe.resolve()}: $.dataset.path: mixed file types (csv, json); "
        "use one format per dataset"
    )
