"""Tokenize: prompt/response ids per template.format, what is trained, truncation, and the
collator (padding never in the loss, whatever the tokenizer's padding side)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from datakit import IM_TEMPLATE, make_tokenizer, write_recipe

from runner.cli import cli
from runner.data.chat import Encoder
from runner.data.collate import IGNORE_INDEX
from runner.data.tokenization import encode_batch
from runner.errors import RecipeError
from runner.recipe import load_recipe

pytest.importorskip("transformers")
CFG = {"max_length": 64, "truncation": "cut_prompt", "train_on_prompt": False}


def ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def one(encoder: Encoder, prompt: str, response: str, **cfg: Any) -> tuple[list[int], list[int]]:
    out = encode_batch(encoder, CFG | cfg, [prompt], [response])
    return out["input_ids"][0], out["labels"][0]


def trained(labels: list[int]) -> list[int]:
    return [t for t in labels if t != IGNORE_INDEX]


# -- truncation --------------------------------------------------------------------------------


def batch(
    prompt: str, response: str, **cfg: Any
) -> tuple[list[int], list[int], dict[str, Any], list[int], list[int]]:
    """encode_batch (what the stage maps over the rows) on one row with the plain format and a
    bos-prefixing tokenizer: (input_ids, labels, the row's flags, bos + prompt ids, reply ids +
    eos), the last two tokenized here independently."""
    tok = make_tokenizer()
    out = encode_batch(Encoder(tok, "plain"), CFG | cfg, [prompt], [response])
    flags = {k: v[0] for k, v in out.items() if k not in ("input_ids", "labels")}
    whole_prompt = [tok.bos_token_id, *ids(tok, prompt)]
    whole_response = [*ids(tok, response), tok.eos_token_id]
    return out["input_ids"][0], out["labels"][0], flags, whole_prompt, whole_response


def test_rows_that_fit_are_not_cut() -> None:
    input_ids, labels, flags, p, r = batch("Q: question 1\nA: ", "answer 1", max_length=16)
    assert len(p) + len(r) <= 16
    assert input_ids == p + r and labels == [IGNORE_INDEX] * len(p) + r
    assert (flags["truncated"], flags["keep"], flags["trained"]) == (False, True, len(r))
    input_ids, labels, flags, _, _ = batch("Q: question 1\nA: ", "answer 1", train_on_prompt=True)
    assert labels == input_ids == p + r and flags["trained"] == len(p) + len(r)


def test_cut_prompt_keeps_response_end_token_and_leading_special_tokens() -> None:
    prompt = "the quick brown fox hello world " * 4
    input_ids, labels, flags, p, r = batch(prompt, "answer 1", max_length=12)
    assert len(p) > 12 and len(r) < 6  # only the prompt has to give way
    body = 12 - 1 - len(r)  # bos, the prompt's end, the whole reply with its end token
    assert input_ids == [p[0], *p[-body:], *r]
    assert trained(labels) == r and labels[: 1 + body] == [IGNORE_INDEX] * (1 + body)
    assert flags["truncated"] and flags["keep"] and flags["end_trained"]


def test_long_response_is_cut_but_a_quarter_of_the_room_stays_prompt() -> None:
    reply = " ".join(f"answer {i}" for i in range(20))
    input_ids, labels, flags, p, r = batch("Q: question 1\nA: ", reply, max_length=16)
    assert len(p) > 4 and len(r) > 16
    assert flags["truncated"] and len(input_ids) == 16
    assert input_ids[:4] == [p[0], *p[-3:]]  # bos + the last 3 prompt tokens (a quarter of 15)
    assert trained(labels) == input_ids[4:] == r[:12]  # the reply's start; its eos is cut off
    assert not flags["end_trained"]


def test_drop_policy() -> None:
    long_prompt = "the quick brown fox hello world " * 4
    input_ids, labels, flags, _, _ = batch(
        long_prompt, "answer 1", max_length=12, truncation="drop"
    )
    assert not flags["keep"] and flags["prompt_over"]
    input_ids, labels, flags, p, r = batch("Q: A: ", "answer 1", max_length=12, truncation="drop")
    assert flags["keep"] and not flags["truncated"]
    assert input_ids == p + r and labels == [IGNORE_INDEX] * len(p) + r


# -- formats -----------------------------------------------------------------------------------


def test_plain_format_masks_the_prompt_and_trains_response_and_eos() -> None:
    tok = make_tokenizer()
    enc = Encoder(tok, "plain")
    input_ids, labels = one(enc, "Q: question 1\nA: ", "answer 1")
    prompt = [tok.bos_token_id, *ids(tok, "Q: question 1\nA: ")]
    response = [*ids(tok, "answer 1"), tok.eos_token_id]
    assert input_ids == prompt + response
    assert labels == [IGNORE_INDEX] * len(prompt) + response
    input_ids, labels = one(enc, "Q: question 1\nA: ", "answer 1", train_on_prompt=True)
    assert labels == input_ids


def test_chat_template_format_trains_only_the_assistant_turn() -> None:
    tok = make_tokenizer(chat_template=IM_TEMPLATE)
    enc = Encoder(tok, "chat_template")
    input_ids, labels = one(enc, "question 3", "answer 3")
    assert tok.decode(input_ids) == (
        "<|im_start|>user\nquestion 3<|im_end|>\n<|im_start|>assistant\nanswer 3<|im_end|>\n</s>"
    )
    assert tok.decode(trained(labels)) == "answer 3<|im_end|>\n</s>"
    assert labels[: len(input_ids) - len(trained(labels))] == [IGNORE_INDEX] * (
        len(input_ids) - len(trained(labels))
    )
    assert enc.prompt_ids(["question 3"]) == [input_ids[: len(input_ids) - len(trained(labels))]]


def test_chat_template_needs_a_template() -> None:
    with pytest.raises(RecipeError) as e:
        Encoder(make_tokenizer(), "chat_template", "r.toml: $.template.format")
    assert str(e.value) == (
        'r.toml: $.template.format: format "chat_template" but the tokenizer '
        'has no chat template; use format = "plain" (or "chatglm3" for '
        "ChatGLM3)"
    )


def test_chatglm3_format() -> None:
    """[gMASK]sop<|user|>\\n{prompt}<|assistant|>\\n{response}</s>: role tokens masked, the
    newline after <|assistant|>, the reply and </s> trained. (The real tokenizer's SentencePiece
    dummy prefix adds the space before prompt and reply; this byte-level one has none.)"""
    tok = make_tokenizer(chatglm3=True, padding_side="left")
    enc = Encoder(tok, "chatglm3")
    input_ids, labels = one(enc, "question 4", "answer 4")
    special = {
        t: tok.convert_tokens_to_ids(t) for t in ("[gMASK]", "sop", "<|user|>", "<|assistant|>")
    }
    head = [
        special["[gMASK]"],
        special["sop"],
        special["<|user|>"],
        *ids(tok, "\n"),
        *ids(tok, "question 4"),
        special["<|assistant|>"],
    ]
    reply = [*ids(tok, "\n"), *ids(tok, "answer 4"), tok.eos_token_id]
    assert input_ids == head + reply
    assert labels == [IGNORE_INDEX] * len(head) + reply
    assert tok.decode(input_ids) == "[gMASK]sop<|user|>\nquestion 4<|assistant|>\nanswer 4</s>"
    assert enc.prompt_ids(["question 4"]) == [head]


def test_chatglm3_cut_prompt_keeps_gmask_sop() -> None:
    tok = make_tokenizer(chatglm3=True)
    input_ids, labels = one(Encoder(tok, "chatglm3"), "question 1 " * 30, "answer 1", max_length=24)
    assert len(input_ids) == 24
    assert tok.convert_ids_to_tokens(input_ids[:3]) == ["[gMASK]", "sop", "<|user|>"]
    assert tok.decode(trained(labels)) == "\nanswer 1</s>"
    # plain text on a ChatGLM3 tokenizer starts with [gMASK] sop too, and keeps it
    input_ids, _ = one(Encoder(tok, "plain"), "question 1 " * 30, "answer 1", max_length=24)
    assert tok.convert_ids_to_tokens(input_ids[:2]) == ["[gMASK]", "sop"]


def test_chatglm3_needs_its_tokens() -> None:
    with pytest.raises(RecipeError) as e:
        Encoder(make_tokenizer(), "chatglm3", "r.toml: $.template.format")
    assert str(e.value) == (
        'r.toml: $.template.format: format "chatglm3" but the tokenizer has '
        "no [gMASK], sop, <|user|>, <|assistant|> token; use it with a ChatGLM3 "
        'tokenizer, or format = "plain"'
    )


# -- the collator ------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_is_never_in_the_loss(tmp_path: Path, side: str) -> None:
    from runner.data.collate import make_collator

    tok = make_tokenizer(padding_side=side)
    recipe = load_recipe(write_recipe(tmp_path, tokenizer=False))
    enc = Encoder(tok, "plain")
    out = encode_batch(enc, CFG, ["Q: a\nA: ", "Q: a much longer question 12345\nA: "], ["x", "y"])
    rows = [
        {"input_ids": i, "labels": lab}
        for i, lab in zip(out["input_ids"], out["labels"], strict=True)
    ]
    batch = make_collator(recipe, tok)(rows)
    assert tok.padding_side == side  # the caller's tokenizer is left alone
    short = len(rows[0]["input_ids"])
    assert batch["input_ids"][0, :short].tolist() == rows[0]["input_ids"]  # padded on the right
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (
        batch["input_ids"].shape[1] - short
    )
    assert batch["labels"][0].tolist() == rows[0]["labels"] + [IGNORE_INDEX] * (
        batch["labels"].shape[1] - short
    )
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_pad_equal_to_eos_keeps_the_eos_trained(tmp_path: Path) -> None:
    from runner.data.collate import make_collator

    tok = make_tokenizer(pad_is_eos=True)
    recipe = load_recipe(write_recipe(tmp_path, tokenizer=False))
    out = encode_batch(
        Encoder(tok, "plain"), CFG, ["Q: a\nA: ", "Q: much longer 123\nA: "], ["x", "y"]
    )
    rows = [
        {"input_ids": i, "labels": lab}
        for i, lab in zip(out["input_ids"], out["labels"], strict=True)
    ]
    batch = make_collator(recipe, tok)(rows)
    for row, labels in zip(rows, batch["labels"].tolist(), strict=True):
        assert labels[len(row["labels"]) - 1] == tok.eos_token_id


# -- the stage -----------------------------------------------------------------------------------


def test_tokenize_stage_with_chatglm3_format(tmp_path: Path) -> None:
    from datasets import load_from_disk

    make_tokenizer(tmp_path / "tok", chatglm3=True, padding_side="left")
    recipe = write_recipe(tmp_path, template={"format": "chatglm3"}, dataset={"shuffle": False})
    result = CliRunner().invoke(cli, ["run", str(recipe), "--until", "tokenize"])
    assert result.exit_code == 0, result.output
    tok = make_tokenizer(chatglm3=True)
    row = load_from_disk(str(tmp_path / "run" / "data" / "tokenized"))["train"][0]
    assert (
        tok.decode(row["input_ids"])
        == "[gMASK]sop<|user|>\nQ: question 0\nA: <|assistant|>\nanswer 0</s>"
    )
    assert tok.decode(trained(row["labels"])) == "\nanswer 0</s>"
    state = json.loads((tmp_path / "run" / "state" / "tokenize.json").read_text())
    assert state["params"]["template.format"] == "chatglm3"
    assert (
        state["metrics"]["train"]["rows"] == 16 and state["metrics"]["train"]["no_end_token"] == 0
    )
