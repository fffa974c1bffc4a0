"""train.chunked_cross_entropy: on the tiny GLM (fp32, CPU) the chunked loss equals the model's
own loss, with and without the Trainer's num_items_in_batch, and so do the gradients reaching
the model; it stays off, saying why, where the output head is not a plain frozen Linear."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import datakit
import pytest
from datakit import make_tokenizer, write_recipe

from runner.models.chunked_loss import chunking_wanted
from runner.recipe import load_recipe

torch = pytest.importorskip("torch")


def tiny_glm(**config: Any) -> Any:
    model = datakit.tiny_glm(make_tokenizer(), **config)
    model.lm_head.weight.requires_grad_(False)  # frozen, as under LoRA
    return model


def batch(model: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 40))
    labels = ids.clone()
    labels[0, :7] = -100  # a prompt that is not trained
    labels[1, 30:] = -100
    return {"input_ids": ids, "labels": labels}


def loss_and_grads(model: Any, **extra: Any) -> tuple[float, list[Any]]:
    model.zero_grad()
    out = model(**batch(model), **extra)
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return float(out.loss.detach()), grads


@pytest.mark.parametrize(
    ("items", "one_pass", "always"),
    [(None, 8, False), (50, 8, False), (None, 1000, False), (None, 1000, True)],
)
def test_chunked_loss_equals_the_models_own(
    monkeypatch: pytest.MonkeyPatch, items: Any, one_pass: int, always: bool
) -> None:
    """80 tokens a batch: over `one_pass` in chunks of 7 (recomputed), else in one pass;
    `always` (the "auto" memory layout's choice): in chunks whatever the one-pass size."""
    from runner.models import chunked_loss

    extra = {} if items is None else {"num_items_in_batch": torch.tensor(items)}
    plain = tiny_glm()
    chunked = tiny_glm()
    vocab = chunked.config.vocab_size
    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", vocab * 7)  # 7 tokens: many chunks
    monkeypatch.setattr(chunked_loss, "ONE_PASS_ELEMENTS", vocab * one_pass)
    calls: list[int] = []
    decide = chunked_loss.is_chunked

    def counted(tokens: int, vocab_size: int, one_pass: int | None = None) -> bool:
        calls.append(tokens)
        return decide(tokens, vocab_size, one_pass)

    monkeypatch.setattr(chunked_loss, "is_chunked", counted)
    import torch.utils.checkpoint as ckpt

    recomputed: list[int] = []
    real = ckpt.checkpoint

    def checkpoint(*args: Any, **kwargs: Any) -> Any:
        recomputed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "checkpoint", checkpoint)
    from runner.training.trainer import chunk_the_loss

    assert chunk_the_loss(chunked, always=always) == (
        "chunked_cross_entropy: logits and loss 7 tokens at a time for micro-batches over "
        f"{7 if always else one_pass:,} tokens (vocabulary {vocab:,})"
    )
    loss, grads = loss_and_grads(plain, **extra)
    closs, cgrads = loss_and_grads(chunked, **extra)
    assert closs == pytest.approx(loss, rel=1e-6)
    assert calls == [80]  # the flattened batch
    assert len(recomputed) == (math.ceil(80 / 7) if always or one_pass < 80 else 0)
    assert len(grads) == len(cgrads) > 0
    for g, c in zip(grads, cgrads, strict=True):
        assert torch.allclose(g, c, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation: no checkpointing, the same number
        assert float(chunked(**batch(chunked)).loss) == pytest.approx(
            float(plain(**batch(plain)).loss), rel=1e-6
        )


def test_off_where_the_head_is_trained_or_scaled() -> None:
    from runner.training.trainer import chunk_the_loss

    trained = tiny_glm()
    trained.lm_head.weight.requires_grad_(True)
    assert chunk_the_loss(trained) == (
        "chunked_cross_entropy: off: the output head is trained (modules_to_save)"
    )
    scaled = tiny_glm(final_logit_softcapping=30.0)
    assert chunk_the_loss(scaled) == (
        "chunked_cross_entropy: off: the model scales its logits (final_logit_softcapping)"
    )
    loss = float(scaled(**batch(scaled)).loss.detach())  # still the model's own loss
    assert loss > 0


def test_auto_is_on_with_cuda_except_under_fsdp(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, tokenizer=False)

    def wanted(*sets: str, cuda: bool) -> bool:
        return chunking_wanted(load_recipe(path, sets), cuda)

    fsdp = (
        "launch.strategy=fsdp",
        "quantization.bnb_4bit_quant_storage=bfloat16",
        "train.optim=adamw_torch",
    )
    assert wanted(cuda=True) and not wanted(cuda=False) and not wanted(*fsdp, cuda=True)
    assert wanted("train.chunked_cross_entropy=true", cuda=False)
    assert not wanted("train.chunked_cross_entropy=false", cuda=True)
