"""train.packing: several rows in one sequence, position ids restarting per row, and no
cross-contamination: on the tiny GLM architecture (fp32, CPU) the logits of a packed batch equal
each row's own logits, and the loss equals the padded batch's."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from datakit import make_tokenizer, write_recipe

from runner.data.chat import Encoder
from runner.recipe import load_recipe
from runner.stages.tokenize import IGNORE, encode_batch

torch = pytest.importorskip("torch")
CFG = {"max_length": 64, "truncation": "cut_prompt", "train_on_prompt": False}
PROMPTS = [
    "Q: question 1\nA: ",
    "Q: a much longer question 22 about the quick brown fox\nA: ",
    "Q: 3\nA: ",
]
RESPONSES = ["answer 1", "answer 22 hello world", "the fox"]


def rows(tok: Any) -> list[dict[str, list[int]]]:
    out = encode_batch(Encoder(tok, "plain"), CFG, PROMPTS, RESPONSES)
    return [
        {"input_ids": i, "labels": lab}
        for i, lab in zip(out["input_ids"], out["labels"], strict=True)
    ]


def tiny_glm(tok: Any, attn: str) -> Any:
    from runner.models.tiny import build_config, init_model

    config = build_config(
        tok,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=128,
    )
    config._attn_implementation = attn
    assert config.use_cache  # the collator must not rely on the model's config
    return init_model(config, seed=0).eval()


def collator(tmp_path: Path, tok: Any, packing: bool) -> Any:
    from runner.data.collate import make_collator

    recipe = write_recipe(tmp_path, tokenizer=False)
    return make_collator(load_recipe(recipe, (f"train.packing={str(packing).lower()}",)), tok)


def test_packed_batch_layout(tmp_path: Path) -> None:
    tok = make_tokenizer(padding_side="left")
    examples = rows(tok)
    batch = collator(tmp_path, tok, packing=True)(examples)
    lengths = [len(r["input_ids"]) for r in examples]
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    expected = [t for r in examples for t in [IGNORE, *r["labels"][1:]]]
    assert batch["labels"][0].tolist() == expected


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_per_row_logits(tmp_path: Path, attn: str) -> None:
    tok = make_tokenizer()
    model = tiny_glm(tok, attn)
    examples = rows(tok)
    packed = collator(tmp_path, tok, packing=True)(examples)
    padded = collator(tmp_path, tok, packing=False)(examples)
    with torch.no_grad():
        singles = [model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in examples]
        out = model(**packed)
        padded_out = model(**padded)
    assert torch.allclose(out.logits[0], torch.cat(singles), atol=1e-5, rtol=0)
    for i, single in enumerate(singles):  # right padding: real positions match too
        assert torch.allclose(padded_out.logits[i, : len(single)], single, atol=1e-5, rtol=0)
    assert abs(float(out.loss) - float(padded_out.loss)) < 1e-5


def trainer(tmp_path: Path, tok: Any, packing: bool, group_by_length: bool) -> Any:
    import dataclasses

    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from runner.stages.train import versioned_arguments

    cfg = {"warmup_ratio": 0.0, "group_by_length": group_by_length, "gradient_checkpointing": False}
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-3,
        optim="adamw_torch",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
        **versioned_arguments(cfg, fields),
    )
    data = Dataset.from_list(rows(tok) * 2)
    model = tiny_glm(tok, "sdpa").train()
    return Trainer(
        model=model, args=args, train_dataset=data, data_collator=collator(tmp_path, tok, packing)
    )


def test_trainer_steps_on_packed_batches(tmp_path: Path) -> None:
    tok = make_tokenizer()
    t = trainer(tmp_path, tok, packing=True, group_by_length=False)
    batch = next(iter(t.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch
    result = t.train()
    assert t.state.global_step == 2 and math.isfinite(result.training_loss)


def test_group_by_length_reaches_the_sampler(tmp_path: Path) -> None:
    from transformers.trainer_pt_utils import LengthGroupedSampler

    tok = make_tokenizer()
    assert isinstance(
        trainer(tmp_path, tok, False, True)._get_train_sampler(), LengthGroupedSampler
    )
    assert not isinstance(
        trainer(tmp_path, tok, False, False)._get_train_sampler(), LengthGroupedSampler
    )
