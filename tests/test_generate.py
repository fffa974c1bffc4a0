"""Generation settings without a model: the stop ids, the decoding arguments, the left padding
and the cut at the first stop token (a stand-in model returns fixed tokens)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from runner.models.generate import decoding, generate_ids, stop_token_ids

torch = pytest.importorskip("torch")

PAD, EOS, USER, OBSERVATION = 0, 2, 7, 8


def model_with_eos(eos: Any) -> Any:
    return SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))


@pytest.mark.parametrize(
    ("config_eos", "expected"),
    [
        (
            [EOS, USER, OBSERVATION],
            [EOS, USER, OBSERVATION],
        ),  # ChatGLM3: </s> <|user|> <|observation|>
        ([USER, OBSERVATION], [USER, OBSERVATION, EOS]),  # the tokenizer's eos is added
        (EOS, [EOS]),
        (None, [EOS]),
    ],
)
def test_stop_ids_are_the_generation_config_list_plus_the_tokenizer_eos(
    config_eos: Any, expected: list[int]
) -> None:
    tok = SimpleNamespace(eos_token_id=EOS)
    assert stop_token_ids(model_with_eos(config_eos), tok) == expected


def test_greedy_clears_the_sampling_knobs_and_sampling_keeps_them() -> None:
    cfg = {"max_new_tokens": 5, "do_sample": False, "temperature": 0.7, "top_p": 0.9}
    assert decoding(cfg) == {
        "max_new_tokens": 5,
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }
    assert decoding({**cfg, "do_sample": True}) == {
        "max_new_tokens": 5,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
    }


class LeftPaddingTok:
    pad_token_id = PAD
    eos_token_id = EOS

    def pad(self, enc: dict[str, list[list[int]]], **kw: Any) -> Any:
        from transformers import BatchEncoding

        assert kw == {"padding": True, "padding_side": "left", "return_tensors": "pt"}
        width = max(len(x) for x in enc["input_ids"])
        ids = [[PAD] * (width - len(x)) + x for x in enc["input_ids"]]
        mask = [[0] * (width - len(x)) + [1] * len(x) for x in enc["input_ids"]]
        return BatchEncoding({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)})


class ScriptedModel:
    """Answers the i-th prompt it sees with REPLIES[i], after the padded prompt, as generate()."""

    device = "cpu"
    generation_config = SimpleNamespace(eos_token_id=[EOS, USER, OBSERVATION])
    REPLIES: ClassVar[list[list[int]]] = [
        [5, 6, USER, 9, PAD],
        [4, EOS, PAD, PAD, PAD],
        [3, 3, 3, 3, 3],
    ]

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.answered = 0

    def generate(self, input_ids: Any, attention_mask: Any, **kw: Any) -> Any:
        self.calls.append({"input_ids": input_ids.tolist(), "mask": attention_mask.tolist(), **kw})
        new = torch.tensor(self.REPLIES[self.answered : self.answered + len(input_ids)])
        self.answered += len(input_ids)
        return torch.cat([input_ids, new], dim=1)


def test_replies_are_cut_at_the_first_stop_token_and_prompts_left_padded() -> None:
    model = ScriptedModel()
    cfg = {"max_new_tokens": 5, "do_sample": False, "temperature": 1.0, "top_p": 1.0}
    got = generate_ids(model, LeftPaddingTok(), [[11, 12, 13], [14]], cfg, seed=1)
    assert got == [[5, 6], [4]]  # <|user|> and </s> end a reply; what follows is dropped
    (call,) = model.calls
    assert call["input_ids"] == [[11, 12, 13], [PAD, PAD, 14]]
    assert call["mask"] == [[1, 1, 1], [0, 0, 1]]
    assert call["eos_token_id"] == [EOS, USER, OBSERVATION]
    assert call["pad_token_id"] == PAD
    assert call["do_sample"] is False and call["max_new_tokens"] == 5


def test_batches_of_prompts_keep_their_order() -> None:
    model = ScriptedModel()
    cfg = {"max_new_tokens": 5, "do_sample": False, "temperature": 1.0, "top_p": 1.0}
    got = generate_ids(model, LeftPaddingTok(), [[1], [2], [3]], cfg, seed=1, batch_size=2)
    assert len(model.calls) == 2
    assert got == [[5, 6], [4], [3, 3, 3, 3, 3]]  # no stop token: the whole budget
