"""train.packing: several rows in one sequence, position ids restarting per row, and no
cross-contamination: on the tiny GLM architecture (fp32, CPU) the logits of a packed batch equal
each row's own logits, and the loss equals the padded batch's. train.pad_to_multiple_of: the
packed row padded at its end by a segment of its own changes neither, and the token counts
(the Trainer's tokens seen, the throughput meter) leave that segment out."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import datakit
import pytest
from datakit import make_tokenizer, write_recipe

from runner.data.chat import Encoder
from runner.data.collate import IGNORE_INDEX
from runner.data.tokenization import encode_batch
from runner.recipe import load_recipe

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
    model = datakit.tiny_glm(tok, _attn_implementation=attn)
    assert model.config.use_cache  # the collator must not rely on the model's config
    return model.eval()


def collator(tmp_path: Path, tok: Any, packing: bool, *overrides: str) -> Any:
    from runner.data.collate import make_collator

    recipe = write_recipe(tmp_path, tokenizer=False)
    sets = (f"train.packing={str(packing).lower()}", *overrides)
    return make_collator(load_recipe(recipe, sets), tok)


def test_packed_batch_layout(tmp_path: Path) -> None:
    tok = make_tokenizer(padding_side="left")
    examples = rows(tok)
    batch = collator(tmp_path, tok, packing=True)(examples)
    lengths = [len(r["input_ids"]) for r in examples]
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    expected = [t for r in examples for t in [IGNORE_INDEX, *r["labels"][1:]]]
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


def trainer(tmp_path: Path, tok: Any, packing: bool, group_by_length: bool, *overrides: str) -> Any:
    import dataclasses

    from datasets import Dataset
    from transformers import TrainingArguments

    from runner.data.collate import Packed
    from runner.throughput import Meter
    from runner.training.loop import versioned_arguments
    from runner.training.trainer import RunnerTrainer

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
    collate = collator(tmp_path, tok, packing, *overrides)
    return RunnerTrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=collate,
        meter=Meter(tok.pad_token_id),
        packed=collate if isinstance(collate, Packed) else None,
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


# -- pad_to_multiple_of ---------------------------------------------------------------------------


def test_auto_pad_multiple(tmp_path: Path) -> None:
    from runner.data.collate import PACKED_FLEX_MULTIPLE, pad_multiple

    path = write_recipe(tmp_path, tokenizer=False)

    def multiple(*sets: str, cuda: bool = False) -> int:
        return pad_multiple(load_recipe(path, sets), cuda=cuda)

    flex = "model.attn_implementation=flex_attention"
    assert multiple("train.packing=true", flex) == PACKED_FLEX_MULTIPLE
    assert multiple("train.packing=true") == 1  # sdpa: any length runs without recompiling
    assert multiple("train.packing=false", cuda=True) == 8
    assert multiple("train.packing=false", cuda=False) == 1
    assert multiple("train.padding=max_length", cuda=True) == 1
    assert multiple("train.packing=true", "train.pad_to_multiple_of=64") == 64
    assert multiple("train.pad_to_multiple_of=16", cuda=True) == 16


def test_packed_row_padded_to_a_multiple(tmp_path: Path) -> None:
    tok = make_tokenizer()
    examples = rows(tok)
    real = sum(len(r["input_ids"]) for r in examples)
    plain = collator(tmp_path, tok, True)(examples)
    batch = collator(tmp_path, tok, True, "train.pad_to_multiple_of=32")(examples)
    length = batch["input_ids"].shape[1]
    assert length % 32 == 0 and real < length < real + 32
    assert batch["use_cache"] is False and "attention_mask" not in batch
    for key in ("input_ids", "labels", "position_ids"):
        assert batch[key][0, :real].tolist() == plain[key][0].tolist()
    assert batch["position_ids"][0, real:].tolist() == list(range(length - real))
    assert batch["input_ids"][0, real:].tolist() == [tok.pad_token_id] * (length - real)
    assert batch["labels"][0, real:].tolist() == [IGNORE_INDEX] * (length - real)
    exact = collator(tmp_path, tok, True, f"train.pad_to_multiple_of={real}")(examples)
    assert exact["input_ids"].shape[1] == real  # already a multiple: no pad segment


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pad_segment_changes_neither_logits_nor_loss(tmp_path: Path, attn: str) -> None:
    tok = make_tokenizer()
    model = tiny_glm(tok, attn)
    examples = rows(tok)
    real = sum(len(r["input_ids"]) for r in examples)
    packed = collator(tmp_path, tok, True)(examples)
    padded = collator(tmp_path, tok, True, "train.pad_to_multiple_of=48")(examples)
    assert padded["input_ids"].shape[1] - real >= 8  # a pad segment worth the name
    with torch.no_grad():
        out, padded_out = model(**packed), model(**padded)
    assert torch.allclose(padded_out.logits[0, :real], out.logits[0], atol=1e-5, rtol=0)
    assert abs(float(out.loss) - float(padded_out.loss)) < 1e-6


def test_token_counts_leave_the_pad_segment_out(tmp_path: Path) -> None:
    from runner.data.collate import real_token_mask
    from runner.throughput import Meter, counting

    tok = make_tokenizer()
    examples = rows(tok)
    real = sum(len(r["input_ids"]) for r in examples)
    pack = collator(tmp_path, tok, True, "train.pad_to_multiple_of=48")
    meter = Meter(tok.pad_token_id)
    batch = counting(pack, meter)(examples)
    meter.trained()
    assert (meter.real, meter.samples, meter.padded) == (real, 3, batch["input_ids"].numel())
    assert int(real_token_mask(batch, pack.pad_id, pack.multiple).sum()) == real
    unpadded = collator(tmp_path, tok, True, "train.pad_to_multiple_of=1")(examples)
    assert int(real_token_mask(unpadded, pack.pad_id, 1).sum()) == real

    t = trainer(tmp_path, tok, True, False, "train.pad_to_multiple_of=48")
    t.args.include_num_input_tokens_seen = "non_padding"
    t.args.max_steps = 3  # 3 steps of 2 rows: each of the 6 rows once
    t.train()
    seen = sum(len(r["input_ids"]) for r in rows(tok) * 2)
    assert t.state.num_input_tokens_seen == seen


def test_meter_leaves_steps_with_a_new_length_out() -> None:
    from runner.throughput import Meter

    meter = Meter(0, warmup=1)
    lengths = [512, 512, 512, 1024, 512, 512, 512, 512, 512, 512]
    t = 0.0
    for n in lengths:  # one batch per step; a new length compiles: a slow step
        meter.count({"input_ids": torch.zeros(1, n, dtype=torch.long)}, [{"input_ids": [1] * 100}])
        meter.trained()
        t += 6.0 if n == 1024 else 1.0
        meter.marks.append((t, meter.real, meter.padded, meter.samples))
    summary = meter.summary()
    assert summary["steps_left_out"] == 1 and summary["batch_shapes"] == 2
    assert summary["seconds_per_step"] == 1.0 and summary["real_tokens_per_second"] == 100.0

    dynamic = Meter(0, warmup=1)  # a new length at every step: nothing to leave out
    for n in range(1, 11):
        dynamic.count({"input_ids": torch.zeros(1, n, dtype=torch.long)}, [{"input_ids": [1]}])
        dynamic.trained()
        dynamic.marks.append((float(n), dynamic.real, dynamic.padded, dynamic.samples))
    assert dynamic.summary()["steps_left_out"] == 0
