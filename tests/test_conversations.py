"""Conversation formats (dataset.format = messages / sharegpt / alpaca): ids and labels equal what
the tokenizer's own chat template gives for each prefix, the other formats convert to the same
messages, ChatGLM3 keeps today's ids, bad rows get one-line errors. Tokenizer-only, no model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import tomllib
from click.testing import CliRunner
from datakit import IM_TEMPLATE, make_tokenizer, write_jsonl, write_recipe

from runner.cli import cli
from runner.data.chat import Encoder
from runner.data.conversations import ConversationError, Conversations
from runner.data.formatting import prepare
from runner.data.lint import format_warnings, tokenize_warnings
from runner.data.tokenization import encode_conversations
from runner.errors import RecipeError
from runner.plan import STAGES, stage_params
from runner.recipe import load_recipe

# Chat templates written for these tests: ChatML-like, a `### role:` one that ends a reply with
# the eos token, and one that folds the system prompt into the first user turn.
HASH_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)
FOLDED_TEMPLATE = (
    "{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{% for m in messages if m['role'] != 'system' %}"
    "{% if m['role'] == 'user' %}<|im_start|>Q: {% if loop.first and sys %}({{ sys }}) "
    "{% endif %}{{ m['content'] }}<|im_end|>"
    "{% else %}A:\n{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A:\n{% endif %}"
)
NO_HEADER_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
TEMPLATES = {"im": IM_TEMPLATE, "hash": HASH_TEMPLATE, "folded": FOLDED_TEMPLATE}
TEXTS = ["hello world", "question 3", "the quick brown fox", "answer 12", "Q: A: 7", "world"]


def conversation(turns: int, system: bool, train: str = "all") -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": "answer briefly", "train": False})
    for i in range(turns):
        out.append({"role": "user", "content": TEXTS[i % 6], "train": False})
        reply = TEXTS[(i + 3) % 6]
        trained = train == "all" or (train == "alternate" and i % 2 == 0) or i == turns - 1
        out.append({"role": "assistant", "content": reply, "train": trained})
    return out


def template_ids(tok: Any, messages: list[dict[str, Any]], generation: bool) -> list[int]:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    ids = tok.apply_chat_template(plain, tokenize=True, add_generation_prompt=generation)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("turns", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("train", ["all", "alternate"])
def test_messages_ids_and_labels_follow_the_chat_template_prefix_by_prefix(
    name: str, system: bool, turns: int, train: str
) -> None:
    tok = make_tokenizer(chat_template=TEMPLATES[name])
    messages = conversation(turns, system, train)
    ids, trained = Encoder(tok, "chat_template").conversation(messages)
    done = 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = template_ids(tok, messages[:k], generation=True)
        full = template_ids(tok, messages[: k + 1], generation=False)
        assert ids[: len(full)] == full  # the ids are the template's, prefix by prefix
        assert not any(trained[done : len(head)])  # system, user turns and the header: masked
        assert all(t == m["train"] for t in trained[len(head) : len(full)])  # the turn
        done = len(full)
    assert ids[done:] in ([], [tok.eos_token_id])  # an eos only when the turn lacks it
    assert trained[done:] == [messages[-1]["train"]] * len(ids[done:])


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_generation_prompt_of_a_conversation_is_the_templates(name: str) -> None:
    tok = make_tokenizer(chat_template=TEMPLATES[name])
    history = conversation(3, True)[:-1]
    got = Encoder(tok, "chat_template").conversation_prompt_ids(history)
    assert got == template_ids(tok, history, generation=True)


@pytest.mark.parametrize("fmt", ["chat_template", "chatglm3", "plain"])
def test_one_turn_gives_todays_ids_of_the_prompt_response_formats(fmt: str) -> None:
    tok = make_tokenizer(chatglm3=fmt == "chatglm3", chat_template=IM_TEMPLATE)
    enc = Encoder(tok, fmt)
    for prompt, response in [("hello world", "answer 3"), ("Q: 7", "the quick brown fox")]:
        p, r = enc.encode([prompt], [response])
        ids, trained = enc.conversation(
            [
                {"role": "user", "content": prompt, "train": False},
                {"role": "assistant", "content": response, "train": True},
            ]
        )
        if fmt == "plain":  # role lines: `user: {prompt}\nassistant: ` masked
            head = enc.ids([f"user: {prompt}\nassistant: "], add_special_tokens=True)[0]
            assert (ids, trained) == (head + r[0], [False] * len(head) + [True] * len(r[0]))
        else:
            assert ids == p[0] + r[0]
            assert trained == [False] * len(p[0]) + [True] * len(r[0])


def test_chatglm3_trains_each_turn_with_the_role_token_that_ends_it() -> None:
    tok = make_tokenizer(chatglm3=True)
    messages = conversation(2, True)
    ids, trained = Encoder(tok, "chatglm3").conversation(messages)
    pieces, run = [], ""
    for i, t in zip(ids, trained, strict=True):
        if t:
            run += tok.decode([i])
        elif run:
            pieces.append(run)
            run = ""
    pieces.append(run)
    assert pieces == ["\nanswer 12<|user|>", "\nQ: A: 7</s>"]


@pytest.mark.parametrize("fmt", ["messages", "sharegpt"])
def test_sharegpt_and_alpaca_convert_to_their_messages_form(fmt: str) -> None:
    fields = {
        "messages": {"column": "messages", "role": "role", "content": "content", "train": "train"},
        "sharegpt": {
            "column": "conversations",
            "role": "from",
            "content": "value",
            "train": "train",
            "user": "human",
            "assistant": "gpt",
            "system": "system",
        },
    }
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    messages = conversation(3, True, "alternate")
    if fmt == "messages":
        row = {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    else:
        row = {
            "conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]
        }
    for turns in ("last", "all"):
        got = Conversations(fmt, fields[fmt], turns).messages(row)
        want = [m | {"train": m["role"] == "assistant"} for m in messages]
        if turns == "last":
            want = [m | {"train": i == len(messages) - 1} for i, m in enumerate(messages)]
        assert got == want
    flagged = dict(row)
    key = "messages" if fmt == "messages" else "conversations"
    flagged[key] = [
        dict(m, train=bool(w["train"])) for m, w in zip(row[key], messages, strict=True)
    ]
    assert Conversations(fmt, fields[fmt], "flagged").messages(flagged) == messages


def test_alpaca_converts_to_messages() -> None:
    fields = {
        "instruction": "instruction",
        "input": "input",
        "output": "output",
        "system": "system",
    }
    conv = Conversations("alpaca", fields, "last", system="be kind")
    row = {"instruction": "Add", "input": "2 and 3", "output": "5"}
    assert conv.messages(row) == [
        {"role": "system", "content": "be kind", "train": False},
        {"role": "user", "content": "Add\n2 and 3", "train": False},
        {"role": "assistant", "content": "5", "train": True},
    ]
    row = {"instruction": "Hi", "input": None, "output": "Hello", "system": "be brief"}
    assert conv.messages(row)[:2] == [
        {"role": "system", "content": "be brief", "train": False},
        {"role": "user", "content": "Hi", "train": False},
    ]


def test_lint_warns_when_a_template_cannot_mark_turns() -> None:
    assert Encoder(make_tokenizer(chat_template=IM_TEMPLATE), "chat_template").turn_problems() == []
    no_header = Encoder(make_tokenizer(chat_template=NO_HEADER_TEMPLATE), "chat_template")
    warnings = tokenize_warnings({"turns": no_header.turn_problems()}, {"max_length": 64})
    assert warnings == [
        "chat template: the tokenizer's chat template adds nothing for add_generation_prompt "
        "(no assistant header): the header of each reply is trained with it, and generation "
        "starts without it"
    ]
    # renders only the last turn's reply: earlier turns are not a prefix of later renders
    last_only = "{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% endif %}{% endfor %}"
    problems = Encoder(make_tokenizer(chat_template=last_only), "chat_template").turn_problems()
    assert problems[0].startswith(
        "a made-up conversation: the tokenizer's chat template renders the turns before "
        "assistant message 2 differently once later turns follow"
    )


# -- recipes, data, errors -----------------------------------------------------------------------


def chat_recipe(tmp_path: Path, rows: list[Any], **template: Any) -> Path:
    make_tokenizer(tmp_path / "tok", chat_template=IM_TEMPLATE)
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "dev.jsonl", rows[:2])
    return write_recipe(
        tmp_path,
        dataset={"format": "messages", "shuffle": False},
        template={"prompt": None, "response": None, "format": "chat_template", **template},
    )


def good_rows(n: int) -> list[dict[str, Any]]:
    return [
        {"messages": [{"role": m["role"], "content": m["content"]} for m in conversation(2, False)]}
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    ("messages", "said"),
    [
        ([], "column 'messages' is an empty conversation"),
        ([{"content": "hi"}], "column 'messages', message 1: no field 'role' (the role)"),
        (
            [{"role": "bot", "content": "hi"}],
            "column 'messages', message 1: 'role' is 'bot'; use 'system', 'user', 'assistant'",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}],
            "column 'messages', message 2: 'role' is 'tool': tool turns are not supported; "
            "leave them out of the data",
        ),
        (
            [{"role": "user", "content": None}],
            "column 'messages', message 1: 'content' is null, not text",
        ),
        (
            [{"role": "user", "content": "hi"}],
            "column 'messages': the conversation ends with a 'user' message, not an assistant "
            "turn to train; end it with the assistant's reply",
        ),
        (
            [{"role": "assistant", "content": "hi"}],
            "column 'messages', message 1: the conversation starts with 'assistant'; it must "
            "start with a user message (after a system one)",
        ),
    ],
)
def test_bad_conversations_name_the_row_and_field(
    tmp_path: Path, messages: list[Any], said: str
) -> None:
    rows = good_rows(4)
    rows[2] = {"messages": messages}
    with pytest.raises(RecipeError) as e:
        prepare(load_recipe(chat_recipe(tmp_path, rows)))
    assert str(e.value) == (  # the data as dataset.path names it (a folder here)
        f'data: train row 3: {said}, or set dataset.bad_rows = "drop" to skip such rows'
    )


def test_flags_must_be_booleans() -> None:
    fields = {"column": "messages", "role": "role", "content": "content", "train": "train"}
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    row["messages"][1]["train"] = "yes"  # type: ignore[assignment]
    with pytest.raises(
        ConversationError,
        match=r"^column 'messages', message 2: 'train' is 'yes', not true or false$",
    ):
        Conversations("messages", fields, "flagged").messages(row)


def test_bad_rows_drop_skips_bad_conversations(tmp_path: Path) -> None:
    rows = good_rows(6)
    rows[1] = {"messages": []}
    recipe = chat_recipe(tmp_path, rows)
    text = recipe.read_text().replace(
        'format = "messages"', 'format = "messages"\nbad_rows = "drop"'
    )
    recipe.write_text(text)
    out = prepare(load_recipe(recipe))
    assert out.metrics["train_bad"] == {
        "dropped": 1,
        "rows": [2],
        "why": "are malformed conversations",
    }
    assert len(out.train) == 5


def test_missing_column_is_a_recipe_error(tmp_path: Path) -> None:
    recipe = chat_recipe(tmp_path, [{"chat": []}])
    with pytest.raises(
        RecipeError,
        match=r"\$\.dataset\.messages\.column: no column 'messages'; the data has: chat$",
    ):
        prepare(load_recipe(recipe))


def test_prompt_templates_are_refused_with_a_conversation_format(tmp_path: Path) -> None:
    recipe = chat_recipe(tmp_path, good_rows(4))
    recipe.write_text(recipe.read_text().replace("[template]", '[template]\nprompt = "x"'))
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe)
    assert str(e.value) == (
        f'{recipe}:16: $.template.prompt: not used with dataset.format = "messages" '
        "(conversations are rendered by template.format); remove it"
    )


def test_recipe_system_prompt_and_tokenize(tmp_path: Path) -> None:
    recipe = load_recipe(chat_recipe(tmp_path, good_rows(4), system="answer briefly"))
    out = prepare(recipe)
    messages = json.loads(out.train["messages"][0])
    assert messages[0] == {"role": "system", "content": "answer briefly", "train": False}
    assert out.train["response"][0] == messages[-1]["content"]
    enc = Encoder(make_tokenizer(chat_template=IM_TEMPLATE), "chat_template")
    cfg = {"max_length": 24, "truncation": "cut_prompt", "train_on_prompt": False}
    got = encode_conversations(enc, cfg, out.train["messages"][:1], [1])
    ids, labels = got["input_ids"][0], got["labels"][0]
    assert len(ids) == 24 and got["truncated"] == [True]
    full, trained = enc.conversation(messages)
    tail = [i for i, t in zip(full, trained, strict=True) if t][
        -len([x for x in labels if x >= 0]) :
    ]
    assert [x for x in labels if x >= 0] == tail  # the last reply kept whole, the history cut


def test_new_keys_leave_existing_fingerprints_alone(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path))
    params = {k for s in STAGES for k in stage_params(recipe, s)}
    assert not [k for k in params if k.startswith(("dataset.messages", "dataset.sharegpt"))]
    assert "dataset.format" not in params and "template.train_turns" not in params
    chat = load_recipe(chat_recipe(tmp_path / "c", good_rows(2), train_turns="all"))
    format_params = stage_params(chat, STAGES[0])
    assert format_params["dataset.format"] == "messages"
    assert format_params["template.train_turns"] == "all"


def test_inspect_shows_every_turn_with_its_mask(tmp_path: Path) -> None:
    recipe = chat_recipe(tmp_path, good_rows(4), train_turns="all")
    result = CliRunner().invoke(cli, ["inspect", str(recipe), "--plain", "-n", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("── example 1"))
    assert lines[at + 1 : at + 5] == [
        "user (masked)        | hello world",
        "assistant (trained)  | answer 12",
        "user (masked)        | question 3",
        "assistant (trained)  | Q: A: 7",
    ]
    assert lines[at + 5].startswith("labels               | [masked]")


def test_sharegpt_and_alpaca_recipes_format_as_their_messages_form(tmp_path: Path) -> None:
    chats = [conversation(1 + i % 3, i % 2 == 0) for i in range(6)]
    plain = [[{"role": m["role"], "content": m["content"]} for m in c] for c in chats]
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    share = [
        {"chat": [{"from": names[m["role"]], "value": m["content"]} for m in c]} for c in plain
    ]
    as_messages = prepare(
        load_recipe(chat_recipe(tmp_path / "m", [{"messages": c} for c in plain]))
    )
    recipe = chat_recipe(tmp_path / "s", share)
    text = recipe.read_text().replace('format = "messages"', 'format = "sharegpt"')
    recipe.write_text(text + '\n[dataset.sharegpt]\ncolumn = "chat"\n')
    as_sharegpt = prepare(load_recipe(recipe))
    assert as_sharegpt.train.to_dict() == as_messages.train.to_dict()

    rows = [{"instruction": f"say {i}", "output": f"answer {i}"} for i in range(4)]
    recipe = chat_recipe(tmp_path / "a", rows, system="be brief")
    text = recipe.read_text().replace('format = "messages"', 'format = "alpaca"')
    recipe.write_text(text)
    out = prepare(load_recipe(recipe))
    assert json.loads(out.train["messages"][1]) == [
        {"role": "system", "content": "be brief", "train": False},
        {"role": "user", "content": "say 1", "train": False},
        {"role": "assistant", "content": "answer 1", "train": True},
    ]
    assert (out.train["prompt"][1], out.train["response"][1]) == (
        "system: be brief\nuser: say 1",
        "answer 1",
    )


@pytest.mark.parametrize("fmt", ["chat_template", "plain"])
def test_a_text_prompt_is_the_user_turn_of_a_conversation_recipe(fmt: str) -> None:
    tok = make_tokenizer(chat_template=IM_TEMPLATE)
    enc = Encoder(tok, fmt, turns=True, system="be brief")
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert enc.prompt_ids(["hi"]) == [enc.conversation_prompt_ids(history)]
    if fmt == "plain":
        assert tok.decode(enc.prompt_ids(["hi"])[0]) == "<s>system: be brief\nuser: hi\nassistant: "


def test_special_strings_in_message_contents_stay_text() -> None:
    tok = make_tokenizer(chat_template=IM_TEMPLATE)
    trick = "hello <|im_end|> world"
    messages = [
        {"role": "user", "content": trick, "train": False},
        {"role": "assistant", "content": trick, "train": True},
    ]
    ids, trained = Encoder(tok, "chat_template").conversation(messages)
    as_text = list(tok(trick, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    reply = [i for i, t in zip(ids, trained, strict=True) if t]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert reply[: len(as_text)] == as_text and reply[len(as_text)] == end
    assert ids.count(end) == 2  # the template's two turn ends; none from the data
    cfg = {"max_length": 64, "truncation": "cut_prompt", "train_on_prompt": False}
    got = encode_conversations(Encoder(tok, "chat_template"), cfg, [json.dumps(messages)], [4])
    assert got["data_special"] == [True]


def test_lint_names_a_template_that_refuses_system_messages() -> None:
    refuses = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}" + IM_TEMPLATE
    )
    problems = Encoder(make_tokenizer(chat_template=refuses), "chat_template").turn_problems()
    assert problems == [
        "a made-up conversation with a system message: the tokenizer's chat template failed: "
        "no system role"
    ]


def test_dropped_conversations_are_named_by_the_lint(tmp_path: Path) -> None:
    rows = good_rows(6)
    rows[1] = {"messages": []}
    recipe = chat_recipe(tmp_path, rows)
    text = recipe.read_text().replace(
        'format = "messages"', 'format = "messages"\nbad_rows = "drop"'
    )
    recipe.write_text(text)
    assert format_warnings(prepare(load_recipe(recipe)).metrics) == [  # dev is rows 1-2
        f"{split}: 1 rows are malformed conversations (e.g. row 2): they were dropped "
        '(dataset.bad_rows = "drop")'
        for split in ("train", "heldout")
    ]


def test_empty_turns_follow_template_empty(tmp_path: Path) -> None:
    rows = [{"instruction": f"say {i}", "output": f"answer {i}"} for i in range(6)]
    rows[2]["output"], rows[4]["instruction"] = " ", ""
    recipe = chat_recipe(tmp_path, rows)
    recipe.write_text(recipe.read_text().replace('format = "messages"', 'format = "alpaca"'))
    out = prepare(load_recipe(recipe))
    assert out.metrics["train_empty"] == {"prompt": 1, "response": 1, "rows": [3, 5], "dropped": 2}
    recipe.write_text(recipe.read_text().replace("[template]", '[template]\nempty = "error"'))
    with pytest.raises(RecipeError) as e:
        prepare(load_recipe(recipe))
    assert str(e.value) == (
        "data: 2 train rows have an empty last assistant turn or nothing before it (rows 3, 5); "
        'fix the data, or set template.empty = "drop" to drop them'
    )


@pytest.mark.parametrize("fmt", ["chatglm3", "chat_template"])
def test_content_summary_rows_as_conversations_keep_todays_ids_and_labels(fmt: str) -> None:
    """The demo's rows through its templates, as today's prompt/response format and as a
    one-turn conversation: the same input_ids and labels, truncation included."""
    from runner.data.templates import Renderer, TemplateText
    from runner.data.tokenization import encode_batch

    root = Path(__file__).resolve().parents[1]
    renderer = Renderer(
        {
            part: TemplateText(part, (root / "templates" / f"adgen_{part}.j2").read_text())
            for part in ("prompt", "response")
        }
    )
    lines = (root / "data" / "adgen-demo" / "train.jsonl").read_text(encoding="utf-8")
    rendered = [
        renderer.render(json.loads(line), i) for i, line in enumerate(lines.splitlines()[:24])
    ]
    prompts, responses = [p for p, _ in rendered], [r for _, r in rendered]
    tok = make_tokenizer(chatglm3=fmt == "chatglm3", chat_template=IM_TEMPLATE)
    enc = Encoder(tok, fmt)
    for max_length in (512, 48):  # whole, and cut from the left
        cfg = {"max_length": max_length, "truncation": "cut_prompt", "train_on_prompt": False}
        today = encode_batch(enc, cfg, prompts, responses)
        chats = [
            json.dumps(
                [
                    {"role": "user", "content": p, "train": False},
                    {"role": "assistant", "content": r, "train": True},
                ]
            )
            for p, r in rendered
        ]
        turns = encode_conversations(enc, cfg, chats)
        assert turns["input_ids"] == today["input_ids"]
        assert turns["labels"] == today["labels"]
        assert turns["truncated"] == today["truncated"]


def test_resolved_recipes_load_back(tmp_path: Path) -> None:
    """`recipe show` writes every default (train_turns = "last" too): both kinds load back."""
    for recipe in (write_recipe(tmp_path), chat_recipe(tmp_path / "c", good_rows(2), system="x")):
        loaded = load_recipe(recipe)
        resolved = tomllib.loads(loaded.to_toml())
        assert "tiny" not in resolved["model"]  # only the built-in model's (refused otherwise)
        again = recipe.parent / "resolved.toml"
        again.write_text(tomli_w.dumps(resolved), encoding="utf-8")
        assert load_recipe(again).data == loaded.data
    bad = write_recipe(tmp_path / "t", template={"train_turns": "all"})
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    assert str(e.value) == (
        f"{bad}:16: $.template.train_turns: only applies to conversations; set dataset.format "
        '("messages", "sharegpt" or "alpaca") or remove it'
    )
