"""[[dataset.sources]]: several data sets mixed by weight or row count (no training: format,
tokenize with a tiny trained tokenizer, plan, lock and export are all exercised in memory)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from click.testing import CliRunner
from datakit import IM_TEMPLATE, make_tokenizer, write_jsonl, write_recipe

from runner import lockfile
from runner.cli import cli
from runner.data.chat import Encoder
from runner.data.conversations import MESSAGES
from runner.data.formatting import ROW, SOURCE, prepare
from runner.data.mixing import mix_counts, pick
from runner.data.sources import dataset_identity
from runner.data.templates import template_identity
from runner.data.tokenization import encode_batch, encode_conversations, encode_rows
from runner.errors import RecipeError
from runner.lockfile import check_lock, current_lock, write_lock
from runner.models.resolve import training_texts_identity
from runner.plan import STAGES, compute_plan, format_inputs, stage_params
from runner.portable import portable_recipe
from runner.recipe import load_recipe
from runner.report.data_metrics import format_lines, mix_plan_lines
from runner.report.table import markdown

ALPACA = [{"instruction": f"do {i}", "input": "", "output": f"done {i}"} for i in range(40)]
CHAT = [
    {
        "messages": [
            {"role": "user", "content": f"hi {i}"},
            {"role": "assistant", "content": f"hello {i}"},
        ]
    }
    for i in range(30)
]
QA = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(20)]


def mix_recipe(
    folder: Path,
    sources: list[dict[str, Any]],
    dataset: dict[str, Any] | None = None,
    template: dict[str, Any] | None = None,
    seed: int = 1,
) -> Path:
    """A recipe in `folder` over data/alpaca.jsonl, data/chat.jsonl and data/qa.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "tok").is_dir():
        make_tokenizer(folder / "tok", chat_template=IM_TEMPLATE)
    for name, rows in (("alpaca", ALPACA), ("chat", CHAT), ("qa", QA)):
        if not (folder / "data" / f"{name}.jsonl").exists():
            write_jsonl(folder / "data" / f"{name}.jsonl", rows)
    recipe = {
        "recipe": {"name": "mix-test", "seed": seed, "output_dir": str(folder / "run")},
        "model": {"name_or_path": "tok"},
        "dataset": {"heldout_rows": 2, **(dataset or {}), "sources": sources},
        "template": {"format": "chat_template", **(template or {})},
        "tokenize": {"max_length": 64},
    }
    path = folder / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe), encoding="utf-8")
    return path


THREE = [
    {"path": "data/alpaca.jsonl", "format": "alpaca", "weight": 2},
    {"path": "data/chat.jsonl", "format": "messages", "weight": 1},
    {"path": "data/qa.jsonl", "prompt": "Q: {{ q }}\nA: ", "response": "{{ a }}", "weight": 1},
]


# -- the counts -------------------------------------------------------------------------------


def test_weights_split_the_mix_exactly_and_never_take_a_row_twice() -> None:
    assert mix_counts([10_000] * 3, [5, 3, 2], [None] * 3, 10_000) == [5000, 3000, 2000]
    # no max_rows: the source that runs out first sets the size (18 rows at 25%: 72 rows)
    assert mix_counts([38, 28, 18], [2, 1, 1], [None] * 3) == [36, 18, 18]
    # shares that do not divide: largest remainder, the counts add up to the mix
    counts = mix_counts([100, 100, 100], [1, 1, 1], [None] * 3, 100)
    assert sum(counts) == 100 and sorted(counts) == [33, 33, 34]
    assert mix_counts([30, 100], [0.1, 0.9], [None, None]) == [11, 100]


def test_rows_take_exactly_that_many_and_repeat_a_short_source() -> None:
    assert mix_counts([40, 30], [None, None], [5, None]) == [5, 30]  # no rows: all of them
    assert mix_counts([4, 30], [None, None], [10, 3]) == [10, 3]
    assert pick(10, 4) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert pick(3, 4) == [0, 1, 2]


def test_a_10000_row_mix_lands_within_2_points_of_its_weights(tmp_path: Path) -> None:
    for name, n in (("a", 5000), ("b", 3000), ("c", 2500)):
        write_jsonl(
            tmp_path / "data" / f"{name}.jsonl", [{"q": f"{name}{i}", "a": "x"} for i in range(n)]
        )
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    sources = [{"path": f"data/{k}.jsonl", "weight": w} for k, w in weights.items()]
    recipe = load_recipe(
        mix_recipe(
            tmp_path,
            sources,
            {"max_rows": 10_000, "heldout_rows": 0},
            {"prompt": "{{ q }}", "response": "{{ a }}", "format": "plain"},
        )
    )
    out = prepare(recipe)
    assert len(out.train) == 10_000
    got = Counter(out.train[SOURCE])
    for i, w in enumerate(weights.values()):
        assert abs(got[i] / 10_000 - w) <= 0.02
        head = Counter(out.train[SOURCE][:1000])  # shuffled: any stretch holds the mix
        assert abs(head[i] / 1000 - w) <= 0.05
    assert [s["train_rows"] for s in out.metrics["sources"]] == [5000, 3000, 2000]


# -- format ----------------------------------------------------------------------------------


def test_one_alpaca_one_messages_and_one_template_source_mixed(tmp_path: Path) -> None:
    out = prepare(load_recipe(mix_recipe(tmp_path, THREE)))
    # 40, 30, 20 rows less 2 held out each: the qa source (18) runs out first at 18 / 0.25
    assert out.metrics["train_rows"] == 72 and out.metrics["heldout_rows"] == 6
    by = {s["source"]: s["train_rows"] for s in out.metrics["sources"]}
    assert by == {"data/alpaca.jsonl": 36, "data/chat.jsonl": 18, "data/qa.jsonl": 18}
    rows = out.train.to_list()
    for row in rows:
        if row[SOURCE] == 0:
            n = row[ROW] - 1
            assert json.loads(row[MESSAGES])[-1]["content"] == f"done {n}"
            assert row["prompt"] == f"user: do {n}"
        elif row[SOURCE] == 1:
            assert json.loads(row[MESSAGES])[0]["content"] == f"hi {row[ROW] - 1}"
        else:  # a template source: its own prompt template, no conversation
            assert row[MESSAGES] == ""
            assert row["prompt"] == f"Q: question {row[ROW] - 1}\nA: "
    assert len({(r[SOURCE], r[ROW]) for r in rows}) == len(rows)  # no row taken twice
    assert set(out.heldout[SOURCE]) == {0, 1, 2}
    assert format_lines(out.metrics)[1] == (
        "source 0 data/alpaca.jsonl: 36 train (50.0%) of 38, 2 held out"
    )


def test_mixed_rows_tokenize_each_as_its_source_trained_it(tmp_path: Path) -> None:
    out = prepare(load_recipe(mix_recipe(tmp_path, THREE)))
    enc = Encoder(make_tokenizer(chat_template=IM_TEMPLATE), "chat_template")
    cfg = {"max_length": 64, "truncation": "cut_prompt", "train_on_prompt": False}
    batch = out.train.select(range(12)).to_dict()
    got = encode_rows(enc, cfg, batch)
    for i in range(12):
        if batch[MESSAGES][i]:
            one = encode_conversations(enc, cfg, [batch[MESSAGES][i]], [batch[ROW][i]])
        else:
            one = encode_batch(enc, cfg, [batch["prompt"][i]], [batch["response"][i]])
        assert got["input_ids"][i] == one["input_ids"][0]
        assert got["labels"][i] == one["labels"][0]


def test_sampling_is_deterministic_from_the_seed(tmp_path: Path) -> None:
    first = prepare(load_recipe(mix_recipe(tmp_path, THREE)))
    again = prepare(load_recipe(mix_recipe(tmp_path, THREE)))
    other = prepare(load_recipe(mix_recipe(tmp_path, THREE, seed=2)))
    key = [SOURCE, ROW]
    assert first.train.select_columns(key).to_list() == again.train.select_columns(key).to_list()
    assert first.train.select_columns(key).to_list() != other.train.select_columns(key).to_list()


def test_rows_upsample_a_short_source_and_no_weight_takes_everything(tmp_path: Path) -> None:
    sources = [
        {"path": "data/qa.jsonl", "prompt": "{{ q }}", "response": "{{ a }}", "rows": 50},
        {"path": "data/chat.jsonl", "format": "messages", "heldout_rows": 0},
    ]
    out = prepare(load_recipe(mix_recipe(tmp_path, sources)))
    qa, chat = out.metrics["sources"]
    assert (qa["train_rows"], qa["available"], qa["repeated"], qa["heldout_rows"]) == (
        50,
        18,
        32,
        2,
    )
    assert (chat["train_rows"], chat["heldout_rows"]) == (30, 0)  # its own heldout_rows
    assert Counter(out.train[SOURCE]) == {0: 50, 1: 30}
    assert "32 repeated" in format_lines(out.metrics)[1]
    capped = prepare(load_recipe(mix_recipe(tmp_path, sources, {"max_rows": 20})))
    assert len(capped.train) == 20
    assert sum(s["train_rows"] for s in capped.metrics["sources"]) == 20


def test_a_source_can_hold_out_its_own_split(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "splits" / "train.jsonl", QA[:10])
    write_jsonl(tmp_path / "splits" / "dev.jsonl", QA[10:13])
    sources = [
        {"path": "splits", "heldout_split": "dev", "prompt": "{{ q }}", "response": "{{ a }}"},
        {"path": "data/chat.jsonl", "format": "messages"},
    ]
    out = prepare(load_recipe(mix_recipe(tmp_path, sources)))
    assert [(s["train_rows"], s["heldout_rows"]) for s in out.metrics["sources"]] == [
        (10, 3),
        (28, 2),
    ]


def test_a_sources_data_errors_name_its_key(tmp_path: Path) -> None:
    sources = [
        {"path": "data/qa.jsonl", "prompt": "{{ q }}", "response": "{{ a }}"},
        {"path": "data/chat.jsonl", "format": "messages", "columns": {"conv": "dialog"}},
    ]
    with pytest.raises(RecipeError) as e:
        prepare(load_recipe(mix_recipe(tmp_path, sources)))
    assert str(e.value) == (
        f"{tmp_path / 'recipe.toml'}: $.dataset.sources[1].columns: no column 'dialog'; "
        "the data has: messages"
    )


def test_an_inherited_key_and_a_sources_template_are_named_in_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as e:
        prepare(load_recipe(mix_recipe(tmp_path, [THREE[0], THREE[2]], {"heldout_rows": 25})))
    assert str(e.value) == (
        f"{tmp_path / 'recipe.toml'}: $.dataset.heldout_rows (as dataset.sources[1] inherits "
        "it): 25 rows held out but the split 'train' has only 20; lower heldout_rows"
    )
    with pytest.raises(RecipeError) as e:
        prepare(load_recipe(mix_recipe(tmp_path, [THREE[0], {**THREE[2], "prompt": "{{ x }}"}])))
    assert str(e.value).startswith("dataset.sources[1].prompt: train row ")
    assert str(e.value).endswith(
        ": 'x' is undefined; the row has columns: a, q (rename with [dataset.columns])"
    )


# -- recipe errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (
            {"weight": -1},
            "$.dataset.sources[0].weight: -1 is not a share of the mix; give a number above 0 "
            "(weights are relative: 3 and 1 make 75% and 25%), or remove the source",
        ),
        (
            {"weight": 0},
            "$.dataset.sources[0].weight: 0 is not a share of the mix; give a number above 0 "
            "(weights are relative: 3 and 1 make 75% and 25%), or remove the source",
        ),
        ({"rows": 5}, "$.dataset.sources[0].rows: weight and rows both given; set one of them"),
        ({"rows": 0}, "$.dataset.sources[0].rows: 0 is less than the minimum of 1"),
        ({"path": None}, "$.dataset.sources[0]: 'path' is a required property"),
        (
            {"prompt": "{{ instruction }}"},
            '$.dataset.sources[0].prompt: not used with format = "alpaca" (conversations are '
            "rendered by template.format); remove it",
        ),
        (
            {"wieght": 1},
            "$.dataset.sources[0].wieght: unknown key 'wieght'; did you mean 'weight'?",
        ),
    ],
)
def test_source_errors_are_one_line_naming_the_key(
    tmp_path: Path, change: dict[str, Any], said: str
) -> None:
    first = {**THREE[0], **change}
    first = {k: v for k, v in first.items() if v is not None}
    with pytest.raises(RecipeError) as e:
        load_recipe(mix_recipe(tmp_path, [first, *THREE[1:]]))
    assert str(e.value).split(": ", 1)[1] == said


def test_mix_level_errors(tmp_path: Path) -> None:
    unweighted = [*THREE[:2], {k: v for k, v in THREE[2].items() if k != "weight"}]
    with pytest.raises(RecipeError) as e:
        load_recipe(mix_recipe(tmp_path, unweighted))
    assert str(e.value).split(": ", 1)[1] == (
        "$.dataset.sources[2]: no weight, but dataset.sources[0] has one; give every source a "
        "weight, or none (then each takes its rows, or all its rows)"
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(mix_recipe(tmp_path, THREE, {"path": "data/qa.jsonl"}))
    assert str(e.value).split(": ", 1)[1] == (
        "$.dataset.path: set together with [[dataset.sources]]; give each source its own path "
        "and remove dataset.path (or remove the sources)"
    )
    no_template = [{"path": "data/qa.jsonl"}]
    with pytest.raises(RecipeError) as e:
        load_recipe(mix_recipe(tmp_path, no_template))
    assert "$.dataset.sources[0].prompt: a template source without prompt or prompt_file, " in (
        str(e.value)
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(mix_recipe(tmp_path, THREE, template={"prompt": "{{ q }}"}))
    assert str(e.value).split(": ", 1)[1] == (
        "$.template.prompt: used by no source (each sets its own, or is a conversation); remove it"
    )


def test_source_paths_are_confined(tmp_path: Path) -> None:
    outside = write_jsonl(tmp_path / "outside.jsonl", QA)
    sources = [
        THREE[0],
        {"path": str(outside), "prompt": "{{ q }}", "response": "{{ a }}", "weight": 1},
        {**THREE[2], "prompt_file": "../x.j2", "prompt": None},
    ]
    sources[2] = {k: v for k, v in sources[2].items() if v is not None}
    with pytest.raises(RecipeError) as e:
        load_recipe(mix_recipe(tmp_path / "project", sources))
    lines = str(e.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        "$.dataset.sources[1].path",
        "$.dataset.sources[2].prompt_file",
    ]
    assert all("outside the recipe root" in line for line in lines)


def test_validate_reports_a_sources_missing_files(tmp_path: Path) -> None:
    sources = [
        {**THREE[0], "path": "data/gone.jsonl"},
        {**THREE[1], "path": "someone/chat-set"},  # a hub id: not checked offline
        {"path": "data/qa*.csv", "prompt_file": "p.j2", "response": "{{ a }}", "weight": 1},
    ]
    path = mix_recipe(tmp_path, sources)
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2
    assert [line.split(": ", 2)[1:] for line in result.stderr.splitlines()] == [
        [
            "$.dataset.sources[0].path",
            f"'data/gone.jsonl' not found (looked for {tmp_path / 'data/gone.jsonl'}); the path "
            "is relative to the file that sets it",
        ],
        ["$.dataset.sources[2].path", "'data/qa*.csv' matches no file; check the pattern"],
        [
            "$.dataset.sources[2].prompt_file",
            f"'p.j2' not found (looked for {tmp_path / 'p.j2'}); the path is relative to the "
            "file that sets it",
        ],
    ]


def test_a_parents_sources_are_rebased(tmp_path: Path) -> None:
    mix_recipe(tmp_path / "base", THREE)
    child = tmp_path / "child" / "recipe.toml"
    child.parent.mkdir()
    child.write_text('extends = "../base/recipe.toml"\n', encoding="utf-8")
    recipe = load_recipe(child, (), [tmp_path])
    paths = [s["path"] for s in recipe.section("dataset")["sources"]]
    assert paths == [
        "../base/data/alpaca.jsonl",
        "../base/data/chat.jsonl",
        "../base/data/qa.jsonl",
    ]
    assert len(prepare(recipe).train) == 72


# -- fingerprints, lock, export, compare ------------------------------------------------------


def test_recipes_without_sources_keep_their_fingerprints(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path))
    assert not [k for s in STAGES for k in stage_params(recipe, s) if "sources" in k]
    # today's format inputs, unchanged
    assert format_inputs(recipe) == {
        "dataset": dataset_identity(recipe),
        "templates": template_identity(recipe),
    }
    assert "sources" not in current_lock(recipe, resolve_hub=False)["dataset"]


def test_each_source_is_in_the_fingerprint_and_named_when_stale(tmp_path: Path) -> None:
    path = mix_recipe(tmp_path, THREE)
    recipe = load_recipe(path)
    params = stage_params(recipe, STAGES[0])
    assert params["dataset.sources[1].weight"] == 1
    inputs = format_inputs(recipe)["dataset"]
    assert list(inputs) == ["sources[0]", "sources[1]", "sources[2]"]
    before = compute_plan(recipe)[0].fingerprint
    reweighted = [THREE[0], {**THREE[1], "weight": 3}, THREE[2]]
    after = load_recipe(mix_recipe(tmp_path, reweighted))
    assert compute_plan(after)[0].fingerprint != before
    assert stage_params(after, STAGES[0])["dataset.sources[1].weight"] == 3


def test_lock_pins_each_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lockfile, "hub_commit", lambda kind, repo, rev: "c" * 40)
    sources = [*THREE[:2], {"path": "someone/qa-set", "revision": "v1", "weight": 1}]
    sources[2].update(prompt="{{ q }}", response="{{ a }}")
    path = mix_recipe(tmp_path, sources)
    recipe = load_recipe(path)
    write_lock(recipe, path)
    lock = lockfile.read_lock(path)
    entries = lock["dataset"]["sources"]
    assert entries[0]["path"] == "data/alpaca.jsonl" and entries[0]["kind"] == "local"
    assert list(entries[1]["files"]) == ["data/chat.jsonl"]
    assert entries[2] == {
        "path": "someone/qa-set",
        "kind": "hub",
        "revision": "v1",
        "commit": "c" * 40,
    }
    # --locked runs the hub source at its locked commit, the others' settings untouched
    assert check_lock(recipe, path) == ([], [f"dataset.sources[2].revision={'c' * 40}"])
    pinned = lockfile.apply_lock(recipe, path)
    assert pinned.section("dataset")["sources"][2]["revision"] == "c" * 40
    assert pinned.section("dataset")["sources"][1] == recipe.section("dataset")["sources"][1]
    write_jsonl(tmp_path / "data" / "chat.jsonl", CHAT[:5])
    drifts, _ = check_lock(load_recipe(path), path)
    assert len(drifts) == 1
    assert drifts[0].startswith(
        f'{lockfile.lock_path(path)}: dataset.sources[1].files["data/chat.jsonl"]: locked '
    )


def test_an_export_copies_every_sources_files(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir(parents=True)
    (tmp_path / "p" / "qa_prompt.j2").write_text("Q: {{ q }}\n", encoding="utf-8")
    sources = [
        THREE[0],
        {"path": "data/qa.jsonl", "prompt_file": "qa_prompt.j2", "response": "{{ a }}"},
    ]
    sources[0] = {k: v for k, v in sources[0].items() if k != "weight"}
    recipe = load_recipe(mix_recipe(tmp_path / "p", sources))
    portable = portable_recipe(recipe, tmp_path / "out")
    written = portable.data["dataset"]["sources"]
    assert [s["path"] for s in written] == ["./inputs/data/alpaca.jsonl", "./inputs/data/qa.jsonl"]
    assert written[1]["prompt_file"] == "./inputs/qa_prompt.j2"
    # a source's own template file is in the lock, the mix's data in the tiny model's key
    assert list(current_lock(recipe, resolve_hub=False)["templates"]) == ["qa_prompt.j2"]
    assert list(training_texts_identity(recipe)["dataset"]) == ["sources[0]", "sources[1]"]
    assert sorted(portable.copies.values()) == [
        "inputs/data/alpaca.jsonl",
        "inputs/data/qa.jsonl",
        "inputs/qa_prompt.j2",
    ]


def test_set_reaches_a_source_by_its_index(tmp_path: Path) -> None:
    path = mix_recipe(tmp_path, THREE)
    recipe = load_recipe(path, ["dataset.sources[1].weight=3"])
    assert stage_params(recipe, STAGES[0])["dataset.sources[1].weight"] == 3
    with pytest.raises(RecipeError) as e:
        load_recipe(path, ["dataset.sources[3].weight=3"])
    assert str(e.value) == (
        "--set dataset.sources[3].weight: dataset.sources has 3 tables, [0] to [2]; add the "
        "table in the recipe file"
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(path, unsets=["dataset.sources[0].weight"])
    assert str(e.value) == (
        "--unset dataset.sources[0].weight: a key inside one of dataset.sources's tables cannot "
        "be unset; --set it (--set dataset.sources[0].weight=...) or unset all of dataset.sources"
    )


def test_plan_shows_what_each_source_asks_for_then_what_it_gave(tmp_path: Path) -> None:
    sources = [THREE[0], {**THREE[1], "weight": 1.5}, THREE[2]]
    result = CliRunner().invoke(cli, ["plan", str(mix_recipe(tmp_path, sources))])
    assert result.exit_code == 0
    assert result.stdout.splitlines()[2:5] == [
        "      source 0 data/alpaca.jsonl: weight 2 (44.4% of the mix)",
        "      source 1 data/chat.jsonl: weight 1.5 (33.3% of the mix)",
        "      source 2 data/qa.jsonl: weight 1 (22.2% of the mix)",
    ]
    ran = {
        "train_rows": 10,
        "sources": [
            {"source": "a", "train_rows": 10, "available": 20, "heldout_rows": 2, "repeated": 0}
        ],
    }
    assert mix_plan_lines([{"path": "a", "rows": 10}], ran) == [
        "source 0 a: 10 train (100.0%) of 20, 2 held out"
    ]
    assert mix_plan_lines([{"path": "a", "rows": 10}, {"path": "b"}], None) == [
        "source 0 a: 10 rows",
        "source 1 b: all its rows",
    ]


def test_compare_prompts_of_a_mix(tmp_path: Path) -> None:
    from runner.context import Context
    from runner.stages import compare
    from runner.stages import format as format_stage

    path = mix_recipe(tmp_path, THREE)
    text = path.read_text(encoding="utf-8")
    path.write_text(text + '\n[compare]\nnum_examples = 6\nprompts = [{q = "extra"}]\n')
    ctx = Context(load_recipe(path), tmp_path / "run", lambda line: None)
    format_stage.run(ctx)
    rows = compare.prompts(ctx)
    labels = {"data/alpaca.jsonl", "data/chat.jsonl", "data/qa.jsonl"}
    assert {r["source"] for r in rows[:6]} == labels
    for r in rows[:6]:  # conversations as their turns, a template source's row as its text
        assert ("messages" in r) == (r["source"] != "data/qa.jsonl")
        if r["source"] == "data/qa.jsonl":
            assert r["prompt"].startswith("Q: question ")
    assert rows[6] == {
        "index": 6,
        "prompt": "extra",
        "reference": None,
        "messages": [{"role": "user", "content": "extra"}],
    }


def test_compare_table_names_each_rows_source() -> None:
    rows = [
        {
            "index": 0,
            "source": "data/qa.jsonl",
            "prompt": "p",
            "reference": "r",
            "before": "b",
            "after": "a",
        },
    ]
    table = markdown(rows, {})
    assert "| # | source | prompt | reference | before | after |" in table
    assert "| 0 | data/qa.jsonl | p | r | b | a |" in table
