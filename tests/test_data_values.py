"""Data values are text (nulls, lists, dicts refused or dropped), text from the data never
becomes control tokens in any format or call order, template rendering is bounded, and
heldout_rows = 0 goes through format, tokenize and compare's row selection."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from datakit import IM_TEMPLATE, make_tokenizer, qa_rows, write_jsonl, write_recipe

from runner.cli import cli
from runner.context import Context
from runner.data.chat import Encoder
from runner.data.formatting import prepare
from runner.data.templates import Renderer, TemplateText
from runner.errors import RecipeError
from runner.recipe import load_recipe

pytest.importorskip("transformers")

TRICK = "stop here </s> then <s> and <unk> and <|user|> and <|im_end|>"


def text_ids(tok: Any, text: str) -> list[int]:
    """The text as plain text: no special-token string matched."""
    return list(tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def run(recipe: Path, until: str) -> Any:
    return CliRunner().invoke(cli, ["run", str(recipe), "--until", until])


# -- text is text ------------------------------------------------------------------------------


def test_plain_data_special_strings_stay_text_template_literal_stays_a_token() -> None:
    tok = make_tokenizer()
    enc = Encoder(tok, "plain", literal={"prompt": "<s>{{ q }}", "response": "{{ a }}"})
    prompts, responses = enc.encode(["<s>question 1"], [TRICK])
    assert responses == [[*text_ids(tok, TRICK), tok.eos_token_id]]
    bos = tok.bos_token_id
    assert prompts == [[bos, bos, *text_ids(tok, "question 1")]]  # the template's <s>: a token
    assert Encoder(tok, "plain").prompt_ids([TRICK]) == [[bos, *text_ids(tok, TRICK)]]


def test_plain_ids_of_ordinary_text_are_unchanged() -> None:
    tok = make_tokenizer()
    enc = Encoder(tok, "plain", literal={"prompt": "Q: {{ q }}", "response": "{{ a }}"})
    prompts, responses = enc.encode(["Q: question 1"], ["answer 1"])
    assert prompts == [list(tok("Q: question 1")["input_ids"])]
    assert responses == [[*tok("answer 1", add_special_tokens=False)["input_ids"], 2]]


def test_chat_template_message_contents_stay_text() -> None:
    tok = make_tokenizer(chat_template=IM_TEMPLATE)
    enc = Encoder(tok, "chat_template")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    (prompt,), (response,) = enc.encode([TRICK], [TRICK])
    assert prompt.count(end) == 1 and response.count(end) == 1  # the template's, not the data's
    assert response == [*text_ids(tok, TRICK), end, *text_ids(tok, "\n"), tok.eos_token_id]
    assert enc.prompt_ids([TRICK]) == [prompt]


def test_chatglm3_contents_stay_text() -> None:
    tok = make_tokenizer(chatglm3=True)
    enc = Encoder(tok, "chatglm3")
    (prompt,), (response,) = enc.encode([TRICK], [TRICK])
    user = tok.convert_tokens_to_ids("<|user|>")
    assert prompt.count(user) == 1
    assert response[-1] == tok.eos_token_id and response.count(tok.eos_token_id) == 1


@pytest.mark.parametrize("fmt", ["plain", "chatglm3"])
def test_ids_do_not_depend_on_what_the_tokenizer_encoded_before(fmt: str) -> None:
    """chatglm3 encodes with split_special_tokens, which transformers leaves set in the fast
    backend; plain read that flag and turned into text what it encodes as tokens otherwise."""
    tok = make_tokenizer(chatglm3=True)
    plain = Encoder(tok, "plain", literal={"prompt": "{{ q }}</s>", "response": "{{ a }}"})
    chatglm3 = Encoder(tok, "chatglm3")
    rows = (["question 1</s>", TRICK], ["answer </s>", TRICK])
    first = (plain if fmt == "plain" else chatglm3).encode(*rows)
    (chatglm3 if fmt == "plain" else plain).encode(*rows)
    again = (plain if fmt == "plain" else chatglm3).encode(*rows)
    fresh_tok = make_tokenizer(chatglm3=True)
    fresh = Encoder(
        fresh_tok, fmt, literal={"prompt": "{{ q }}</s>", "response": "{{ a }}"}
    ).encode(*rows)
    assert first == again == fresh
    if fmt == "plain":  # the template's own </s> is a token, the data's is text
        assert first[0][0][-1] == tok.eos_token_id
        assert tok.backend_tokenizer.encode_special_tokens is False


def test_inspect_names_rows_with_special_strings(tmp_path: Path) -> None:
    rows = qa_rows(16)
    rows[4]["a"] = TRICK
    recipe = write_recipe(tmp_path, dataset={"shuffle": False})
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    result = CliRunner().invoke(cli, ["inspect", str(recipe), "--plain", "-n", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == (
        "  warning: train: 1 of 16 rows hold special-token strings of the tokenizer in their "
        "data (e.g. row 5): they are encoded as plain text, not as control tokens; clean the "
        "data if that markup is not meant"
    )


# -- values ------------------------------------------------------------------------------------


def render(template: str, row: dict[str, Any]) -> str:
    part = Renderer({"prompt": TemplateText("template.prompt", template)})
    return part.render_part("prompt", row, 3, "train row", "data.jsonl")


def test_numbers_print_as_numbers_and_lists_can_be_looped() -> None:
    assert render("{{ n }} {{ x }}", {"n": 12, "x": 2.5}) == "12 2.5"
    assert render("{{ tags | join(', ') }}", {"tags": ["a", "b"]}) == "a, b"
    assert render("{{ z or 'none given' }}", {"z": None}) == "none given"


@pytest.mark.parametrize(
    ("value", "said"),
    [
        (None, "column 'v' is null, not text; write text (or a number) there"),
        (True, "column 'v' is a boolean (true), not text; write text there (quote it)"),
        (
            [0, 1, 2],
            "column 'v' is a list ([0, 1, 2]), not text; join it in the template "
            '({{ v | join(", ") }})',
        ),
        (
            {"k": 1},
            "column 'v' is a dict ({\"k\": 1}), not text; print its fields in the "
            "template ({{ v.name }})",
        ),
    ],
)
def test_non_text_values_are_refused(value: Any, said: str) -> None:
    with pytest.raises(RecipeError) as e:
        render("{{ v }}", {"v": value})
    assert str(e.value) == (
        f'data.jsonl: train row 3: {said}, or set dataset.bad_rows = "drop" to skip such rows'
    )


def test_bad_rows_drop_counts_them(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = qa_rows(16)
    rows[2]["a"], rows[9]["a"] = None, [1, 2]
    recipe = write_recipe(tmp_path, dataset={"bad_rows": "drop", "shuffle": False})
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    result = run(recipe, "format")
    assert result.exit_code == 0, result.output
    assert (
        "format: warning: train: 2 rows print a null, boolean, list or dict value "
        '(e.g. rows 3, 10): they were dropped (dataset.bad_rows = "drop")'
    ) in result.output
    metrics = json.loads((tmp_path / "run" / "state" / "format.json").read_text())["metrics"]
    assert metrics["train_rows"] == 14 and metrics["dropped_bad"] == 2
    assert metrics["train_bad"] == {"dropped": 2, "rows": [3, 10]}


def test_csv_cells_are_text_as_written(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    lines = ["q,a", *(f"00{i},NA" for i in range(7)), "007,"]
    (tmp_path / "data" / "train.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    recipe = write_recipe(
        tmp_path,
        tokenizer=False,
        dataset={
            "path": "data/train.csv",
            "heldout_split": None,
            "heldout_rows": 1,
            "shuffle": False,
        },
    )
    out = prepare(load_recipe(recipe))
    assert out.train[0] == {"prompt": "Q: 000\nA: ", "response": "NA", "__source_row__": 1}
    assert out.metrics["dropped_empty"] == 1  # the empty cell is empty text, not "None"


# -- bounds ------------------------------------------------------------------------------------


def test_nested_huge_loops_stop_at_the_bound() -> None:
    start = time.monotonic()
    with pytest.raises(RecipeError) as e:
        render("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", {})
    assert time.monotonic() - start < 5
    assert str(e.value) == (
        "template.prompt: train row 3: the template built more than 100,000 loop iterations; "
        "bound its loops and output (loop over the row's values, not over huge ranges)"
    )


def test_a_loop_within_the_bound_renders() -> None:
    assert len(render("{% for i in range(50000) %}x{% endfor %}", {})) == 50000


# -- heldout_rows = 0 --------------------------------------------------------------------------


def test_heldout_rows_zero_through_format_tokenize_and_compare_prompts(tmp_path: Path) -> None:
    from runner.stages import compare

    recipe = write_recipe(
        tmp_path,
        dataset={"heldout_split": None, "heldout_rows": 0},
        compare={"num_examples": 0, "prompts": [{"q": "extra question"}]},
    )
    result = run(recipe, "tokenize")
    assert result.exit_code == 0, result.output
    assert "format: 16 training rows, 0 held out" in result.output
    logged: list[str] = []
    ctx = Context(load_recipe(recipe), tmp_path / "run", logged.append)
    assert compare.prompts(ctx) == [
        {"index": 0, "prompt": "Q: extra question\nA: ", "reference": None}
    ]
    assert logged == [
        "compare: no held-out rows (dataset.heldout_rows = 0): no references to score; "
        "generating for the 1 compare.prompts only"
    ]
