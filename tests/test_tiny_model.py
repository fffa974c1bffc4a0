"""Tests for the embedded tiny GLM builder (skipped without torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from runner.data.demo import generate_pretrain_rows, write_jsonl
from runner.models.tiny import build_tiny_model

PROMPT = "用户: 类型#裙*颜色#红色\n广告: "
SMALL: dict[str, Any] = dict(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=128,
    max_position_embeddings=128,
    pretrain_steps=5,
    pretrain_batch_size=4,
    pretrain_seq_len=32,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "pretrain.jsonl"
    write_jsonl(path, generate_pretrain_rows(200, 0))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("models") / "tiny"
    facts = build_tiny_model(out, corpus=corpus, seed=0, **SMALL)
    return out, facts


def test_facts(built: tuple[Path, dict[str, Any]]) -> None:
    _, facts = built
    assert facts["params"] > 0 and facts["seconds"] > 0
    assert facts["pretrain_steps"] == 5
    assert facts["final_loss"] < facts["initial_loss"]


def test_out_dir_is_complete_and_no_temp_left(built: tuple[Path, dict[str, Any]]) -> None:
    out, _ = built
    assert (out / "model.safetensors").is_file()
    assert (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_tokenizer_round_trips(built: tuple[Path, dict[str, Any]]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built[0])
    for text in (PROMPT, "BRAND 2024: a*b#c\n😀 用户广告"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(PROMPT)  # one token per character here
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "<unk>"]
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"


def test_model_loads_with_auto_classes(built: tuple[Path, dict[str, Any]]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, facts = built
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    config = model.config
    assert config.model_type == "glm" and config.attention_bias
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    assert config.vocab_size == len(tokenizer) == facts["vocab_size"]
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    # generate (with its KV cache and the partial rotary embedding) picks what greedy decoding by
    # full forward passes picks, token for token: the checkpoint's generation settings add no
    # sampling or penalty and the cache positions are right
    inputs = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)
    model.eval()
    with torch.no_grad():
        out_ids = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6)
        by_hand = inputs["input_ids"]
        for _ in range(6):
            logits = model(input_ids=by_hand).logits[0, -1]
            logits[tokenizer.eos_token_id] = -float("inf")  # what min_new_tokens does
            by_hand = torch.cat([by_hand, logits.argmax().view(1, 1)], dim=1)
    assert out_ids.tolist() == by_hand.tolist()


def test_same_seed_same_weights(
    built: tuple[Path, dict[str, Any]], corpus: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    again = tmp_path / "again"
    build_tiny_model(again, corpus=corpus, seed=0, **SMALL)
    first = load_file(built[0] / "model.safetensors")
    second = load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(first[name].equal(second[name]) for name in first)
    assert (built[0] / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


def test_rebuild_replaces_existing_dir(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    build_tiny_model(out, corpus=corpus, seed=1, **SMALL)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
